"""OPD vs OPD+EffOPD on the embedded default: steps and wall-clock to the same accuracy.

    python benchmarks/effopd_speedup.py --seeds 0 1 2 --name lr1e-4 optim.lr=1e-4 \
        --effopd extrapolate.schedule=adaptive

For each seed it trains plain OPD and OPD+EffOPD with the same config and budget (the EffOPD
run adds ``extrapolate.enabled=true`` plus the ``--effopd`` overrides), evaluating every
``train.eval_every`` steps on the 1,000-problem test split (greedy). It reports:

- steps to reach 50%, 80% and 95% of plain OPD's final accuracy (per seed, median, speedup);
- wall-clock to the same targets, EffOPD's validation/extrapolation time included, and the ratio;
- final accuracy of both (mean and spread);
- the regime of the plain run, from its checkpoints: update-to-weight norm ratio, median
  effective rank of the updates (and as a fraction of the width), and the |cos| between the top
  update direction at ~10% of training and at the end (median over modules).

Results go to ``benchmarks/results/effopd_<name>.json``; a markdown summary is printed.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from effopd.analysis import analyze
from effopd.analysis.io import list_checkpoints
from effopd.config import load_config
from effopd.demo import first_reaching
from effopd.metrics import read_metrics
from effopd.models import resolve
from effopd.train import train
from effopd.utils import median, write_json

HERE = Path(__file__).resolve().parent
FRACTIONS = (0.5, 0.8, 0.95)


def curve_of(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """eval accuracy per step, and cumulative wall seconds at the end of each step."""
    acc, wall, total = {}, {}, 0.0
    for r in read_metrics(run_dir / "metrics.jsonl")[0]:
        total += r.get("time/step", 0.0)
        wall[r["step"]] = total
        if "eval/accuracy" in r:
            acc[r["step"]] = r["eval/accuracy"]
    return acc, wall



def regime(run_dir: Path, base: str, out: Path) -> dict:
    ckpts = list_checkpoints(run_dir / "checkpoints")
    rec = analyze(resolve(base, "student"), ckpts, out, overwrite=True, progress=False)
    steps = rec["steps"]
    final_i = len(steps) - 1
    early_i = next(i for i, s in enumerate(steps) if s >= 0.1 * steps[-1])
    mods = rec["spectrum"]["per_module"]
    rel = [m["rel"][final_i] for m in rec["magnitude"]["per_module"].values() if m["rel"][final_i] is not None]
    er = [m["effective_rank"][final_i] for m in mods.values() if m["effective_rank"][final_i] is not None]
    erf = [m["effective_rank_frac"][final_i] for m in mods.values() if m["effective_rank_frac"][final_i] is not None]
    cos = [m["u1_cos"][early_i] for m in rec["alignment"]["per_module"].values() if m["u1_cos"][early_i] is not None]
    return {
        "early_step": steps[early_i], "final_step": steps[final_i],
        "median_update_to_weight": median(rel), "median_effective_rank": median(er),
        "median_effective_rank_frac": median(erf), "median_u1_cos_early_vs_final": median(cos),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="label of this setting")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-effopd"))
    ap.add_argument("--effopd", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for the EffOPD run only")
    ap.add_argument("--no-regime", action="store_true", help="skip the checkpoint analysis of the plain runs")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for both runs")
    args = ap.parse_args()

    per_seed = []
    for seed in args.seeds:
        row = {"seed": seed}
        for kind, extra in (("plain", []), ("effopd", ["extrapolate.enabled=true", *args.effopd])):
            run_dir = args.runs / args.name / f"{kind}-seed{seed}"
            cfg = load_config([], [*args.overrides, *extra, f"train.seed={seed}"])
            if not (run_dir / "checkpoints" / f"step-{cfg.train.steps}").exists():
                train(cfg, run_dir, overwrite=True, progress=False)
            acc, wall = curve_of(run_dir)
            row[kind] = {"curve": acc, "final": acc[max(acc)], "wall": wall}
        final_plain = row["plain"]["final"]
        for kind in ("plain", "effopd"):
            r = row[kind]
            r["steps_to"] = {f: first_reaching(r["curve"], f * final_plain) for f in FRACTIONS}
            r["wall_to"] = {f: (r["wall"][s] if s is not None else None) for f, s in r["steps_to"].items()}
            del r["wall"]
        if not args.no_regime:
            row["regime"] = regime(args.runs / args.name / f"plain-seed{seed}", cfg.model.student,
                                   args.runs / args.name / f"analysis-seed{seed}")
        per_seed.append(row)

    summary = {"name": args.name, "overrides": args.overrides, "effopd_overrides": args.effopd, "seeds": per_seed}
    write_json(HERE / "results" / f"effopd_{args.name}.json", summary, indent=1)

    print(f"## {args.name}: {' '.join(args.overrides)} | EffOPD: {' '.join(args.effopd)}\n")
    print("| target (of plain final) | plain steps (per seed) | EffOPD steps (per seed) | step speedup (median) | wall speedup (median) |")
    print("|---|---|---|---|---|")
    for f in FRACTIONS:
        ps = [r["plain"]["steps_to"][f] for r in per_seed]
        es = [r["effopd"]["steps_to"][f] for r in per_seed]
        pw = [r["plain"]["wall_to"][f] for r in per_seed]
        ew = [r["effopd"]["wall_to"][f] for r in per_seed]
        sp = median([p / e for p, e in zip(ps, es) if p and e])
        wp = median([p / e for p, e in zip(pw, ew) if p and e])
        print(f"| {f:.0%} | {ps} | {es} | {sp and f'{sp:.2f}x'} | {wp and f'{wp:.2f}x'} |")
    for kind in ("plain", "effopd"):
        finals = [r[kind]["final"] for r in per_seed]
        print(f"\nfinal accuracy {kind}: mean {statistics.mean(finals):.1%}, range {min(finals):.1%}–{max(finals):.1%}")
    if not args.no_regime:
        for key in ("median_update_to_weight", "median_effective_rank", "median_effective_rank_frac", "median_u1_cos_early_vs_final"):
            print(f"regime {key}: " + ", ".join(f"{r['regime'][key]:.3f}" for r in per_seed))


if __name__ == "__main__":
    main()
