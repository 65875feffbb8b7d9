"""Seconds per step: effopd's OPD loop against TRL's DistillationTrainer on the same models.

    python benchmarks/vs_trl.py --out benchmarks/results/vs_trl.json

Both train the shipped embedded student against the shipped teacher (fp32, CPU, 2 torch threads,
no gradient checkpointing, no evaluation or checkpoints): on-policy, reverse KL (TRL ``beta=1``),
one completion per prompt, at most 48 new tokens, temperature 1, lr 1e-4, ``--steps`` steps.
effopd runs with its defaults otherwise (``train.score_buckets=2``, ``train.update_buckets=2``),
once per sampling engine in ``--backends`` (``rollout.backend``: ``lean``, the default, and ``hf``).
Runs alternate TRL / effopd (each backend), ``--repeats`` times per batch size; each run's first
two steps are dropped and its median step time kept. A step is timed from its start to its end: sampling,
teacher scoring and the update (TRL: ``on_step_begin`` to ``on_step_end``; effopd: ``time/step``).
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

ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def trl_run(batch: int, steps: int) -> float:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from effopd.data import embedded_splits
    from effopd.models import load_model, load_tokenizer

    torch.set_num_threads(2)
    times = []

    class Clock(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    rows = [{"prompt": e.prompt} for e in embedded_splits()["train"][: batch * steps]]
    with tempfile.TemporaryDirectory() as d:
        args = DistillationConfig(output_dir=d, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                                  max_completion_length=48, temperature=1.0, beta=1.0, bf16=False, use_cpu=True,
                                  gradient_checkpointing=False, logging_steps=steps, save_strategy="no", report_to="none",
                                  disable_tqdm=True, seed=0)
        DistillationTrainer(model=load_model("embedded", "student"), teacher_model=load_model("embedded", "teacher"),
                            args=args, processing_class=load_tokenizer("embedded"),
                            train_dataset=datasets.Dataset.from_list(rows), callbacks=[Clock()]).train()
    return statistics.median(times[2:])


def effopd_run(batch: int, steps: int, backend: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "effopd.cli", "train", "--run-dir", f"{d}/run", "--no-progress", f"train.steps={steps}",
               "train.eval_every=0", f"train.save_every={steps}", "data.eval_limit=8", f"rollout.batch_size={batch}",
               "rollout.n=1", "rollout.max_new_tokens=48", "optim.lr=1e-4", "train.mixed_precision=no", "train.device=cpu",
               f"rollout.backend={backend}"]
        subprocess.run(cmd, check=True, env=ENV, capture_output=True)
        rows = [json.loads(x) for x in Path(f"{d}/run/metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["time/step"] for r in rows if "time/step" in r and r["step"] > 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", nargs="+", default=["lean", "hf"], choices=["lean", "hf"],
                    help="effopd's sampling engines to time (the first is the headline)")
    ap.add_argument("--one", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.one == "trl":  # a TRL run in its own process, like effopd's
        print(json.dumps(trl_run(ns.batch, ns.steps)))
        return
    result = {"machine": f"{os.cpu_count()} CPUs, 2 torch threads", "steps": ns.steps, "backends": ns.backends, "runs": {}}
    for b in ns.batches:
        pairs = []
        for _ in range(ns.repeats):
            out = subprocess.run([sys.executable, __file__, "--out", "-", "--one", "trl", "--batch", str(b),
                                  "--steps", str(ns.steps)], check=True, env=ENV, capture_output=True, text=True)
            t = json.loads(out.stdout.strip().splitlines()[-1])
            pair = {"trl": t}
            for be in ns.backends:
                pair[be] = effopd_run(b, ns.steps, be)
            pairs.append(pair)
            print(f"batch {b}: TRL {t:.3f} s/step, " + ", ".join(f"effopd {be} {pair[be]:.3f} s/step (TRL / it "
                  f"{t / pair[be]:.2f})" for be in ns.backends), flush=True)
        med = {k: statistics.median(p[k] for p in pairs) for k in ["trl", *ns.backends]}
        result["runs"][b] = {"pairs": pairs, "medians": med,
                             "trl_over": {be: med["trl"] / med[be] for be in ns.backends},
                             "trl_over_range": {be: [min(p["trl"] / p[be] for p in pairs), max(p["trl"] / p[be] for p in pairs)]
                                                for be in ns.backends}}
    ns.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({b: {k: v for k, v in r.items() if k != "pairs"} for b, r in result["runs"].items()}, indent=1))


if __name__ == "__main__":
    main()
