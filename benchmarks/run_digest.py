"""Fingerprint of short training runs: the SHA-256 of the final weights and of every logged
metric except wall-clock timings, for a 3-step OPD + EffOPD run and a 3-step GRPO run on the
embedded default (CPU, 2 threads).

Two versions of the trainer that print the same digests train bitwise identically on this
machine. Used to check that a change to the loop changes no run:

    git stash; python benchmarks/run_digest.py --out before.json; git stash pop
    python benchmarks/run_digest.py --out after.json; diff before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

RUNS = {
    "opd-effopd": ["--preset", "opd-effopd", "train.steps=3", "rollout.batch_size=16", "extrapolate.val_prompts=16",
                   "data.eval_limit=32", "train.eval_every=2", "train.save_every=3"],
    "grpo": ["--preset", "grpo", "train.steps=3", "rollout.batch_size=4", "data.eval_limit=32", "train.eval_every=2",
             "train.save_every=3"],
}


def _digest(run_dir: Path) -> dict:
    weights = run_dir / "checkpoints" / "step-3" / "model.safetensors"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kept = [{k: v for k, v in r.items() if not k.startswith("time/") and not k.endswith("seconds")} for r in rows]
    text = json.dumps(kept, sort_keys=True)
    return {"weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "metrics_sha256": hashlib.sha256(text.encode()).hexdigest(), "metrics": kept}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--out", type=Path, required=True, help="write the digests here (JSON)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides added to every run")
    args = p.parse_args()
    from effopd.cli import main as effopd

    torch.set_num_threads(2)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            run_dir = Path(tmp) / name
            rc = effopd(["train", "--run-dir", str(run_dir), "--no-progress", *RUNS[name], *args.set])
            if rc:
                print(f"run {name} failed with exit code {rc}", file=sys.stderr)
                return rc
            out[name] = _digest(run_dir)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for name, d in out.items():
        print(f"{name}: weights {d['weights_sha256'][:16]}  metrics {d['metrics_sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
