"""Evaluation: accuracy metrics over sampled responses, and running a model on a prompt set.

Metrics (DESIGN.md, "Evaluation and rewards"), for m problems with n samples each, c_i correct:

- ``avg@n``: mean accuracy over all m·n samples;
- ``pass@k``: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
  Trained on Code", eq. 1), 1 − C(n−c, k)/C(n, k), averaged over problems;
- ``mean_length``: mean response length (in tokens, or whatever unit the caller passes).

Evaluating a training run's checkpoints (``effopd eval``, ``effopd analyze``) uses the run's own
settings: :func:`find_run_dir` finds the run a path belongs to, :func:`read_run_settings` reads
its ``config.yaml``, and :func:`resolve_eval_settings` takes each setting from its flag, else the
run, else the built-in default.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from effopd.data import EMBEDDED, REQUIRED
from effopd.errors import UserError

# ---------------------------------------------------------------------------------------------
# Metrics: pure functions of per-sample correctness and lengths.
# ---------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: the probability that a uniformly random k-subset of the
    n samples contains at least one of the c correct ones, 1 − C(n−c, k)/C(n, k).

    Computed as 1 − ∏_{i=n−c+1}^{n} (1 − k/i), which never forms the (huge) binomials.
    """
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(
            f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}. "
            "n is the number of samples, c how many are correct, k the subset size."
        )
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def _check_rectangular(rows: Sequence[Sequence], name: str, n: int) -> None:
    for i, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(
                f"{name}[{i}] has {len(row)} samples, expected {n} (as in correct[0]); every "
                "problem needs the same number of samples."
            )


def summarize(
    correct: Sequence[Sequence[bool]],
    lengths: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (1,),
) -> dict[str, float]:
    """Metrics over problems, given one inner list of per-sample correctness per problem.

    Returns ``avg@{n}`` (n = samples per problem), ``pass@{k}`` for every k in ``ks`` with
    k <= n (larger k are skipped, so one ``ks`` serves runs with different n), and
    ``mean_length`` when ``lengths`` (same shape as ``correct``) is given.
    """
    if len(correct) == 0:
        raise ValueError("summarize got no problems; pass one list of per-sample results per problem.")
    n = len(correct[0])
    if n == 0:
        raise ValueError("summarize got problems with no samples; each problem needs at least one.")
    _check_rectangular(correct, "correct", n)
    for k in ks:
        if k < 1:
            raise ValueError(f"summarize: every k in ks must be >= 1; got ks={tuple(ks)}.")

    num_correct = [sum(bool(x) for x in row) for row in correct]
    m = len(correct)
    metrics = {f"avg@{n}": sum(num_correct) / (m * n)}
    for k in ks:
        if k <= n:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in num_correct) / m
    if lengths is not None:
        if len(lengths) != m:
            raise ValueError(f"lengths has {len(lengths)} problems but correct has {m}; give one row per problem.")
        _check_rectangular(lengths, "lengths", n)
        metrics["mean_length"] = sum(sum(row) for row in lengths) / (m * n)
    return metrics


# --- model-driven evaluation: greedy or sampled decoding on a prompt set, scored by rewards ---

def evaluation_records(
    model,
    tokenizer,
    examples,
    *,
    max_new_tokens: int,
    samples: int = 1,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    seed: int = 1234,
    backend: str | None = None,
) -> list[dict]:
    """``model``'s responses to ``examples``, one dict per response (prompt, answer, response,
    correct, length), ``samples`` consecutive ones per prompt (greedy decoding repeats itself, so
    greedy uses one). Sampling draws from its own generator seeded with ``seed`` and leaves the
    caller's random state untouched."""
    from effopd.rewards import reward
    from effopd.rollout import generate
    from effopd.utils import isolated_rng

    if not examples:
        raise ValueError("evaluate_model: the evaluation set is empty; pass at least one example")
    n = 1 if greedy else samples
    prompts = [e.prompt for e in examples for _ in range(n)]
    with isolated_rng(seed):
        ro = generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, greedy=greedy, batch_size=batch_size, backend=backend,
        )
    lengths = ro.lengths_B.tolist()
    records = []
    for i, text in enumerate(ro.texts):
        ex = examples[i // n]
        records.append({"prompt": ex.prompt, "answer": ex.answer, "response": text,
                        "correct": reward(text, ex.answer) > 0, "length": lengths[i]})
    return records


def records_metrics(records: list[dict], samples: int, ks: tuple[int, ...] = (1,)) -> dict[str, float]:
    """``summarize`` of ``evaluation_records`` (``samples`` consecutive records per prompt), plus
    ``accuracy``, the fraction of correct responses."""
    n = samples
    if not records or len(records) % n:
        raise ValueError(f"records_metrics: {len(records)} records are not whole groups of {n} samples per prompt")
    correct, lengths = [r["correct"] for r in records], [r["length"] for r in records]
    m = len(records) // n
    grouped = [correct[i * n : (i + 1) * n] for i in range(m)]
    metrics = summarize(grouped, [lengths[i * n : (i + 1) * n] for i in range(m)], ks=tuple(k for k in ks if k <= n))
    metrics["accuracy"] = sum(correct) / len(correct)
    return metrics


def evaluate_model(model, tokenizer, examples, *, ks: tuple[int, ...] = (1,), records: list | None = None,
                   **sampling) -> dict[str, float]:
    """Accuracy of ``model`` on ``examples``: :func:`evaluation_records` (``sampling`` are its
    keyword arguments: max_new_tokens, samples, greedy, temperature, top_p, batch_size, seed)
    scored by :func:`records_metrics`. When ``records`` is a list, the records are appended to it."""
    recs = evaluation_records(model, tokenizer, examples, **sampling)
    if records is not None:
        records.extend(recs)
    return records_metrics(recs, 1 if sampling.get("greedy", True) else sampling.get("samples", 1), ks)


def make_eval_fn(
    data: str,
    limit: int | None,
    max_new_tokens: int,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    prompt_template: str | None = None,
    batch_size: int | None = None,
    data_cfg=None,
):
    """``model_dir -> metrics``: greedy accuracy of a model directory on a prompt set (``data``:
    a file, a ``datasets`` directory or ``embedded``; at most ``limit`` prompts). The prompt set is
    read once, here; this is the ``eval_fn`` the analyses take (:mod:`effopd.analysis.evals`).

    Each model is loaded on ``device`` (``auto``, ``cpu``, ``cuda``) in ``dtype`` (``auto`` =
    bfloat16 on CUDA, float32 on the CPU) and generates ``max_new_tokens`` tokens at most,
    ``batch_size`` prompts per ``generate`` call (None: :func:`evaluate_model`'s default).
    ``data_cfg`` (a :class:`~effopd.config.DataConfig`) gives the fields, split and task settings
    of the prompt set; ``prompt_template`` (None: ``data_cfg``'s, by default ``{prompt}``) is
    applied to every prompt, as training does. The returned function's ``settings`` attribute
    records all of this (the analysis writes it into analysis.json)."""
    from dataclasses import replace

    from effopd.config import DataConfig
    from effopd.data import load_split
    from effopd.models import load_model, load_tokenizer, pick_device, pick_dtype

    cfg = data_cfg or DataConfig()
    template = cfg.prompt_template if prompt_template is None else prompt_template
    check_prompt_template(template, "prompt_template")
    cfg = replace(cfg, eval_limit=limit, prompt_template=template)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    examples = load_split(data, cfg, "eval")
    kw = {"max_new_tokens": max_new_tokens} if batch_size is None else {"max_new_tokens": max_new_tokens, "batch_size": batch_size}

    def eval_fn(model_dir) -> dict:
        model_dir = str(model_dir)
        model = load_model(model_dir, "student", dt, dev)
        try:
            return evaluate_model(model, load_tokenizer(model_dir), examples, **kw)
        finally:
            del model
            if dev.type == "cuda":
                import torch

                torch.cuda.empty_cache()  # one built model at a time on the device

    eval_fn.settings = {"data": str(data), "n": len(examples), "limit": limit, "prompt_template": template,
                        "prompt_field": cfg.prompt_field, "answer_field": cfg.answer_field,
                        "max_new_tokens": max_new_tokens, "batch_size": batch_size, "device": str(dev), "dtype": dt,
                        "greedy": True}
    return eval_fn


def check_prompt_template(template: str, source: str) -> None:
    """A prompt template must contain ``{prompt}`` (:func:`effopd.data.apply_template` replaces
    it; everything else is literal); ``source`` names where it came from."""
    if not isinstance(template, str) or "{prompt}" not in template:
        raise EvalSettingsError(f"{source}={template!r} does not contain {{prompt}}; the template must hold "
                                "{prompt} where the raw prompt goes (e.g. 'Question: {prompt}\\nAnswer:')")


# --- a training run's evaluation settings: evaluating its checkpoints as the run evaluated them ---

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"


class EvalSettingsError(UserError, ValueError):
    """An evaluation setting (a flag or a run's config.yaml) is unusable; the message names it."""


def find_run_dir(path) -> Path | None:
    """The effopd run directory ``path`` belongs to, or None: ``path`` itself when it holds the
    run's ``config.yaml`` (and is not a model directory), its parent when ``path`` is a run's
    ``checkpoints/`` folder, or two levels up when ``path`` is a checkpoint in that folder."""
    p = Path(path)
    if (p / RUN_CONFIG).is_file() and not (p / "config.json").exists():
        return p
    if p.name == CHECKPOINTS and (p.parent / RUN_CONFIG).is_file():
        return p.parent
    if p.parent.name == CHECKPOINTS and (p.parent.parent / RUN_CONFIG).is_file():
        return p.parent.parent
    return None


@dataclass(frozen=True)
class RunSettings:
    """What a run's ``config.yaml`` says about evaluating its checkpoints. Read with OmegaConf
    key by key rather than as a whole :class:`~effopd.config.Config`, so a config written by an
    older or newer effopd still gives the keys it has (a missing key is None)."""

    config: Path
    prompt_template: str | None
    max_new_tokens: int | None
    batch_size: int | None
    eval_data: str | None
    data: dict = field(default_factory=dict)
    student: str | None = None


def read_run_settings(run_dir) -> RunSettings:
    from omegaconf import OmegaConf

    path = Path(run_dir) / RUN_CONFIG
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # noqa: BLE001 - reported with the file named
        raise EvalSettingsError(f"{path} (the run's config) cannot be read as YAML: {' '.join(str(err).split())}; "
                                "fix or remove it, or pass every evaluation setting as a flag") from None
    if not isinstance(cfg, dict):
        raise EvalSettingsError(f"{path} (the run's config) is not a mapping of config sections; fix or remove it")
    section = lambda name: cfg.get(name) if isinstance(cfg.get(name), dict) else {}  # noqa: E731
    data, ev = section("data"), section("eval")
    eval_data = data.get("eval")
    return RunSettings(
        config=path, prompt_template=data.get("prompt_template"), max_new_tokens=ev.get("max_new_tokens"),
        batch_size=ev.get("batch_size"), eval_data=None if eval_data in (None, REQUIRED) else str(eval_data),
        data=data, student=section("model").get("student"),
    )


@dataclass
class EvalSettings:
    """Resolved evaluation settings: each one from its flag, else the run's config, else the
    built-in default. ``from_run`` describes the values the run's config supplied."""

    data: str
    data_cfg: object  # effopd.config.DataConfig: fields, split, task settings, template, limit
    max_new_tokens: int
    batch_size: int | None
    from_run: list[str] = field(default_factory=list)

    @property
    def prompt_template(self) -> str:
        return self.data_cfg.prompt_template


def _same_data(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def resolve_eval_settings(
    run: RunSettings | None,
    *,
    data: str | None = None,
    prompt_template: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> EvalSettings:
    """Flag (a non-None argument) > the run's config (``run``) > built-in default, for each of:
    the prompt set (``data.eval``; default ``embedded``), the prompt template
    (``data.prompt_template``; ``{prompt}``), ``eval.max_new_tokens`` and ``eval.batch_size``
    (EvalConfig's defaults), and, when the prompt set is the run's own ``data.eval``, its
    ``prompt_field``/``answer_field``/``eval_split`` and embedded-task settings."""
    from effopd.config import DataConfig, EvalConfig

    defaults_d, defaults_e = DataConfig(), EvalConfig()
    src = f"{run.config}" if run else ""
    taken: list[str] = []

    def pick(flag, run_value, default, label):
        if flag is not None:
            return flag
        if run_value is not None:
            if run_value != default:  # the line names what the run changed, not what matches the default
                taken.append(label(run_value))
            return run_value
        return default

    data = pick(data, run.eval_data if run else None, EMBEDDED, lambda v: f"eval data {v} (data.eval)")
    own = run is not None and run.eval_data is not None and _same_data(data, run.eval_data)
    rd = run.data if own else {}
    template = pick(prompt_template, run.prompt_template if run else None, defaults_d.prompt_template,
                    lambda v: f"prompt template {v!r}")
    check_prompt_template(template, "--prompt-template" if prompt_template is not None else
                          (f"data.prompt_template in {src}" if run and run.prompt_template is not None else "prompt_template"))
    mnt = pick(max_new_tokens, run.max_new_tokens if run else None, defaults_e.max_new_tokens,
               lambda v: f"max_new_tokens={v}")
    bs = pick(batch_size, run.batch_size if run else None, defaults_e.batch_size, lambda v: f"batch_size={v}")
    for value, flag, key in ((mnt, max_new_tokens, "max_new_tokens"), (bs, batch_size, "batch_size"), (limit, limit, None)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            where = (f"--{key.replace('_', '-')}" if key else "--limit (--eval-limit)") if flag is not None \
                else f"eval.{key} in {src}"
            raise EvalSettingsError(f"{where}={value!r} is invalid: it must be a positive integer")
    pf = pick(prompt_field, rd.get("prompt_field"), defaults_d.prompt_field, lambda v: f"prompt_field={v}")
    af = pick(answer_field, rd.get("answer_field"), defaults_d.answer_field, lambda v: f"answer_field={v}")
    sp = pick(split, rd.get("eval_split"), None, lambda v: f"eval_split={v}")
    task = {k: rd[k] for k in ("task_seed", "task_min_ops", "task_max_ops", "task_digits")
            if data == EMBEDDED and rd.get(k) is not None and rd[k] != getattr(defaults_d, k)}
    if task:
        taken.append("embedded task " + ", ".join(f"{k}={v}" for k, v in task.items()))
    try:
        cfg = DataConfig(prompt_field=pf, answer_field=af, eval_split=sp, eval_limit=limit, prompt_template=template, **task)
    except UserError as err:
        raise EvalSettingsError(f"{err} (evaluation settings, from the flags and {src or 'the defaults'})") from None
    return EvalSettings(data=data, data_cfg=cfg, max_new_tokens=mnt, batch_size=bs, from_run=taken)
