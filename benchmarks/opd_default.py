"""OPD on the embedded default, several seeds: accuracy vs step, time per step and where it goes.

    python benchmarks/opd_default.py --seeds 0 1 2 [KEY=VALUE ...]

Writes ``benchmarks/results/opd_default.json`` and prints a markdown table for RESULTS.md.
Runs are stored as ``RUNS/plain-seed{N}``; an existing finished run is summarised, not retrained.
Each seed changes the training stream (prompt order, sampling); the evaluation set (1,000 test
problems, greedy) is the same for all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from effopd.config import load_config
from effopd.data import load_split
from effopd.evaluate import evaluate_model
from effopd.metrics import read_metrics
from effopd.models import load_model, load_tokenizer
from effopd.train import train
from effopd.utils import median, write_json

HERE = Path(__file__).resolve().parent


def run_seed(seed: int, overrides: list[str], root: Path) -> dict:
    cfg = load_config([], [*overrides, f"train.seed={seed}"])
    run_dir = root / f"plain-seed{seed}"  # the same layout as effopd_speedup.py: its plain runs are reused
    if not (run_dir / "checkpoints" / f"step-{cfg.train.steps}").exists():
        train(cfg, run_dir, overwrite=True, progress=False)
    rows, _ = read_metrics(run_dir / "metrics.jsonl")
    wall = sum(r.get("time/step", 0.0) for r in rows)
    curve = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    steps = [r for r in rows if "time/step" in r]
    return {
        "seed": seed, "wall_s": wall, "curve": curve,
        "median_s": {k: median(r.get(f"time/{k}") for r in steps) for k in ("step", "rollout", "score", "update")},
        "final_reward": steps[-1]["train/reward"], "final_length": steps[-1]["train/response_length"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-opd"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "opd_default.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cfg = load_config([], args.overrides)
    teacher = evaluate_model(
        load_model(cfg.model.teacher, "teacher"), load_tokenizer(cfg.model.teacher, "teacher"),
        load_split(cfg.data.eval, cfg.data, "eval"), max_new_tokens=cfg.eval.max_new_tokens,
    )["accuracy"]
    results = [run_seed(s, args.overrides, args.runs) for s in args.seeds]
    target = 0.8 * teacher
    for r in results:
        reached = [s for s, a in sorted(r["curve"].items()) if a >= target]
        r["step_to_80pct_teacher"] = reached[0] if reached else None
    out = {"teacher_accuracy": teacher, "overrides": args.overrides, "runs": results}
    write_json(args.out, out, indent=1)

    steps = sorted(results[0]["curve"])
    print(f"teacher greedy accuracy {teacher:.1%}; 80% of it = {target:.1%}\n")
    print("| step | " + " | ".join(f"seed {r['seed']}" for r in results) + " | median |")
    print("|---" * (len(results) + 2) + "|")
    for s in steps:
        accs = [r["curve"][s] for r in results]
        print(f"| {s} | " + " | ".join(f"{a:.1%}" for a in accs) + f" | {median(accs):.1%} |")
    print("\nstep reaching 80% of teacher:", [r["step_to_80pct_teacher"] for r in results])
    for k in ("step", "rollout", "score", "update"):
        print(f"median seconds/{k}: " + ", ".join(f"{r['median_s'][k]:.3f}" for r in results))
    print("training seconds per run (sum of time/step):", [round(r["wall_s"]) for r in results])


if __name__ == "__main__":
    main()
