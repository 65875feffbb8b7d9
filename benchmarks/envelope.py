"""EffOPD against the best-tuned plain OPD: steps and wall-clock to accuracy targets, per lr.

    # the runs (resumable: a finished run is skipped; two at a time, one thread each)
    python benchmarks/envelope.py run --testbed embedded --methods plain --lrs 3e-6 1e-5 3e-5 1e-4 3e-4
    python benchmarks/envelope.py run --testbed embedded --grid paper:1e-4,3e-5 --grid expo:1e-5
    # the tables (markdown), from whatever has finished
    python benchmarks/envelope.py table --testbed embedded

A run is (testbed, method, lr, seed): ``train.steps`` updates (40 by default) with greedy
evaluation on the 1,000-problem test split every ``--eval-every`` steps (2). Each finished run
is reduced to ``benchmarks/results/envelope/<testbed>/<method>-lr<lr>-s<seed>.json`` (accuracy
curve, cumulative training seconds per step with EffOPD's validation included and evaluation
excluded, EffOPD's searches, and for plain runs the regime of the update from its checkpoints);
its run folder is then deleted.

The envelope of a target is, over the plain runs' lrs, the smallest median (over seeds) number
of steps to reach it. Every method's best lr is compared with it: ratio = envelope steps ÷ the
method's steps (> 1: the method is faster than the best plain run), with the per-seed spread.

Methods (see ``METHODS``): ``plain``; the controller's schedules ``paper``, ``adaptive``,
``lookahead`` (every 4 steps), ``rank1``; ``paper-paired`` (paired acceptance, one standard error
of the per-prompt differences); and ``expo``, the post-hoc
baseline: the plain run's weights at each evaluation step extrapolated from the init by the
factor that scores best on the validation prompts (training itself unchanged).

Testbeds: ``embedded`` (the shipped student and teacher) and ``separate`` (a half-width student
pre-trained apart from the teacher, on the 3-operation task), built once by
``effopd bootstrap --separate --out runs/testbed-separate``; ``separate-seen`` (the same kind of
student, its corpus 1-3 operations half worked, on the embedded task), built by
``python benchmarks/envelope.py build-seen``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "envelope"
#: Absolute accuracy targets per testbed, set from the plain runs alone: from well above the
#: student's start to just under the best plain run's plateau (separate-seen: 45% -> ~75%).
TARGETS = {"embedded": (0.5, 0.8, 0.9, 0.92, 0.94), "separate": (0.5, 0.8, 0.9, 0.92, 0.94),
           "separate-seen": (0.6, 0.65, 0.7, 0.72, 0.74)}
#: Steps at which the post-hoc baseline is evaluated (each costs a search and a test evaluation).
EXPO_STEPS = (2, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 36, 40)
SEEDS = (10, 11, 12)
#: The sampling engine of every run (the one the first grids were recorded with).
BACKEND = "hf"

EFFOPD = ["extrapolate.enabled=true"]
BEST, PAIRED = ["extrapolate.accept=best", "extrapolate.margin=0"], ["extrapolate.accept=paired", "extrapolate.margin=1"]
METHODS = {  # every rule spelled out, so that a change of the defaults does not change a method
    "plain": [],
    "paper": [*EFFOPD, "extrapolate.schedule=paper", *BEST],
    "adaptive": [*EFFOPD, "extrapolate.schedule=adaptive", *BEST],
    "paper-paired": [*EFFOPD, "extrapolate.schedule=paper", *PAIRED],
    "lookahead": [*EFFOPD, "extrapolate.schedule=lookahead", "extrapolate.trigger_steps=[4,8,12,16,20,24,28,32,36]", *BEST],
    "rank1": [*EFFOPD, "extrapolate.schedule=rank1", *BEST],
    "rank1-paired": [*EFFOPD, "extrapolate.schedule=rank1", *PAIRED],
    "expo": [],  # post-hoc on the plain run's checkpoints (see expo_curve)
}

#: Where each testbed's models come from: overrides added to every run.
SEPARATE = HERE.parent / "runs" / "testbed-separate"
TESTBEDS = {
    "embedded": [],
    "separate": [f"model.student={SEPARATE}/student", f"model.teacher={SEPARATE}/teacher",
                 "data.task_min_ops=3", "data.task_max_ops=3"],
    "separate-seen": [f"model.student={SEPARATE}-seen/student", f"model.teacher={SEPARATE}-seen/teacher"],
}


def cmd_build_seen(args) -> None:
    """The ``separate-seen`` testbed: the half-width student pre-trained apart from the teacher,
    on 1-3 operations half worked out, for the embedded task itself (2-3 operations)."""
    from effopd.bootstrap import SeparateConfig, SFTStage, bootstrap_separate, summary
    from effopd.data.task import TaskSpec
    from effopd.models import resolve

    cfg = SeparateConfig(task=TaskSpec(2, 3, 2), student=SFTStage(steps=2000, lr=2e-3, worked_frac=0.5, min_ops=1, max_ops=3))
    print(summary(bootstrap_separate(f"{SEPARATE}-seen", cfg, resolve("embedded", "teacher"))))


def run_name(method: str, lr: str, seed: int) -> str:
    return f"{method}-lr{lr}-s{seed}"


def common(args) -> list[str]:
    return [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", f"train.save_every={args.steps}",
            f"rollout.backend={BACKEND}"]


def reduce_run(run_dir: Path) -> dict:
    """Accuracy per evaluated step, cumulative training seconds per step, the searches."""
    from effopd.metrics import read_metrics

    acc, wall, searches, total = {}, {}, [], 0.0
    for r in read_metrics(run_dir / "metrics.jsonl")[0]:
        if r.get("step", 0) > 0:
            total += r.get("time/step", 0.0)
            wall[r["step"]] = round(total, 3)
        if "eval/accuracy" in r:
            acc[r["step"]] = r["eval/accuracy"]
        if "extrapolate/accepted_c" in r:
            searches.append({"step": r["step"], "accepted_c": r["extrapolate/accepted_c"], "s0": r["extrapolate/s0"],
                             "best": r["extrapolate/best"], "seconds": round(r["extrapolate/seconds"], 2)})
    return {"curve": acc, "wall": wall, "searches": searches}


def regime(run_dir: Path, student: str) -> dict:
    """Update-to-weight ratio, effective-rank fraction and early/late |cos| of the run's update."""
    from effopd.analysis import analyze
    from effopd.analysis.io import list_checkpoints
    from effopd.models import resolve
    from effopd.utils import median

    ckpts = list_checkpoints(run_dir / "checkpoints")
    rec = analyze(resolve(student, "student"), ckpts, run_dir / "analysis", overwrite=True, progress=False)
    steps, final = rec["steps"], len(rec["steps"]) - 1
    early = next(i for i, s in enumerate(steps) if s >= 0.1 * steps[-1])

    def med(section, key, i):
        return median([m[key][i] for m in rec[section]["per_module"].values() if m[key][i] is not None])

    return {"early_step": steps[early], "final_step": steps[final],
            "update_to_weight": med("magnitude", "rel", final),
            "effective_rank_frac": med("spectrum", "effective_rank_frac", final),
            "u1_cos_early_vs_final": med("alignment", "u1_cos", early)}


def one_run(testbed: str, method: str, lr: str, seed: int, args) -> str:
    out = RESULTS / testbed / f"{run_name(method, lr, seed)}.json"
    if out.exists():
        return f"{out.name}: done before"
    run_dir = Path(args.runs) / testbed / run_name(method, lr, seed)
    lock = Path(args.runs) / testbed / f"{run_name(method, lr, seed)}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:  # another `run` in progress has it (a stale lock after a crash: delete the .lock file)
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return f"{out.name}: running elsewhere ({lock} exists)"
    try:
        return _one_run(testbed, method, lr, seed, args, out, run_dir)
    finally:
        lock.unlink(missing_ok=True)


def _one_run(testbed: str, method: str, lr: str, seed: int, args, out: Path, run_dir: Path) -> str:
    plain = method in ("plain", "expo")
    src = run_dir if method != "expo" else Path(args.runs) / testbed / run_name("plain", lr, seed)
    overrides = [*TESTBEDS[testbed], *common(args), f"optim.lr={lr}", f"train.seed={seed}", *METHODS[method]]
    if plain:  # checkpoints for the regime and for the post-hoc extrapolation
        overrides[overrides.index(f"train.save_every={args.steps}")] = f"train.save_every={args.eval_every}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if method != "expo" or not (src / "checkpoints").exists():
        cmd = [sys.executable, "-m", "effopd.cli", "train", "--preset", "opd", "--run-dir", str(src),
               "--overwrite", "--no-progress", *overrides]
        log = (Path(args.runs) / testbed / f"{src.name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if rc:
            return f"{out.name}: FAILED (rc {rc}, see {log})"
    if method == "expo":
        cmd = [sys.executable, str(Path(__file__)), "expo-curve", "--testbed", testbed, "--run-dir", str(src),
               "--out", str(out), "--threads", str(args.threads)]
        rc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        return f"{out.name}: {'ok' if rc.returncode == 0 else 'FAILED ' + rc.stderr[-2000:]}"
    rec = {"testbed": testbed, "method": method, "lr": float(lr), "seed": seed, "overrides": overrides, **reduce_run(run_dir)}
    if method == "plain":
        rec["regime"] = regime(run_dir, _run_config(run_dir).model.student)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1))
    if not args.keep and method != "plain":
        shutil.rmtree(run_dir, ignore_errors=True)
    return f"{out.name}: ok, final {rec['curve'][max(rec['curve'])]:.1%}"


def cmd_run(args) -> None:
    jobs = [(args.testbed, m, lr, s) for lr in args.lrs for m in args.methods for s in args.seeds]
    for spec in args.grid or []:  # METHOD:LR,LR,... in the order given, instead of methods x lrs
        method, _, lrs = spec.partition(":")
        if method not in METHODS or not lrs:
            raise SystemExit(f"--grid {spec!r}: write METHOD:LR[,LR...] with METHOD one of {', '.join(METHODS)}")
        jobs += [(args.testbed, method, lr, s) for lr in lrs.split(",") for s in args.seeds]
    if args.grid:
        jobs = jobs[len(args.lrs) * len(args.methods) * len(args.seeds):]
    with ThreadPoolExecutor(args.jobs) as pool:
        for msg in pool.map(lambda j: one_run(*j, args), jobs):
            print(msg, flush=True)


# ---- the post-hoc baseline ----------------------------------------------------------------

def cmd_expo_curve(args) -> None:
    """For each checkpoint of a plain run: θ0 + c(θt − θ0) with the validation-best c (the
    controller's ``expo`` schedule, whose anchor stays at the init), then the test accuracy."""
    import time

    import torch
    from safetensors.torch import load_file

    from effopd.analysis.io import list_checkpoints
    from effopd.data import load_split
    from effopd.evaluate import evaluate_model
    from effopd.extrapolate import EXPO_FACTORS
    from effopd.models import load_model, load_tokenizer, resolve
    from effopd.validation import make_extrapolator, prompt_scores, validation_scorer

    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    cfg = _run_config(run_dir)
    x = cfg.extrapolate
    tok = load_tokenizer(resolve(cfg.model.student, "student"))
    model = load_model(resolve(cfg.model.student, "student"), "student")
    val = load_split(cfg.data.val, cfg.data, "val")[: x.val_prompts]
    test = load_split(cfg.data.eval, cfg.data, "eval")
    ctl = make_extrapolator(model, x.modules, schedule="expo", max_tries=len(EXPO_FACTORS))
    base = {"curve": {}, "wall": {}, "searches": []}
    plain = reduce_run(run_dir)
    extra = 0.0
    ckpts = [(s, p) for s, p in list_checkpoints(run_dir / "checkpoints") if s in EXPO_STEPS]
    for step, path in [(0, None), *ckpts]:
        if path is not None:
            missing, unexpected = model.load_state_dict(load_file(Path(path) / "model.safetensors"), strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:  # only the tied head may be absent
                raise SystemExit(f"{path}: weights do not match the student ({unexpected[:3]} {missing[:3]})")
            t0 = time.time()
            rec = ctl.search(step, validation_scorer(lambda ex: prompt_scores(
                model, tok, ex, seed=x.val_seed + len(ctl.history), max_new_tokens=cfg.rollout.max_new_tokens,
                backend=BACKEND), val))
            extra += time.time() - t0
            base["searches"].append({"step": step, "accepted_c": rec.accepted_c, "s0": rec.s0, "best": rec.best})
        acc = evaluate_model(model, tok, test, max_new_tokens=cfg.eval.max_new_tokens, backend=BACKEND)["accuracy"]
        base["curve"][step] = acc
        base["wall"][step] = round(plain["wall"].get(step, 0.0) + extra, 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"testbed": args.testbed, "method": "expo", "lr": cfg.optim.lr, "seed": cfg.train.seed,
                               **base}, indent=1))


def _run_config(run_dir: Path):
    from effopd.config import load_config

    return load_config([run_dir / "config.yaml"])


# ---- tables --------------------------------------------------------------------------------

def load_results(testbed: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / testbed).glob("*.json"))]


def steps_to(curve: dict, target: float) -> int | None:
    return next((int(s) for s, a in sorted(curve.items(), key=lambda kv: int(kv[0])) if a >= target), None)


def wall_to(rec: dict, target: float) -> float | None:
    s = steps_to(rec["curve"], target)
    return None if s is None else (rec["wall"].get(str(s), rec["wall"].get(s)) if s else 0.0)


def med(xs: list) -> float | None:
    """Median where a run that never reached the target counts as infinitely slow."""
    if not xs:
        return None
    v = statistics.median([float("inf") if x is None else x for x in xs])
    return None if v == float("inf") else v


def cmd_table(args) -> None:
    recs = load_results(args.testbed)
    targets = TARGETS[args.testbed]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in recs:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    print(f"### Testbed `{args.testbed}`\n")
    print("Greedy test accuracy at a few steps (mean over seeds) and at the end of the budget (mean, range):\n")
    shown = (2, 4, 6, 10, 20, 40)
    print("| method | lr | seeds | " + " | ".join(f"acc@{s}" for s in shown) + " | final (range) |")
    print("|---|---|---|" + "---|" * len(shown) + "---|")
    for (m, lr), rs in sorted(groups.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1])):
        cells = []
        for s in shown:
            v = [r["curve"].get(str(s)) for r in rs if r["curve"].get(str(s)) is not None]
            cells.append(f"{statistics.mean(v):.1%}" if v else "–")
        fin = [r["curve"][max(r["curve"], key=int)] for r in rs]
        print(f"| {m} | {lr:g} | {len(rs)} | " + " | ".join(cells) + f" | {statistics.mean(fin):.1%} ({min(fin):.1%}–{max(fin):.1%}) |")

    print("\nSteps to each absolute accuracy target: median over seeds (per seed), `never` = not within the budget.\n")
    print("| method | lr | " + " | ".join(f"{t:.0%}" for t in targets) + " |")
    print("|---|---|" + "---|" * len(targets))
    for (m, lr), rs in sorted(groups.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1])):
        cells = []
        for t in targets:
            per = [steps_to(r["curve"], t) for r in rs]
            mv = med(per)
            cells.append(f"{'never' if mv is None else f'{mv:g}'} ({','.join('–' if p is None else str(p) for p in per)})")
        print(f"| {m} | {lr:g} | " + " | ".join(cells) + " |")

    for unit, fn in (("steps", lambda r, t: steps_to(r["curve"], t)), ("seconds", wall_to)):
        print(f"\nEnvelope ratio in {unit}: best plain lr's median ÷ the method's best lr's median (> 1: faster "
              f"than the best-tuned plain OPD); the method's lr in brackets; per-seed ratios against the envelope after it.\n")
        print("| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |")
        print("|---|" + "---|" * len(targets))
        best = {}
        for m in METHODS:
            lrs = [lr for (mm, lr) in groups if mm == m]
            row = []
            for t in targets:
                cands = [(med([fn(r, t) for r in groups[(m, lr)]]), lr) for lr in lrs]
                cands = [(v, lr) for v, lr in cands if v is not None]
                row.append(min(cands) if cands else None)
            best[m] = row
        env = best.get("plain")
        if not env:
            return
        for m, row in best.items():
            if not any(row):
                continue
            cells = []
            for t, b, e in zip(targets, row, env):
                if b is None:
                    cells.append("never")
                elif e is None:
                    cells.append(f"plain never; {b[0]:.4g} at lr {b[1]:g}")
                else:
                    per = [fn(r, t) for r in groups[(m, b[1])]]
                    spread = ",".join("–" if p is None else (f"{e[0] / p:.2f}" if p else "inf") for p in per)
                    ratio = e[0] / b[0] if b[0] else float("inf")
                    cells.append(f"{ratio:.2f}x (lr {b[1]:g}; {spread})")
            print(f"| {m} | " + " | ".join(cells) + " |")

    plains = [r for r in recs if r["method"] == "plain" and "regime" in r]
    if plains:
        print("\nRegime of the plain runs (median over modules, at the last checkpoint; |cos| between the top update direction "
              "at ~10% of training and at the end), mean over seeds:\n")
        print("| lr | update/weight | effective rank fraction | early/late abs cos |")
        print("|---|---|---|---|")
        for lr in sorted({r["lr"] for r in plains}):
            rs = [r["regime"] for r in plains if r["lr"] == lr]
            print(f"| {lr:g} | " + " | ".join(f"{statistics.mean(x[k] for x in rs):.3g}" for k in
                                              ("update_to_weight", "effective_rank_frac", "u1_cos_early_vs_final")) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the missing runs of a grid")
    r.add_argument("--testbed", choices=list(TESTBEDS), default="embedded")
    r.add_argument("--methods", nargs="+", choices=list(METHODS), default=["plain"])
    r.add_argument("--lrs", nargs="+", default=["3e-6", "1e-5", "3e-5", "1e-4", "3e-4"])
    r.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    r.add_argument("--grid", action="append", metavar="METHOD:LR,LR",
                   help="runs of one method at these lrs (repeatable, run in the order given; replaces --methods/--lrs)")
    r.add_argument("--steps", type=int, default=40)
    r.add_argument("--eval-every", type=int, default=2)
    r.add_argument("--jobs", type=int, default=2, help="runs at a time")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--runs", default="runs/envelope", help="scratch folder of the run directories")
    r.add_argument("--keep", action="store_true", help="keep the run directories of EffOPD runs")
    t = sub.add_parser("table", help="print the markdown tables of the finished runs")
    t.add_argument("--testbed", choices=list(TESTBEDS), default="embedded")
    e = sub.add_parser("expo-curve", help="(internal) the post-hoc extrapolation of one plain run")
    e.add_argument("--testbed", required=True)
    e.add_argument("--run-dir", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--threads", type=int, default=1)
    sub.add_parser("build-seen", help=f"build the separate-seen testbed into {SEPARATE}-seen")
    args = ap.parse_args()
    {"run": cmd_run, "table": cmd_table, "expo-curve": cmd_expo_curve, "build-seen": cmd_build_seen}[args.cmd](args)


if __name__ == "__main__":
    main()
