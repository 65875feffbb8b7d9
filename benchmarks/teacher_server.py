"""A served teacher against the same teacher in the trainer, and the server's throughput.

    python benchmarks/teacher_server.py --out benchmarks/results/teacher_server.json

1. ``effopd train`` (OPD on the embedded default: 64 prompts per step, 48 new tokens) with the
   teacher loaded in the trainer and with ``model.teacher=http://127.0.0.1:PORT`` served by
   ``effopd serve-teacher`` on the same machine, interleaved, ``--repeats`` runs each of
   ``--steps`` steps (the first two steps of each run dropped): median seconds per step and per
   teacher scoring. The trainer runs with one torch thread in both cases, the server with one.
2. The server alone: 1, 4 and 16 concurrent clients, each sending batches of ``--rows`` sampled
   responses of the embedded student for ``--seconds`` s; scored response tokens per second,
   requests per second, and how many requests the server merged into one forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "effopd.cli", "serve-teacher", "--model", "embedded", "--port", str(port),
                             "--device", "cpu"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(proc.stderr.read())


def train_run(teacher: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "effopd.cli", "train", "--run-dir", f"{d}/run", "--no-progress", f"model.teacher={teacher}",
               f"train.steps={steps}", "train.eval_every=0", f"train.save_every={steps}", "optim.lr=1e-5",
               "data.eval_limit=50"]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        rows = [json.loads(x) for x in Path(f"{d}/run/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r][2:]
    return {"step": statistics.median(r["time/step"] for r in rows), "score": statistics.median(r["time/score"] for r in rows)}


def throughput(port: int, clients: int, rows: int, seconds: float) -> dict:
    import httpx
    import torch

    from effopd.data import embedded_splits
    from effopd.models import load_model, load_tokenizer
    from effopd.rollout import generate
    from effopd.teachers import rollout_request

    torch.manual_seed(0)
    tok, student = load_tokenizer("embedded"), load_model("embedded", "student")
    ro = generate(student, tok, [e.prompt for e in embedded_splits()["train"][:rows]], max_new_tokens=48)
    body, tokens = rollout_request(ro, 1.0), int(ro.response_mask_BT.sum())
    url = f"http://127.0.0.1:{port}"
    before = httpx.get(url + "/health").json()["batches"]
    done = [0] * clients
    stop = time.time() + seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as c:
            while time.time() < stop:
                c.post(url + "/logprobs", json=body).raise_for_status()
                done[i] += 1

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    batches = httpx.get(url + "/health").json()["batches"] - before
    n = sum(done)
    return {"clients": clients, "requests": n, "seconds": wall, "tokens_per_s": n * tokens / wall,
            "requests_per_s": n / wall, "requests_per_forward": n / max(batches, 1), "rows": rows,
            "response_tokens_per_request": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0)
    ns = ap.parse_args()
    port = free_port()
    server = start_server(port)
    try:
        runs = {"local": [], "served": []}
        for _ in range(ns.repeats):
            runs["local"].append(train_run("embedded", ns.steps))
            runs["served"].append(train_run(f"http://127.0.0.1:{port}", ns.steps))
            print(runs["local"][-1], runs["served"][-1], flush=True)
        load = [throughput(port, c, ns.rows, ns.seconds) for c in (1, 4, 16)]
        for r in load:
            print(r, flush=True)
    finally:
        server.kill()
    summary = {k: {"step": statistics.median(r["step"] for r in v), "score": statistics.median(r["score"] for r in v)}
               for k, v in runs.items()}
    result = {"machine": f"{os.cpu_count()} CPUs", "runs": runs, "median": summary, "throughput": load,
              "steps": ns.steps, "repeats": ns.repeats}
    ns.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
