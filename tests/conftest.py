"""Shared fixtures (a task tokenizer, tiny random Qwen3 student/teacher saved to disk) and the
helpers several test files use, importable as ``from conftest import ...``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from effopd.bootstrap import ModelShape, build_tokenizer, make_model
from effopd.data.task import TaskSpec, generate_split

TINY = ModelShape(hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8)


@pytest.fixture(scope="session")
def task_tokenizer():
    corpus = [e.prompt + e.solution for e in generate_split(200, TaskSpec(1, 3, 2), seed=0)]
    return build_tokenizer(corpus)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, task_tokenizer):
    """Paths of a tiny random student and a (different) tiny random teacher."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for role, seed in (("student", 1), ("teacher", 2)):
        model = make_model(TINY, task_tokenizer, seed)
        model.save_pretrained(root / role)
        task_tokenizer.save_pretrained(root / role)
        paths[role] = str(root / role)
    return paths


@pytest.fixture
def tiny_student(tiny_models):
    """A fresh (tokenizer, model) pair of the tiny student, loaded as the trainer loads it."""
    from effopd.models import load_model, load_tokenizer

    return load_tokenizer(tiny_models["student"]), load_model(tiny_models["student"], "student")


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


# ---- training runs on the tiny models ---------------------------------------------------------


def tiny_overrides(tiny_models, **extra) -> list[str]:
    """``key=value`` overrides for a short run on the tiny models (2 steps, evaluation and a
    checkpoint every step); ``extra`` replaces or adds keys."""
    base = {
        "model.student": tiny_models["student"], "model.teacher": tiny_models["teacher"],
        "rollout.batch_size": 4, "rollout.max_new_tokens": 10, "data.eval_limit": 8,
        "eval.max_new_tokens": 10, "train.steps": 2, "train.eval_every": 1, "train.save_every": 1,
        "optim.lr": 1e-2,
        # the controller under the paper's rule (the shipped default, rank1 + paired, has its own tests)
        "extrapolate.schedule": "paper", "extrapolate.accept": "best", "extrapolate.margin": 0.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_run(overrides: list[str], run_dir: Path, resume: bool = False) -> dict:
    """Train in-process with the default config plus ``overrides``, without a progress bar."""
    from effopd.config import load_config
    from effopd.train import train

    return train(load_config([], overrides), run_dir, resume=resume, progress=False)


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl``, in order."""
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The student's tensors saved in ``run_dir/checkpoints/step-<step>``."""
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "checkpoints" / f"step-{step}" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise equality of two state dicts: same names, dtypes and values."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- synthetic analysed runs for the report ---------------------------------------------------

#: Checkpoint steps of the synthetic report runs (the first at 10% of training).
REPORT_STEPS = [4, 10, 40]


def projection_eval(base: Path, final: Path, offset: float = 0.0, scale: float = 1.0, **extra):
    """An ``eval_fn`` whose accuracy is ``offset + scale · p``, p = ⟨θ − θ_0, θ_T − θ_0⟩ / ‖θ_T − θ_0‖²
    the projection onto the final update: ``offset`` at the base, ``offset + scale`` at the final
    checkpoint, and about ``offset + scale·α·t/T`` for θ_0 + α(θ_t − θ_0) when the update keeps
    its direction. ``extra`` is returned alongside the accuracy."""
    from safetensors.torch import load_file

    b, f = load_file(Path(base) / "model.safetensors"), load_file(Path(final) / "model.safetensors")
    D = {k: f[k].double() - b[k].double() for k in b}
    den = sum(float((d * d).sum()) for d in D.values())

    def eval_fn(model_dir):
        m = load_file(Path(model_dir) / "model.safetensors")
        proj = sum(float(((m[k].double() - b[k].double()) * D[k]).sum()) for k in D) / den
        return {"accuracy": offset + scale * proj, **extra}

    return eval_fn


def write_metrics(run_dir: Path, steps: int = 40, effopd: bool = True, seed: int = 0) -> None:
    """A plausible metrics.jsonl: eval every 10 steps, EffOPD searches at powers of two."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"step": 0, "eval/accuracy": 0.2, "eval/mean_length": 30.0}]
    searches = 0
    for s in range(1, steps + 1):
        r = float(torch.rand(1, generator=g))
        row = {"step": s, "train/loss": r, "train/reverse_kl": 1 / math.sqrt(s), "train/reward": 0.2 + s / 60 + 0.1 * r,
               "train/response_length": 40 - s / 4, "train/grad_norm": 1.0, "train/lr": 1e-5, "time/step": 0.5,
               "time/rollout": 0.3, "time/score": 0.1, "time/update": 0.1}
        if effopd and s & (s - 1) == 0:
            searches += 1
            row.update({"extrapolate/s0": 0.3, "extrapolate/best": 0.4, "extrapolate/accepted_c": 3.0,
                        "extrapolate/candidates": [3.0, 5.0], "extrapolate/scores": [0.4, 0.35], "extrapolate/noise": 0.02,
                        "extrapolate/update_norm": 0.1 * s, "extrapolate/seconds": 1.5, "extrapolate/total_seconds": 1.5 * searches})
        if s % 10 == 0:
            row.update({"eval/accuracy": 0.2 + s / 80, "eval/mean_length": 30 - s / 10, "eval/avg@1": 0.2 + s / 80})
        rows.append(row)
    (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_report_run(tmp_path_factory, name: str) -> Path:
    """Build one of the run directories "opd", "rl", "bare" (and the shared base) once per
    session, under the session's base temp dir, so that every report test module reuses them.

    "opd": only q, v, up and down move, along a fixed rank-2 direction, checkpoints at
    :data:`REPORT_STEPS`, analysed with the evaluation 0.2 + 0.6 × projection (:func:`projection_eval`).
    "rl": every type moves along a rank-8 direction under heavy noise, analysed without
    evaluation. "bare": metrics.jsonl only, no analysis."""
    from effopd.analysis import analyze, synthetic
    import transformers as tf

    root = tmp_path_factory.getbasetemp() / "report-runs"
    d = root / name
    if (root / f"{name}.done").exists():
        return d
    torch.set_num_threads(1)
    base = root / "base"
    if not (root / "base.done").exists():
        cfg = tf.Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
        synthetic.write_base(cfg, base)
        (root / "base.done").write_text("")
    if name == "opd":
        ck = synthetic.write_run(base, d / "checkpoints", REPORT_STEPS, rank=2, noise=0.02, types=("q", "v", "up", "down"))
        analyze(base, ck, d / "analysis", rank=2, eval_fn=projection_eval(base, ck[-1][1], offset=0.2, scale=0.6),
                alphas=(0, 1, 3, 8), fracs=(0.1,), window=1, progress=False)
        (d / "config.yaml").write_text("loss:\n  method: opd\nextrapolate:\n  enabled: true\n")
    elif name == "rl":
        ck = synthetic.write_run(base, d / "checkpoints", REPORT_STEPS, rank=8, noise=0.5, seed=1)
        analyze(base, ck, d / "analysis", rank=2, progress=False)
        (d / "config.yaml").write_text("loss:\n  method: grpo\nextrapolate:\n  enabled: false\n")
    d.mkdir(parents=True, exist_ok=True)
    write_metrics(d, effopd=name == "opd", seed=len(name))
    (root / f"{name}.done").write_text("")
    return d


def make_report_runs(tmp_path_factory, names=("opd", "rl", "bare")) -> Path:
    """The directory holding the named report runs (see :func:`make_report_run`)."""
    return [make_report_run(tmp_path_factory, n) for n in names][0].parent


class PicklePayload:
    """Unpickling this creates the file ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
