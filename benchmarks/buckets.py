"""Seconds per step with and without length buckets: ``train.score_buckets`` (teacher scoring) or
``train.update_buckets`` (the update's forward and backward).

    python benchmarks/buckets.py --key train.score_buckets --out benchmarks/results/buckets_score.json
    python benchmarks/buckets.py --key train.update_buckets --out benchmarks/results/buckets_update.json
    python benchmarks/buckets.py --out benchmarks/results/pack_update.json \
        --variants "train.update_buckets=1" "train.update_buckets=2" "train.pack=true train.update_buckets=1"

``--variants``: each a space-separated list of overrides, in place of ``--key``/``--buckets``
(``train.pack=true`` packs the update's rows, padding none).

OPD on the embedded default (64 prompts per step, ≤ 48 new tokens, one torch thread), runs of
``--steps`` steps for each value, interleaved ``--repeats`` times; the first two steps of each
run are dropped. Reports the median ``time/score``, ``time/update`` and ``time/step`` per value.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(overrides: list[str], steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "effopd.cli", "train", "--run-dir", f"{d}/run", "--no-progress", f"train.steps={steps}",
               "train.eval_every=0", f"train.save_every={steps}", "data.eval_limit=50", *overrides]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        rows = [json.loads(x) for x in Path(f"{d}/run/metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step" in r][2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--key", default="train.score_buckets", choices=["train.score_buckets", "train.update_buckets"])
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", nargs="+", help="override lists to compare, e.g. 'train.pack=true train.update_buckets=1'")
    ns = ap.parse_args()
    variants = ns.variants or [f"{ns.key}={b}" for b in ns.buckets]
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(ns.repeats):
        for v in variants:
            rows[v] += run(v.split(), ns.steps)
    out = {b: {f"{k}_s": statistics.median(r[f"time/{k}"] for r in rs) for k in ("score", "update", "step")} | {"steps": len(rs)}
           for b, rs in rows.items()}
    ns.out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "median": out}, indent=1))
    for b, m in out.items():
        print(f"{b}: scoring {m['score_s'] * 1000:.0f} ms, update {m['update_s'] * 1000:.0f} ms, "
              f"step {m['step_s']:.3f} s ({m['steps']} steps)")


if __name__ == "__main__":
    main()
