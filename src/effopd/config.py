"""Typed run configuration: dataclasses merged from YAML files and dotted overrides by OmegaConf.

``load_config(["run.yaml"], ["optim.lr=1e-5", "train.steps=200"])`` gives a validated ``Config``.
Unknown keys are errors that suggest the closest valid key; out-of-range values are errors that
name the key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from effopd.errors import UserError
from effopd.module_groups import DEFAULT_TYPE_ORDER, TYPES

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


def _methods() -> dict:
    """The method table (``effopd.methods``), imported when a config is built rather than when this
    module is, so that ``effopd --help`` and the presets list load no torch."""
    from effopd.methods import METHODS

    return METHODS


class ConfigError(UserError, ValueError):
    pass


def _require(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key}={value!r} is invalid: {what}")


@dataclass
class ModelConfig:
    student: str = "embedded"
    """Student: a save_pretrained directory, a hub id, or `embedded` (the shipped default)."""
    teacher: str = "embedded"
    """Teacher: must share the student's vocabulary. `http://HOST:PORT`: a teacher served by `effopd serve-teacher`
    (sampled-token logprobs only: OPD, G-OPD, EffOPD's teacher_logprob score; GKD and SFT need a local teacher)."""
    teachers: dict[str, str] | None = None
    """Several teachers, name -> path, hub id or URL (`model.teachers.math=PATH`); `data.teacher_field` names the
    column that picks one per prompt. Replaces model.teacher; for the methods that score sampled tokens (opd, gopd)."""
    teacher_timeout: float = 600.0
    """Seconds a served teacher may take to answer one request."""
    teacher_retries: int = 5
    """Retries of a served-teacher request after a connection failure or timeout (waits 1, 2, 4, ... s)."""
    base: str | None = None
    """Frozen base for G-OPD; default (null) is the student's initial weights."""
    dtype: str = "float32"
    """Storage and compute dtype of the frozen models (teacher, G-OPD base): `float32`, `bfloat16` or `float16`.
    The trained student always keeps float32 master weights (its optimizer steps in float32); its forward
    runs in bf16 under train.mixed_precision=bf16."""

    def __post_init__(self):
        _require(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", self.dtype,
                 "choose float32, bfloat16 or float16 (the frozen models' dtype)")
        _require(self.teacher_timeout > 0 and self.teacher_retries >= 0, "model.teacher_timeout/teacher_retries",
                 (self.teacher_timeout, self.teacher_retries), "need a timeout > 0 and retries >= 0")


@dataclass
class DataConfig:
    train: str = "embedded"
    """Training prompts: .jsonl, .parquet, a `datasets` directory, or `embedded`."""
    eval: str = "embedded"
    """Held-out prompts for periodic evaluation (`embedded` = the embedded task's test split)."""
    val: str = "embedded"
    """Validation prompts for EffOPD's accept/reject decisions (`embedded` = the task's val split)."""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    solution_field: str = "solution"
    """Worked solutions (optional; needed only by `loss.method=sft-gt`)."""
    teacher_field: str | None = None
    """The column naming each prompt's teacher (a key of model.teachers); needed with model.teachers."""
    train_split: str | None = None
    eval_split: str | None = None
    val_split: str | None = None
    eval_limit: int | None = 1000
    """Evaluate on at most this many held-out prompts (null = all)."""
    prompt_template: str = "{prompt}"
    """Text around every prompt: each `{prompt}` is replaced by the raw prompt, everything else (braces too,
    e.g. `\\boxed{}`) is kept as written. On the command line the value is taken as a plain string."""
    task_seed: int = 0
    """Seed of the embedded task's splits."""
    task_min_ops: int = 2
    task_max_ops: int = 3
    task_digits: int = 2

    def __post_init__(self):
        _require("{prompt}" in self.prompt_template, "data.prompt_template", self.prompt_template, "must contain {prompt}")
        _require(self.eval_limit is None or self.eval_limit > 0, "data.eval_limit", self.eval_limit, "must be > 0 or null")


@dataclass
class RolloutConfig:
    batch_size: int = 64
    """Prompts per optimizer update (global, across processes)."""
    n: int = 1
    """Responses sampled per prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    generation_batch_size: int | None = None
    """Prompts per `generate` call when sampling the batch (and EffOPD's validation); null = all at once."""
    backend: str = "lean"
    """The sampling engine (training, EffOPD's validation and evaluation): lean (a decode loop
    that drops finished rows), lean-compiled (the same loop with the model's forward compiled by
    torch.compile: the first sampling call compiles, tens of seconds; later calls have far less
    per-op overhead, so it pays in long runs of small models) or hf (Hugging Face generate). All
    sample the same distribution."""
    off_policy_steps: int = 0
    """0: every batch is sampled by the current weights (on-policy). 1: the next batch is sampled on a worker
    thread, by a copy of the weights from before this step's update, while the update runs, so sampling overlaps
    scoring and the update; each batch is then one update behind and loss.rollout_is (on by default here)
    corrects for it. Costs one more copy of the student in memory. Not during the update of a step that
    checkpoints, extrapolates or ends the run (the step after it samples on-policy). For the ratio methods (opd,
    gopd, grpo, dapo) without dynamic sampling, the lean engines and an unsharded student."""

    def __post_init__(self):
        _require(self.generation_batch_size is None or self.generation_batch_size > 0, "rollout.generation_batch_size",
                 self.generation_batch_size, "must be > 0 or null")
        _require(self.batch_size > 0, "rollout.batch_size", self.batch_size, "must be > 0")
        _require(self.backend in ("lean", "lean-compiled", "hf"), "rollout.backend", self.backend,
                 "must be lean, lean-compiled or hf")
        _require(self.n > 0, "rollout.n", self.n, "must be > 0")
        _require(self.temperature > 0, "rollout.temperature", self.temperature, "must be > 0 for sampling")
        _require(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        _require(self.max_new_tokens > 0, "rollout.max_new_tokens", self.max_new_tokens, "must be > 0")
        _require(self.off_policy_steps in (0, 1), "rollout.off_policy_steps", self.off_policy_steps,
                 "must be 0 (on-policy) or 1 (sample the next batch during the update)")


@dataclass
class LossConfig:
    method: str = "opd"
    """`opd` (A = lp_T - lp_old), `gopd` (A = lam*(lp_T - lp_B) - (lp_old - lp_B)), `gkd` (generalized JSD to
    the teacher on student samples), `grpo`/`dapo` (group-normalized verifiable reward), `sft` (cross-entropy
    on teacher samples) or `sft-gt` (cross-entropy on the data's worked solutions)."""
    lam: float = 1.0
    """G-OPD reward-extrapolation factor (1 = OPD, 1.25 = ExOPD)."""
    gkd_beta: float = 0.5
    """GKD: generalized JSD weight (0 = forward KL, 1 = reverse KL)."""
    gkd_top_k: int | None = None
    """GKD: compare the distributions on the teacher's top-k tokens only (null = full vocabulary)."""
    clip_eps_low: float = 0.2
    """Lower PPO clip of the ratio to the sampling-time policy. The clip (and dual_clip_c) act only when a
    batch gets several updates (ppo_epochs or mini_batches > 1) or with rollout_is; with one update per
    batch the ratio is exactly 1 and train/clip_frac is 0."""
    clip_eps_high: float | None = None
    """Upper PPO clip; null = 0.28 for dapo (clip-higher), else clip_eps_low. Inactive with one update per batch."""
    dual_clip_c: float | None = 3.0
    """Dual clip of negative advantages (c > 1; null = off). Inactive with one update per batch."""
    ppo_epochs: int = 1
    """Passes over each sampled batch; each pass makes mini_batches optimizer updates."""
    mini_batches: int = 1
    """Optimizer updates per pass: the batch is split into this many consecutive mini-batches."""
    aggregation: str | None = None
    """Loss reduction; null = seq-mean-token-mean for grpo, token-mean otherwise. `seq-mean-token-sum-norm`
    divides each sequence's token sum by the constant rollout.max_new_tokens."""
    std_norm: bool = True
    """grpo/dapo: divide the group-centered reward by the group's std."""
    dynamic_sampling: bool | None = None
    """grpo/dapo: drop groups whose rewards are all equal and refill the batch; null = on for dapo."""
    max_sample_rounds: int = 4
    """Dynamic sampling: at most this many generation rounds per step (then train on what was kept)."""
    overlong_penalty: float | None = None
    """grpo/dapo: soft overlong penalty factor; null = 1.0 for dapo, 0 (off) otherwise."""
    overlong_buffer: int | None = None
    """Penalty ramps over the last this-many tokens before rollout.max_new_tokens; null = a quarter of it."""
    rollout_is: bool | None = None
    """Weight tokens by min(exp(lp_old - lp_roll), is_cap) (for rollout engines that differ from the trainer, or
    batches sampled ahead); null = on with rollout.off_policy_steps=1, else off."""
    is_cap: float = 5.0

    def __post_init__(self):
        from effopd.losses import AGGREGATIONS

        methods = _methods()
        _require(self.method in methods, "loss.method", self.method, f"choose one of {tuple(methods)}")
        m = self.method
        groups = tuple(name for name, rec in methods.items() if rec.group)
        _require(self.lam >= 0, "loss.lam", self.lam, "must be >= 0")
        _require(0 <= self.gkd_beta <= 1, "loss.gkd_beta", self.gkd_beta, "must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
        _require(self.gkd_top_k is None or self.gkd_top_k > 0, "loss.gkd_top_k", self.gkd_top_k, "must be > 0 or null")
        _require(self.clip_eps_low >= 0 and (self.clip_eps_high is None or self.clip_eps_high >= 0), "loss.clip_eps_*", (self.clip_eps_low, self.clip_eps_high), "must be >= 0")
        _require(self.dual_clip_c is None or self.dual_clip_c > 1, "loss.dual_clip_c", self.dual_clip_c, "must be > 1 or null")
        _require(self.aggregation is None or self.aggregation in AGGREGATIONS, "loss.aggregation", self.aggregation, f"choose one of {AGGREGATIONS}")
        _require(not self.dynamic_sampling or methods[m].group, "loss.dynamic_sampling", self.dynamic_sampling,
                 f"only the group methods {groups} sample groups to filter")
        _require(self.ppo_epochs > 0, "loss.ppo_epochs", self.ppo_epochs, "must be > 0")
        _require(self.mini_batches > 0, "loss.mini_batches", self.mini_batches, "must be > 0")
        _require(self.max_sample_rounds > 0, "loss.max_sample_rounds", self.max_sample_rounds, "must be > 0")
        _require(self.overlong_penalty is None or self.overlong_penalty >= 0, "loss.overlong_penalty", self.overlong_penalty, "must be >= 0 (0 = off)")
        _require(self.overlong_buffer is None or self.overlong_buffer >= 0, "loss.overlong_buffer", self.overlong_buffer, "must be >= 0 or null")
        _require(self.is_cap > 0, "loss.is_cap", self.is_cap, "must be > 0")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    scheduler: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "two values in [0, 1)")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _require(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "must be > 0 or null")
        _require(self.scheduler in SCHEDULERS, "optim.scheduler", self.scheduler, f"choose one of {SCHEDULERS}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    micro_batch_size: int | None = None
    """Rows per forward/backward pass (gradient accumulation inside one update); null = whole batch."""
    eval_every: int = 10
    """Evaluate every N steps (and at step 0 and the end); 0 = only at the end."""
    save_every: int = 10
    """Checkpoint every N steps (and at the end)."""
    keep_last: int | None = None
    """Keep only the newest K checkpoints (null = keep all)."""
    device: str = "auto"
    """`auto` (cuda when available), `cpu` or `cuda`."""
    score_chunk_size: int | None = None
    """Rows per teacher/base scoring pass (null = whole batch)."""
    update_buckets: int | None = None
    """The update's forward/backward sorts the rows by length and runs in this many micro-batches of near-equal
    rows, each padded only to its own longest row (with train.micro_batch_size: the sorted rows cut into
    micro-batches of that size). 1 = the batch in sampled order. The same gradient to float rounding. null = 1
    when train.pack is on (packed rows carry no padding to save), else 2."""
    pack: bool | None = None
    """Forwards run on packed rows: the real tokens only, several sequences per row kept apart by their position
    ids (no padding computed), in the update's forward/backward and in the teacher's (local or served) and the
    base's scoring. The same logprobs and gradient to float rounding. The first packed forward of each model
    checks that its attention honours packing (transformers' sdpa and eager do) and stops the run with a clear
    error if it does not. A sharded (FSDP) model runs padded. null = on for a CPU device (measured faster,
    benchmarks/RESULTS.md), off on CUDA, where it has not been measured."""
    score_buckets: int = 2
    """Teacher and base scoring sort the rows by length and score this many groups, each padded only to its own
    longest row (1 = the padded batch as sampled). Equal to float rounding (a few 1e-6); the student's own
    old logprobs stay padded, so the first update's ratio is exactly 1."""
    log_reward: bool = True
    """Log train/reward (train/target_reward for sft), the answer check of every sampled response, also for the
    methods whose loss does not use it (opd, gopd, gkd, sft). false skips that check: math-verify takes up to
    tens of ms per response on symbolic answers. grpo and dapo always check (their loss is the reward)."""
    max_nonfinite: int = 5
    """Stop after this many consecutive updates with a NaN/inf loss or gradient (each is skipped)."""
    mixed_precision: str = "auto"
    """`bf16`: the student's forward and the scoring run under bf16 autocast over float32 master weights; `no`:
    float32; `auto`: bf16 on a CUDA device that supports it, else no."""
    gradient_checkpointing: bool = False
    """Recompute the student's layer activations in the backward pass instead of keeping them (less memory, ~30% slower)."""
    logit_chunk: int = 256
    """Response positions per LM-head slab: logprobs never hold more than (rows, logit_chunk, V) logits at once."""
    report_to: list[str] = field(default_factory=list)
    """Trackers that also receive every step's metrics, through accelerate: e.g. [tensorboard], [wandb], [mlflow]
    (each needs its package installed). metrics.jsonl is always written and is what the report reads."""
    parallel: str = "ddp"
    """With several processes (accelerate launch): `ddp` replicates the student on each; `fsdp2` shards it (and its
    optimizer state) across them with torch FSDP2, checkpoints in shards (torch distributed checkpoint) and writes a
    consolidated Hugging Face copy of the final weights."""
    shard_teacher: bool = False
    """With train.parallel=fsdp2: shard the frozen teacher the same way (less memory per process) instead of replicating it."""
    consolidate_checkpoints: bool = False
    """With train.parallel=fsdp2: also write the full Hugging Face weights into every checkpoint, not only the last."""

    def __post_init__(self):
        _require(self.steps > 0, "train.steps", self.steps, "must be > 0")
        _require(self.micro_batch_size is None or self.micro_batch_size > 0, "train.micro_batch_size", self.micro_batch_size, "must be > 0 or null")
        _require(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0")
        _require(self.score_buckets >= 1, "train.score_buckets", self.score_buckets, "must be >= 1 (1 = no bucketing)")
        _require(self.update_buckets is None or self.update_buckets >= 1, "train.update_buckets", self.update_buckets, "must be >= 1 (1 = no bucketing)")
        _require(self.save_every > 0, "train.save_every", self.save_every, "must be > 0")
        _require(self.keep_last is None or self.keep_last > 0, "train.keep_last", self.keep_last, "must be > 0 or null")
        _require(self.device in ("auto", "cpu", "cuda"), "train.device", self.device, "choose auto, cpu or cuda")
        _require(self.max_nonfinite > 0, "train.max_nonfinite", self.max_nonfinite, "must be > 0")
        _require(self.mixed_precision in ("auto", "no", "bf16"), "train.mixed_precision", self.mixed_precision,
                 "choose auto, no or bf16")
        _require(self.logit_chunk > 0, "train.logit_chunk", self.logit_chunk, "must be > 0")
        _require(self.parallel in ("ddp", "fsdp2"), "train.parallel", self.parallel, "choose ddp or fsdp2")
        _require(self.parallel == "fsdp2" or not (self.shard_teacher or self.consolidate_checkpoints),
                 "train.shard_teacher/consolidate_checkpoints", (self.shard_teacher, self.consolidate_checkpoints),
                 "apply to sharded runs only: set train.parallel=fsdp2 or leave them false")
        known = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
        bad = [t for t in self.report_to if t not in known]
        _require(not bad, "train.report_to", self.report_to, f"unknown tracker {bad}; choose from {known}")


@dataclass
class EvalConfig:
    greedy: bool = True
    samples: int = 1
    """Responses per prompt when not greedy (avg@k / pass@k)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 256
    seed: int = 1234
    """Seed of evaluation sampling (its own generator; never the training stream)."""

    def __post_init__(self):
        _require(self.samples > 0, "eval.samples", self.samples, "must be > 0")
        _require(self.greedy or self.temperature > 0, "eval.temperature", self.temperature, "must be > 0 when sampling")
        _require(self.batch_size > 0, "eval.batch_size", self.batch_size, "must be > 0")


EXTRAPOLATE_SCORES = ("reward", "teacher_logprob")


@dataclass
class ExtrapolateConfig:
    enabled: bool = False
    """Switch EffOPD on: extrapolate along the update direction at trigger steps."""
    schedule: str = "rank1"
    """`rank1` (the default: c = 3, 5, 7, ... along each tensor's top singular direction of the update since the last
    anchor; unsharded models), `paper` (the same c along the whole update), `adaptive` (c = 1 + g*2^i, g adapting
    across searches), `lookahead` (along a momentum of the updates; use with trigger_steps every few steps),
    or `expo` (the whole update since the
    init, c = 1.5, 2, 3, 5, 8, 13 up to max_tries, anchor fixed)."""
    max_tries: int = 5
    margin: float = 1.0
    """Accept a candidate only if it beats the best score by margin x a standard error (0 = any gain)."""
    accept: str = "paired"
    """`paired`: the mean per-prompt difference to the best state must exceed margin x its standard error (the
    same prompts and seed score every candidate); `best`: compare the mean scores (margin x the larger standard
    error of the two). Paired with margin 1 is the default: over an lr sweep it was the rule that gained most
    over the best plain run and lost least at a well-tuned lr (benchmarks/envelope.py)."""
    momentum: float = 0.5
    """`lookahead`'s momentum of the updates between searches."""
    trigger_steps: list[int] | None = None
    """Steps after which to search; null = powers of two (1, 2, 4, 8, ...)."""
    max_step: int | None = None
    """No searches after this step (null = no limit)."""
    modules: list[str] = field(default_factory=lambda: list(DEFAULT_TYPE_ORDER))
    """Module types whose 2-D weights are extrapolated (embeddings, lm_head and norms are left alone)."""
    score: str = "reward"
    """`reward` (mean verifiable reward of validation samples) or `teacher_logprob` (teacher's mean per-token logprob of them)."""
    val_prompts: int = 128
    val_samples: int = 1
    val_greedy: bool = False
    val_seed: int = 4321
    """Sampling seed of validation; the same for every candidate of one search (common random numbers)."""
    init_gain: float = 0.5
    min_gain: float = 0.125
    max_gain: float = 64.0
    storage: str = "cpu"
    """Device holding the anchor and the rollback copy."""

    def __post_init__(self):
        from effopd.extrapolate import SCHEDULES

        _require(self.schedule in SCHEDULES, "extrapolate.schedule", self.schedule, f"choose one of {SCHEDULES}")
        _require(self.max_tries > 0, "extrapolate.max_tries", self.max_tries, "must be > 0")
        bad = [m for m in self.modules if m not in TYPES]
        _require(not bad, "extrapolate.modules", self.modules, f"unknown module types {bad}; choose from {TYPES}")
        _require(self.margin >= 0, "extrapolate.margin", self.margin, "must be >= 0")
        _require(self.accept in ("best", "paired"), "extrapolate.accept", self.accept, "choose best or paired")
        _require(0 <= self.momentum < 1, "extrapolate.momentum", self.momentum, "must be in [0, 1)")
        _require(self.score in EXTRAPOLATE_SCORES, "extrapolate.score", self.score, f"choose one of {EXTRAPOLATE_SCORES}")
        _require(self.val_prompts > 0 and self.val_samples > 0, "extrapolate.val_prompts/val_samples", (self.val_prompts, self.val_samples), "must be > 0")
        _require(0 < self.min_gain <= self.init_gain <= self.max_gain, "extrapolate.min_gain/init_gain/max_gain",
                 (self.min_gain, self.init_gain, self.max_gain), "need 0 < min_gain <= init_gain <= max_gain")


def _on_cuda(device: str) -> bool:
    """Whether ``train.device`` resolves to a CUDA device."""
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device == "cuda"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    extrapolate: ExtrapolateConfig = field(default_factory=ExtrapolateConfig)

    def __post_init__(self):
        """Fill the per-method defaults left null, then check what spans sections."""
        from effopd.methods import method_defaults

        loss, n = self.loss, self.rollout.n
        for key, value in method_defaults(loss.method).items():
            if getattr(loss, key) is None:
                setattr(loss, key, value)
        if loss.clip_eps_high is None:
            loss.clip_eps_high = loss.clip_eps_low
        if _methods()[loss.method].group:
            _require(n >= 2, "rollout.n", n, f"loss.method={loss.method} compares the n responses to one prompt, so it "
                     f"needs n >= 2 (e.g. rollout.n=8 rollout.batch_size=8, or start from --preset {loss.method})")
        teachers, field_ = self.model.teachers, self.data.teacher_field
        if teachers is not None or field_ is not None:
            _require(bool(teachers) and field_ is not None, "model.teachers/data.teacher_field", (teachers, field_),
                     "set both: model.teachers.NAME=PATH_OR_URL for each teacher and data.teacher_field=COLUMN, the "
                     "column that names each prompt's teacher")
            _require(loss.method in ("opd", "gopd"), "model.teachers", loss.method,
                     f"several teachers score sampled tokens for opd and gopd; loss.method={loss.method} takes one "
                     "teacher (model.teacher)")
        if loss.rollout_is is None:
            loss.rollout_is = self.rollout.off_policy_steps > 0
        if self.rollout.off_policy_steps:
            rec = _methods()[loss.method]
            _require(rec.ratio and not loss.dynamic_sampling, "rollout.off_policy_steps", self.rollout.off_policy_steps,
                     f"sampling ahead needs a method whose loss corrects for the sampler (opd, gopd, grpo, dapo) and no "
                     f"dynamic sampling; loss.method={loss.method} with loss.dynamic_sampling={loss.dynamic_sampling} "
                     "samples on-policy only: set rollout.off_policy_steps=0")
            _require(self.rollout.backend != "hf", "rollout.off_policy_steps", self.rollout.off_policy_steps,
                     "sampling ahead draws from a generator of its own, which rollout.backend=hf (Hugging Face generate) "
                     "cannot take; use rollout.backend=lean")
        tr = self.train
        if tr.pack is None:
            tr.pack = not _on_cuda(tr.device)
        if tr.update_buckets is None:
            tr.update_buckets = 1 if tr.pack else 2
        if loss.overlong_buffer is None:
            loss.overlong_buffer = self.rollout.max_new_tokens // 4
        _require(loss.overlong_buffer < self.rollout.max_new_tokens, "loss.overlong_buffer", loss.overlong_buffer,
                 f"must be below rollout.max_new_tokens={self.rollout.max_new_tokens}")


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        sub = f.default_factory if is_dataclass(f.default_factory) else None  # type: ignore[arg-type]
        keys.append(prefix + f.name)
        if sub is not None:
            keys += _all_keys(sub, prefix + f.name + ".")
    return keys


def _string_keys(cls, prefix: str = "") -> dict[str, bool]:
    """Dotted keys of the config's string fields, each mapped to whether it may be null."""
    import types
    import typing

    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        if is_dataclass(hint):
            out.update(_string_keys(hint, f"{prefix}{name}."))
        elif hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                             and str in args and all(a in (str, type(None)) for a in args)):
            out[prefix + name] = type(None) in args
    return out


def _leaf_keys(d, prefix: str = "") -> list[str]:
    if not isinstance(d, dict):
        return []
    out = []
    for k, v in d.items():
        out += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def _suggest(bad_key: str) -> str:
    close = difflib.get_close_matches(bad_key, _all_keys(Config), n=1, cutoff=0.5)
    return f"; did you mean `{close[0]}`?" if close else ""


PRESETS = Path(__file__).resolve().parent / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The shipped YAML of preset ``name`` (e.g. ``grpo``)."""
    path = PRESETS / f"{name}.yaml"
    if not path.exists():
        close = difflib.get_close_matches(name, list_presets(), n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise ConfigError(f"unknown preset {name!r}; {hint}the presets are: {', '.join(list_presets())}")
    return path


#: Fields that are mappings: any key below them is the user's (``model.teachers.math``).
MAPPING_KEYS = ("model.teachers.",)


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults <- each YAML file in order <- dotted ``key=value`` overrides."""
    layers = []
    for path in files:
        if not Path(path).exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    # Unknown keys first, from the dataclass fields alone: a typo is answered before the method
    # table (and torch) is imported to build the config.
    valid = set(_all_keys(Config))
    named = [k for layer in layers for k in _leaf_keys(OmegaConf.to_container(layer))]
    named += [item.split("=", 1)[0] for item in overrides if "=" in item]
    for key in named:
        if key not in valid and not key.startswith(MAPPING_KEYS):
            raise ConfigError(f"config: unknown key `{key}`{_suggest(key)}")
    strings = _string_keys(Config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-5)")
        key, value = item.split("=", 1)
        if key in strings:  # the text as typed: no YAML reading of `Q: {prompt} A:` or `{prompt}`
            layer = OmegaConf.create()
            OmegaConf.update(layer, key, None if value == "null" and strings[key] else value, force_add=True)
            layers.append(layer)
        else:
            layers.append(OmegaConf.from_dotlist([item]))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), *layers)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        key = getattr(err, "full_key", None) or str(err)
        raise ConfigError(f"config: unknown key `{key}`{_suggest(str(key))}") from err
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "")
        raise ConfigError(f"config: bad value for `{key}`: {err.msg if hasattr(err, 'msg') else err}") from err


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))
