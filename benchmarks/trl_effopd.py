"""TRL's DistillationTrainer on the embedded default, with and without EffOPDCallback.

    python benchmarks/trl_effopd.py sweep --lrs 1e-6 1e-5 3e-5 1e-4      # plain runs, seed 0: pick the lr
    python benchmarks/trl_effopd.py compare --lrs 1e-6 1e-5 1e-4 --seeds 0 1 2  # plain vs EffOPD, same seeds
    python benchmarks/trl_effopd.py summary                                # the tables, from what is done

Every run is one process with one torch thread (run two at a time with ``--jobs 2`` on two
cores): student and teacher are the shipped models (fp32, CPU), 64 prompts per step, one sample
each, at most 48 new tokens, temperature 1, TRL's defaults otherwise (AdamW, linear decay to 0,
reverse KL ``beta=1``). After every step up to ``--eval-dense`` and every ``--eval-every`` steps
after that, a callback measures greedy accuracy on the first ``--eval-limit`` problems of the test split (sampling in its own generator, so the
training stream is untouched). Wall-clock is measured from each step's start to its end, the
EffOPD search included, evaluation excluded.

Each run's result is ``benchmarks/results/trl_effopd/<sweep|compare>-<lr>-<seed>-<plain|effopd>.json``;
a run whose file exists is skipped, so an interrupted benchmark continues where it stopped. The
comparison runs a plain and an EffOPD run of one seed side by side, so both see the same load.
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

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "trl_effopd"
FRACTIONS = (0.5, 0.8, 0.95)


def run_one(lr: float, seed: int, effopd: bool, steps: int, eval_every: int, eval_dense: int, eval_limit: int,
            out: Path) -> None:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from effopd.data import embedded_splits
    from effopd.evaluate import evaluate_model
    from effopd.integrations.trl import EffOPDCallback
    from effopd.models import load_model, load_tokenizer

    torch.set_num_threads(1)
    splits = embedded_splits()
    tok = load_tokenizer("embedded")
    student, teacher = load_model("embedded", "student"), load_model("embedded", "teacher")
    test = splits["test"][:eval_limit]
    acc, wall = {}, {}

    class Clock(TrainerCallback):
        total, t0 = 0.0, 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.total += time.perf_counter() - self.t0
            wall[state.global_step] = self.total

    class Accuracy(TrainerCallback):
        def measure(self, step):
            acc[step] = evaluate_model(student, tok, test, max_new_tokens=48, greedy=True, batch_size=256)["accuracy"]

        def on_train_begin(self, args, state, control, **kw):
            self.measure(0)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % eval_every == 0 or state.global_step <= eval_dense:
                self.measure(state.global_step)

    rows = lambda ex: [{"prompt": e.prompt, "answer": e.answer} for e in ex]  # noqa: E731
    callbacks = [EffOPDCallback(rows(splits["val"]), tok)] if effopd else []
    callbacks += [Clock(), Accuracy()]
    args = DistillationConfig(output_dir=tempfile.mkdtemp(prefix="trl-effopd-"), max_steps=steps, per_device_train_batch_size=64,
                              learning_rate=lr, max_completion_length=48, temperature=1.0, bf16=False, use_cpu=True,
                              seed=seed, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                                  train_dataset=datasets.Dataset.from_list(rows(splits["train"])), callbacks=callbacks)
    trainer.train()
    searches = [{k: h[k] for k in ("step", "extrapolate/accepted_c", "extrapolate/s0", "extrapolate/best", "extrapolate/seconds")}
                for h in trainer.state.log_history if "extrapolate/s0" in h]
    result = {"lr": lr, "seed": seed, "effopd": effopd, "steps": steps, "eval_limit": eval_limit,
              "accuracy": acc, "wall": wall, "searches": searches}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)


def result_path(tag: str, lr: float, seed: int, effopd: bool) -> Path:
    return OUT / f"{tag}-{lr:g}-{seed}-{'effopd' if effopd else 'plain'}.json"


def launch(tag: str, jobs: list[tuple[float, int, bool]], ns) -> None:
    """Run the missing jobs, ``ns.jobs`` at a time, each in its own process."""
    todo = [j for j in jobs if not result_path(tag, *j).exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs done; running {len(todo)}", flush=True)
    running: list[tuple[subprocess.Popen, tuple]] = []
    while todo or running:
        while todo and len(running) < ns.jobs:
            lr, seed, eff = j = todo.pop(0)
            cmd = [sys.executable, __file__, "one", "--tag", tag, "--lr", str(lr), "--seed", str(seed), "--steps", str(ns.steps),
                   "--eval-every", str(ns.eval_every), "--eval-dense", str(ns.eval_dense), "--eval-limit", str(ns.eval_limit)] + (["--effopd"] if eff else [])
            OUT.mkdir(parents=True, exist_ok=True)
            log = open(result_path(tag, *j).with_suffix(".log"), "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}), j))
        time.sleep(2)
        for p, j in list(running):
            if p.poll() is not None:
                running.remove((p, j))
                print(f"{'done' if p.returncode == 0 else f'FAILED ({p.returncode})'}: lr={j[0]:g} seed={j[1]} "
                      f"{'effopd' if j[2] else 'plain'}", flush=True)


def first_reaching(curve: dict, target: float) -> int | None:
    return next((s for s in sorted(curve) if curve[s] >= target), None)


def load(path: Path) -> dict:
    r = json.loads(path.read_text())
    r["accuracy"] = {int(k): v for k, v in r["accuracy"].items()}
    r["wall"] = {int(k): v for k, v in r["wall"].items()}
    return r


def summary() -> str:
    lines = ["## lr sweep (plain runs, seed 0)", "", "| lr | runs | accuracy at the end | best accuracy |", "|---|---|---|---|"]
    sweep: dict[float, list] = {}
    for r in (load(p) for p in sorted(OUT.glob("sweep-*.json"))):
        sweep.setdefault(r["lr"], []).append(r)
    for lr in sorted(sweep):
        plain = sweep[lr]
        if plain:
            finals = ", ".join(f"{r['accuracy'][max(r['accuracy'])]:.1%}" for r in plain)
            bests = ", ".join(f"{max(r['accuracy'].values()):.1%}" for r in plain)
            lines.append(f"| {lr:g} | {len(plain)} | {finals} | {bests} |")
    by_lr: dict[float, list] = {}
    for r in (load(p) for p in sorted(OUT.glob("compare-*.json"))):
        by_lr.setdefault(r["lr"], []).append(r)
    for lr in sorted(by_lr):
        pairs = [(p, e) for p in by_lr[lr] if not p["effopd"] for e in by_lr[lr] if e["effopd"] and e["seed"] == p["seed"]]
        if not pairs:
            continue
        lines += ["", f"## lr {lr:g}: plain vs EffOPD, seeds {[p['seed'] for p, _ in pairs]}", "",
                  "| target (of plain final) | plain steps | EffOPD steps | step speedup (median) | plain s | EffOPD s | wall-clock speedup (median) |",
                  "|---|---|---|---|---|---|---|"]
        for f in FRACTIONS:
            ps, es, pw, ew, sr, wr = [], [], [], [], [], []
            for p, e in pairs:
                target = f * p["accuracy"][max(p["accuracy"])]
                a, b = first_reaching(p["accuracy"], target), first_reaching(e["accuracy"], target)
                ps.append(a), es.append(b)
                pw.append(p["wall"].get(a, 0.0) if a is not None else None)
                ew.append(e["wall"].get(b, 0.0) if b is not None else None)
                if a and b:
                    sr.append(a / b)
                    wr.append(pw[-1] / ew[-1] if ew[-1] else float("inf"))
            fmt = lambda xs: ", ".join("-" if x is None else (f"{x:.0f}" if isinstance(x, float) else str(x)) for x in xs)  # noqa: E731
            lines.append(f"| {f:.0%} | {fmt(ps)} | {fmt(es)} | {statistics.median(sr):.2f}x | {fmt(pw)} | {fmt(ew)} | "
                         f"{statistics.median(wr):.2f}x |" if sr else f"| {f:.0%} | {fmt(ps)} | {fmt(es)} | - | {fmt(pw)} | {fmt(ew)} | - |")
        pf = [p["accuracy"][max(p["accuracy"])] for p, _ in pairs]
        ef = [e["accuracy"][max(e["accuracy"])] for _, e in pairs]
        acc_c = [[s["extrapolate/accepted_c"] for s in e["searches"]] for _, e in pairs]
        lines += ["", f"Final accuracy: plain {', '.join(f'{x:.1%}' for x in pf)}; EffOPD {', '.join(f'{x:.1%}' for x in ef)}. "
                  f"Accepted c per search (steps 1, 2, 4, ...): {acc_c}."]
    lines += absolute(by_lr)
    return "\n".join(lines)


ABSOLUTE = (0.5, 0.8, 0.9, 0.95)


def absolute(by_lr: dict[float, list]) -> list[str]:
    """Steps and seconds to absolute accuracies, every lr and variant side by side (median over
    seeds; "-" where a seed never got there), so each run can be read against the best plain one."""
    if not by_lr:
        return []
    head = " | ".join(f"{t:.0%}: steps / s" for t in ABSOLUTE)
    lines = ["", "## Absolute accuracy targets: median steps / seconds over seeds (never reached: -)", "",
             f"| lr | variant | {head} | final (median) |", "|---|---|" + "---|" * len(ABSOLUTE) + "---|"]
    for lr in sorted(by_lr):
        for eff in (False, True):
            runs = [r for r in by_lr[lr] if r["effopd"] == eff]
            if not runs:
                continue
            cells = []
            for t in ABSOLUTE:
                hit = [first_reaching(r["accuracy"], t) for r in runs]
                if any(h is None for h in hit):
                    cells.append(f"- ({sum(h is not None for h in hit)}/{len(hit)} seeds)")
                else:
                    secs = [r["wall"].get(h, 0.0) for r, h in zip(runs, hit)]
                    cells.append(f"{statistics.median(hit):g} / {statistics.median(secs):.0f}")
            final = statistics.median(r["accuracy"][max(r["accuracy"])] for r in runs)
            lines.append(f"| {lr:g} | {'EffOPD' if eff else 'plain'} | {' | '.join(cells)} | {final:.1%} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["sweep", "compare", "summary", "one"])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-6, 1e-5, 3e-5, 1e-4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float)
    ap.add_argument("--tag", default="compare")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--effopd", action="store_true")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-dense", type=int, default=10, help="also evaluate after every step up to this one")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2)
    ns = ap.parse_args()
    if ns.mode == "one":
        run_one(ns.lr, ns.seed, ns.effopd, ns.steps, ns.eval_every, ns.eval_dense, ns.eval_limit,
                result_path(ns.tag, ns.lr, ns.seed, ns.effopd))
    elif ns.mode == "sweep":
        launch("sweep", [(lr, 0, False) for lr in ns.lrs], ns)
        print(summary())
    elif ns.mode == "compare":
        launch("compare", [(lr, s, e) for lr in ns.lrs for s in ns.seeds for e in (False, True)], ns)
        print(summary())
    else:
        print(summary())


if __name__ == "__main__":
    main()
