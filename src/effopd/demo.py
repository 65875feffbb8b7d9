"""`effopd demo`: OPD, OPD + EffOPD and GRPO on the embedded task at one budget, analysed and
compared in one HTML report.

Stages (one progress bar over them; each training run shows its own bar):

1. models: the shipped student and teacher (or, when ``--models DIR`` is given, the ones there,
   bootstrapped into DIR first if it holds none);
2. evaluate the teacher and the student on the held-out split;
3-5. train the three methods from their presets (``opd``, ``opd-effopd``, ``grpo``) with the same
   steps, samples per step and learning rate;
6. analyse every run's checkpoints (update norms, concentration, rank, lock-in, weight scaling);
7. write ``RUN_DIR/report.html`` and print a comparison table.

``--quick`` shrinks every stage (fewer steps, smaller evaluation and validation sets, fewer scaled
models) to about 2.5 minutes on 2 CPU cores; the full demo takes about 8.5.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from effopd.errors import UserError
from effopd.metrics import read_metrics
from effopd.utils import write_json

#: The demo's runs, in report order: (preset name, display label). Not loss methods (config.METHODS).
DEMO_RUNS = (("opd", "OPD"), ("opd-effopd", "OPD + EffOPD"), ("grpo", "GRPO"))


class DemoError(UserError, ValueError):
    """A demo run left nothing to summarise (e.g. evaluation switched off by an override)."""


@dataclass
class Budget:
    steps: int
    eval_every: int
    eval_limit: int
    analysis_eval_limit: int
    val_prompts: int
    scale_alphas: tuple[float, ...] | None = None
    """Scales of the weight-scaling analysis (None: the analysis default, 0.5 ... 10)."""
    scale_checkpoints: int = 2

    def overrides(self) -> list[str]:
        return [f"train.steps={self.steps}", f"train.eval_every={self.eval_every}", f"train.save_every={self.eval_every}",
                f"data.eval_limit={self.eval_limit}", f"extrapolate.val_prompts={self.val_prompts}"]


FULL = Budget(steps=100, eval_every=10, eval_limit=1000, analysis_eval_limit=200, val_prompts=128,
              scale_alphas=(0.5, 1.0, 2.0, 3.0, 5.0, 7.0))
# Each model the analysis evaluates costs ~0.7 s whatever the prompt count, so --quick scales fewer.
QUICK = Budget(steps=30, eval_every=10, eval_limit=200, analysis_eval_limit=60, val_prompts=64,
               scale_alphas=(1.0, 3.0, 5.0), scale_checkpoints=1)


def ensure_models(models_dir: Path | None) -> tuple[str, str]:
    """(student, teacher) model paths: the shipped ones, or ``models_dir``'s (built if absent)."""
    from effopd.models import resolve

    if models_dir is None:
        return resolve("embedded", "student"), resolve("embedded", "teacher")
    if not (models_dir / "student" / "config.json").exists():
        from effopd.bootstrap import BootstrapConfig, bootstrap, summary

        print(f"no models in {models_dir}: bootstrapping them (about 8 minutes on 2 cores)")
        print(summary(bootstrap(models_dir, BootstrapConfig())))
    return str(models_dir / "student"), str(models_dir / "teacher")


def first_reaching(curve: dict[int, float], target: float) -> int | None:
    return next((s for s, a in sorted(curve.items()) if a >= target), None)


def run_summary(run_dir: Path) -> dict:
    """Accuracy curve, training seconds (evaluation excluded) and final accuracy of one run."""
    path = run_dir / "metrics.jsonl"
    rows, _ = read_metrics(path)
    curve, seconds = {}, 0.0
    for r in rows:
        seconds += r.get("time/step", 0.0)
        if "eval/accuracy" in r:
            curve[r["step"]] = r["eval/accuracy"]
    if not curve:
        raise DemoError(f"{path} holds no eval/accuracy entry, so the run has no accuracy to summarise; "
                        "keep evaluation on in the demo's overrides (train.eval_every > 0)")
    return {"curve": curve, "seconds": seconds, "final": curve[max(curve)]}


def run_demo(run_dir: Path, *, quick: bool = False, steps: int | None = None, analysis_eval_limit: int | None = None,
             models_dir: Path | None = None, overrides: list[str] = (), progress: bool = True) -> dict:
    from effopd.analysis import analyze
    from effopd.analysis.io import list_checkpoints
    from effopd.config import load_config, preset_path
    from effopd.data import load_split
    from effopd.evaluate import evaluate_model, make_eval_fn
    from effopd.models import load_model, load_tokenizer
    from effopd.report.build import build_report
    from effopd.train import RunDirError, train

    budget = QUICK if quick else FULL
    if steps:
        budget = replace(budget, steps=steps, eval_every=min(budget.eval_every, steps))
    if analysis_eval_limit:
        budget = replace(budget, analysis_eval_limit=analysis_eval_limit)
    # Every config is built (and so checked) before anything runs.
    configs = {name: load_config([preset_path(name)], budget.overrides() + list(overrides)) for name, _ in DEMO_RUNS}
    if (run_dir / "report.html").exists() or any((run_dir / name).exists() for name, _ in DEMO_RUNS):
        raise RunDirError(f"{run_dir} already holds a demo; pass another --run-dir (or delete it)")
    stages = tqdm(total=4 + len(DEMO_RUNS), desc="demo", unit="stage", disable=not progress, position=0)
    t_start = time.time()

    marks: list[tuple[str, float]] = []  # (stage, start time); stages.n stays 0 when the bar is disabled

    def stage(text: str) -> None:
        marks.append((text, time.time()))
        stages.set_description_str(f"demo: {text}")
        tqdm.write(f"[{len(marks)}/{stages.total}] {text}")

    stage("models")
    student, teacher = ensure_models(models_dir)
    for cfg in configs.values():
        cfg.model.student, cfg.model.teacher = student, teacher
    stages.update()

    stage("evaluating the teacher and the student")
    cfg0 = configs["opd"]
    examples = load_split("embedded", cfg0.data, "eval")
    tqdm.write(f"embedded task: {len(examples)} held-out problems, e.g. {examples[0].prompt} -> {examples[0].answer}")
    acc = {}
    for role, path in (("teacher", teacher), ("student", student)):
        acc[role] = evaluate_model(load_model(path, role), load_tokenizer(path, role), examples,
                                   max_new_tokens=cfg0.eval.max_new_tokens)["accuracy"]
    tqdm.write(f"greedy accuracy: teacher {acc['teacher']:.1%}, student {acc['student']:.1%}")
    stages.update()

    for name, label in DEMO_RUNS:
        stage(f"training {label} for {budget.steps} steps -> {run_dir / name}")
        train(configs[name], run_dir / name, progress=progress)
        stages.update()

    stage("analysing the checkpoints of every run")
    eval_fn = make_eval_fn("embedded", budget.analysis_eval_limit, cfg0.eval.max_new_tokens)
    scaling = {"scale_checkpoints": budget.scale_checkpoints}
    if budget.scale_alphas:
        scaling["alphas"] = budget.scale_alphas
    for name, _ in DEMO_RUNS:
        analyze(student, list_checkpoints(run_dir / name / "checkpoints"), run_dir / name / "analysis",
                eval_fn=eval_fn, progress=progress, **scaling)
    stages.update()

    stage("writing the report")
    report = build_report([run_dir / name for name, _ in DEMO_RUNS], run_dir / "report.html",
                          labels=[label for _, label in DEMO_RUNS])
    stages.update()
    stages.close()

    summaries = {name: run_summary(run_dir / name) for name, _ in DEMO_RUNS}
    target = 0.8 * acc["teacher"]
    lines = [f"\n{'method':<14} {'final acc':>9} {'steps to ' + format(target, '.1%'):>16} {'train s':>8}",
             f"{'student (init)':<14} {acc['student']:>9.1%}"]
    for name, label in DEMO_RUNS:
        s = summaries[name]
        hit = first_reaching(s["curve"], target)
        lines.append(f"{label:<14} {s['final']:>9.1%} {str(hit) if hit is not None else 'not reached':>16} {s['seconds']:>8.0f}")
    lines.append(f"{'teacher':<14} {acc['teacher']:>9.1%}")
    print("\n".join(lines))
    print(f"\nreport: {report}\nruns: {', '.join(str(run_dir / n) for n, _ in DEMO_RUNS)} "
          f"(config.yaml, metrics.jsonl, eval/, checkpoints/, analysis/)\ntotal {time.time() - t_start:.0f} s")
    ends = [t for _, t in marks[1:]] + [time.time()]
    record = {"budget": asdict(budget), "accuracy": acc, "runs": summaries, "report": str(report),
              "stage_seconds": [[text, end - start] for (text, start), end in zip(marks, ends)],
              "seconds": time.time() - t_start}
    write_json(run_dir / "demo.json", record, indent=1)
    return record
