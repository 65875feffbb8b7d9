"""OPD against its baselines on the embedded default, at one budget, seen through the weights.

    python benchmarks/compare_methods.py --seeds 0 1 2 --jobs 2

Every variant is a shipped preset (``effopd train --preset NAME``) plus optional overrides; all
share the budget of the presets: 100 updates of 64 sequences each (GRPO/DAPO: 8 prompts x 8),
lr 1e-5, evaluated greedily on the 1,000-problem test split every 10 steps. Runs execute as
``--jobs`` parallel processes with one thread each (so their wall-clocks are comparable to each
other, not to a single 2-thread run). Each run's checkpoints are then analysed (no evaluations;
``--eval-analysis`` adds the model-evaluating analyses, weight scaling included, for seed 0 of the
given variants). Finished runs and analyses are reused.

Results go to ``benchmarks/results/compare_methods.json``; a markdown summary is printed:
accuracy vs steps and vs wall-clock per method (median over seeds), and the four weight-space
properties (update norm, concentration, effective rank and lock-in, scaling recovery).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from effopd.demo import first_reaching
from effopd.metrics import read_metrics
from effopd.utils import median, write_json

HERE = Path(__file__).resolve().parent
VARIANTS = {  # label: (preset, extra overrides)
    "opd": ("opd", []),
    "opd-effopd": ("opd-effopd", []),
    "grpo": ("grpo", []),
    "grpo-lr5e-5": ("grpo", ["optim.lr=5e-5"]),
    "dapo": ("dapo", []),
    "sft": ("sft", []),
    "sft-gt": ("sft-gt", []),
}
EFFOPD = [sys.executable, "-m", "effopd.cli"]


def run_cmd(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {rc}; see {log}")


def train_job(run_dir: Path, preset: str, extra: list[str], seed: int):
    cfg_steps = 100
    if (run_dir / "checkpoints" / f"step-{cfg_steps}").exists():
        return
    run_cmd([*EFFOPD, "train", "--preset", preset, "--run-dir", str(run_dir), "--overwrite", "--no-progress",
             f"train.seed={seed}", *extra], run_dir.with_suffix(".train.log"))


def analysis_job(run_dir: Path, with_eval: bool, eval_limit: int):
    out = run_dir / ("analysis-eval" if with_eval else "analysis")
    if (out / "analysis.json").exists():
        return
    cmd = [*EFFOPD, "analyze", "--base", "embedded", "--checkpoints", str(run_dir / "checkpoints"), "--out", str(out), "--overwrite"]
    cmd += ["--eval-limit", str(eval_limit)] if with_eval else ["--no-eval"]
    run_cmd(cmd, out.with_suffix(".log"))


def curve_of(run_dir: Path) -> tuple[dict[int, float], dict[int, float], list[float]]:
    """eval accuracy per step, cumulative training seconds at each step, seconds per step."""
    acc, wall, per_step, total = {}, {}, [], 0.0
    for r in read_metrics(run_dir / "metrics.jsonl")[0]:
        if r["step"] > 0:
            total += r.get("time/step", 0.0)
            per_step.append(r.get("time/step", 0.0))
        wall[r["step"]] = total
        if "eval/accuracy" in r:
            acc[r["step"]] = r["eval/accuracy"]
    return acc, wall, per_step



def weight_properties(analysis: dict) -> dict:
    """The four properties' numbers from one analysis.json (final checkpoint unless noted)."""
    steps = analysis["steps"]
    mag = analysis["magnitude"]
    selected = analysis["groups"]["selected"]
    shares = sorted((mag["per_module"][n]["share"][-1] or 0.0 for n in selected), reverse=True)
    total = sum(shares)
    cum, n80 = 0.0, 0
    for s in shares:
        cum, n80 = cum + s, n80 + 1
        if cum >= 0.8 * total:
            break
    top_quarter = sum(shares[: max(1, len(shares) // 4)]) / total if total else None
    spec = analysis["spectrum"]["summary"]
    align = analysis["alignment"]["summary"]
    by_type = {t: v["share"][-1] for t, v in mag["by_type"].items()}
    out = {
        "steps": steps,
        "total_norm": mag["total_norm"],
        "selected_norm_final": mag["selected_norm"][-1],
        "modules_for_80pct_energy": n80, "modules": len(shares),
        "top_quarter_energy_share": top_quarter,
        "type_share_final": by_type,
        "effective_rank_frac": spec["effective_rank_frac"],
        "mean_overlap": align["mean_overlap"],
        "mean_u1_cos": align["mean_u1_cos"],
        "median_lock_in_step": align.get("median_lock_in_step"),
    }
    return out


def scaling_of(analysis: dict) -> list[dict] | None:
    ev = analysis.get("eval", {})
    if not ev.get("ran"):
        return None
    return [{"step": r["step"], "alpha": r["alpha"], "accuracy": r["metrics"]["accuracy"], "recovery": r["recovery"]}
            for r in ev["scaling"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-methods"))
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (one thread each)")
    ap.add_argument("--eval-analysis", nargs="*", default=["opd", "grpo-lr5e-5"],
                    help="variants whose seed-0 run also gets the evaluating analyses (weight scaling)")
    ap.add_argument("--eval-limit", type=int, default=300)
    ap.add_argument("--teacher-accuracy", type=float, default=0.983, help="greedy test accuracy of the teacher")
    args = ap.parse_args()

    runs = {(v, s): args.runs / f"{v}-seed{s}" for v in args.variants for s in args.seeds}
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda kv: train_job(kv[1], *VARIANTS[kv[0][0]], kv[0][1]), runs.items()))
        jobs = [(d, False) for d in runs.values()]
        jobs += [(runs[(v, args.seeds[0])], True) for v in args.eval_analysis if (v, args.seeds[0]) in runs]
        list(pool.map(lambda j: analysis_job(j[0], j[1], args.eval_limit), jobs))

    results = {}
    for v in args.variants:
        rows = []
        for s in args.seeds:
            d = runs[(v, s)]
            acc, wall, per_step = curve_of(d)
            row = {"seed": s, "curve": acc, "wall": {k: wall[k] for k in acc}, "final": acc[max(acc)],
                   "sec_per_step_median": median(per_step)}
            row["weights"] = weight_properties(json.loads((d / "analysis" / "analysis.json").read_text()))
            if (d / "analysis-eval" / "analysis.json").exists():
                row["scaling"] = scaling_of(json.loads((d / "analysis-eval" / "analysis.json").read_text()))
            rows.append(row)
        results[v] = rows
    write_json(HERE / "results" / "compare_methods.json",
               {"seeds": args.seeds, "variants": {v: VARIANTS[v] for v in args.variants},
                "teacher_accuracy": args.teacher_accuracy, "results": results}, indent=1)
    print_summary(results, args.teacher_accuracy)


def print_summary(results: dict, teacher: float) -> None:
    steps = sorted(next(iter(results.values()))[0]["curve"])
    print("## Accuracy (greedy, 1,000 test problems), median over seeds\n")
    print("| method | " + " | ".join(f"step {s}" for s in steps) + " | final (per seed) | s/step |")
    print("|---|" + "---|" * (len(steps) + 2))
    for v, rows in results.items():
        cells = [f"{median([r['curve'].get(s) for r in rows]):.1%}" for s in steps]
        finals = ", ".join(f"{r['final']:.1%}" for r in rows)
        print(f"| {v} | " + " | ".join(cells) + f" | {finals} | {median([r['sec_per_step_median'] for r in rows]):.2f} |")
    for frac in (0.8, 0.9):
        target = frac * teacher
        print(f"\n## Steps and training seconds to {frac:.0%} of the teacher ({target:.1%}), per seed\n")
        print("| method | steps | seconds | update norm ‖Δθ‖ then (median) | final ‖Δθ‖ (median) |")
        print("|---|---|---|---|---|")
        for v, rows in results.items():
            hit = [first_reaching(r["curve"], target) for r in rows]
            secs = [r["wall"].get(h) if h is not None else None for r, h in zip(rows, hit)]
            norms_at = []
            for r, h in zip(rows, hit):
                w = r["weights"]
                norms_at.append(w["total_norm"][w["steps"].index(h)] if h in w["steps"] else None)
            print(f"| {v} | {hit} | {[round(s) if s else None for s in secs]} | "
                  f"{median(norms_at) and f'{median(norms_at):.3f}'} | {median([r['weights']['total_norm'][-1] for r in rows]):.3f} |")
    print("\n## Weight-space properties (final checkpoint, median over seeds)\n")
    print("| method | modules holding 80% of ‖Δθ‖² | top-quarter share | eff. rank / width | overlap step 10→final (top-8) | u1 cos step 10 | median lock-in step |")
    print("|---|---|---|---|---|---|---|")
    for v, rows in results.items():
        w = [r["weights"] for r in rows]
        print(f"| {v} | {median([x['modules_for_80pct_energy'] for x in w]):g} of {w[0]['modules']} | "
              f"{median([x['top_quarter_energy_share'] for x in w]):.3f} | {median([x['effective_rank_frac'][-1] for x in w]):.3f} | "
              f"{median([x['mean_overlap'][0] for x in w]):.3f} | {median([x['mean_u1_cos'][0] for x in w]):.3f} | "
              f"{median([x['median_lock_in_step'] for x in w])} |")
    for v, rows in results.items():
        sc = rows[0].get("scaling")
        if sc:
            print(f"\n{v} seed {rows[0]['seed']} weight scaling (early checkpoint θ0 + α·Δθ_t): " + "; ".join(
                f"step {x['step']} α={x['alpha']}: {x['accuracy']:.1%} (recovery {x['recovery']:.2f})" for x in sc
                if x["recovery"] is not None))


if __name__ == "__main__":
    main()
