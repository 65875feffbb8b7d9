"""The sampling engines (``rollout.backend``) side by side on the embedded default, CPU.

    python benchmarks/rollout_engines.py --out benchmarks/results/rollout_engines.json

1. Sampling alone: the shipped student, ``--prompts`` training prompts per call (16 and 64),
   48 new tokens at most, temperature 1, logprobs kept (as OPD with several teachers or
   ``loss.rollout_is`` asks). The engines alternate, ``--repeats`` calls each after one warm-up;
   the median seconds per call are kept, with the decode steps and the rows decoded per step, and
   the first call's seconds (``lean-compiled`` compiles the model's forward then).
2. ``--compile``: the decode step of a static KV cache under ``torch.compile`` (greedy, batch 64,
   prompts padded once to the longest), against the same loop uncompiled: compile seconds and
   milliseconds per decode step. It is not an engine: it is here to show whether one pays.
3. Training: ``effopd train`` (OPD, lr 1e-4, batch 64, ``--steps`` steps, evaluation on 200 test
   problems at the end) per engine and seed, in alternation: median s/step (first two steps
   dropped), the loss curve and the final accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

THREADS = 2


def sampling(prompts: int, repeats: int) -> dict:
    from effopd.data import embedded_splits
    from effopd.models import load_model, load_tokenizer
    from effopd.rollout import ENGINES, generate

    model, tok = load_model("embedded", "student"), load_tokenizer("embedded")
    batch = [e.prompt for e in embedded_splits()["train"][:prompts]]
    rows_per_forward: dict[str, list[int]] = {}
    first: dict[str, float] = {}
    for name in ENGINES:  # warm-up: lean-compiled compiles the forward in its first call
        torch.manual_seed(0)
        t0 = time.perf_counter()
        generate(model, tok, batch, max_new_tokens=48, keep_logprobs=True, backend=name)
        first[name] = time.perf_counter() - t0
        # the rows each forward decodes (lean-compiled runs the lean loop: counted on it, eagerly)
        seen: list[int] = []
        h = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
        torch.manual_seed(0)
        generate(model, tok, batch, max_new_tokens=48, keep_logprobs=True, backend="lean" if name == "lean-compiled" else name)
        h.remove()
        rows_per_forward[name] = seen
    times: dict[str, list[float]] = {name: [] for name in ENGINES}
    for i in range(repeats):
        for name in ENGINES:
            torch.manual_seed(i)
            t0 = time.perf_counter()
            generate(model, tok, batch, max_new_tokens=48, keep_logprobs=True, backend=name)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(ts), "runs_s": ts, "first_call_s": first[name],
                   "forwards": len(rows_per_forward[name]),
                   "rows_decoded": sum(rows_per_forward[name][1:])} for name, ts in times.items()}


def compiled_decode(prompts: int = 64, new: int = 48) -> dict:
    from transformers import StaticCache

    from effopd.data import embedded_splits
    from effopd.models import load_model, load_tokenizer

    model, tok = load_model("embedded", "student").eval(), load_tokenizer("embedded")
    enc = tok([e.prompt for e in embedded_splits()["train"][:prompts]], return_tensors="pt", padding=True, padding_side="left")
    B, P = enc["input_ids"].shape

    @torch.no_grad()
    def loop(forward) -> float:
        cache = StaticCache(config=model.config, max_cache_len=P + new)
        mask = torch.cat([enc["attention_mask"], torch.zeros(B, new, dtype=torch.long)], 1)
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=enc["input_ids"], attention_mask=mask[:, :P], position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
        tok_B, pos = out.logits[:, -1].argmax(-1), pos[:, -1:]
        t0 = time.perf_counter()
        for t in range(new - 1):
            mask[:, P + t] = 1
            pos = pos + 1
            out = forward(input_ids=tok_B[:, None], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            tok_B = out.logits[:, -1].argmax(-1)
        return (time.perf_counter() - t0) / (new - 1) * 1000

    eager = [loop(model) for _ in range(3)]
    compiled = torch.compile(model.forward, dynamic=False)
    t0 = time.perf_counter()
    loop(compiled)
    first = time.perf_counter() - t0
    again = [loop(compiled) for _ in range(3)]
    return {"batch": B, "eager_ms_per_step": statistics.median(eager), "compiled_ms_per_step": statistics.median(again),
            "first_compiled_loop_s": first}


def train_run(backend: str, seed: int, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "effopd.cli", "train", "--run-dir", f"{d}/run", "--no-progress", f"train.steps={steps}",
               "train.eval_every=0", f"train.save_every={steps}", "data.eval_limit=200", "optim.lr=1e-4",
               f"train.seed={seed}", "train.mixed_precision=no", "train.device=cpu", f"rollout.backend={backend}"]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        rows = [json.loads(x) for x in Path(f"{d}/run/metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if r.get("step", 0) > 0 and "time/step" in r]
    return {"s_per_step": statistics.median(r["time/step"] for r in steps_rows if r["step"] > 2),
            "first_step_s": steps_rows[0]["time/step"],
            "rollout_s": statistics.median(r["time/rollout"] for r in steps_rows if r["step"] > 2),
            "loss": [r["train/loss"] for r in steps_rows], "final_accuracy": rows[-1].get("eval/accuracy")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="also time a compiled static-cache decode step (minutes)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--train-backends", nargs="+", default=["hf", "lean", "lean-compiled"])
    ns = ap.parse_args()
    torch.set_num_threads(THREADS)
    result: dict = {"machine": f"{os.cpu_count()} CPUs, {THREADS} torch threads", "sampling": {}, "train": {}}
    for p in ns.prompts:
        result["sampling"][p] = sampling(p, ns.repeats)
        print(f"sampling {p} prompts:", {k: round(v["median_s"], 3) for k, v in result["sampling"][p].items()}, flush=True)
    if ns.compile:
        result["compiled_decode"] = compiled_decode()
        print("compiled decode:", result["compiled_decode"], flush=True)
    for seed in ns.seeds:
        for backend in ns.train_backends:
            r = train_run(backend, seed, ns.steps)
            result["train"].setdefault(backend, []).append({"seed": seed, **r})
            print(f"train {backend} seed {seed}: {r['s_per_step']:.3f} s/step, final accuracy {r['final_accuracy']}", flush=True)
    result["median_s_per_step"] = {b: statistics.median(r["s_per_step"] for r in rs) for b, rs in result["train"].items()}
    ns.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
