"""The training loop: batch -> per-batch signals -> loss -> update -> EffOPD -> log -> eval -> checkpoint.

``train(cfg, run_dir)`` is three calls: ``setup`` (inputs, models, optimizer, run directory),
``restore`` (the newest checkpoint, with ``--resume``) and ``loop``, which is read top to bottom;
every stage of a step is one call. What differs between methods lives in their record in
``methods.py``. It runs single-process by default and under ``accelerate launch`` as
data-parallel replicas: each process samples its share of the global batch, gradients are
averaged by DDP, and every data-dependent decision is agreed by all processes
(``replicas.py``): the loss normaliser counts the whole global batch, DAPO's refill rounds,
the non-finite skip, checkpoint write failures and EffOPD's accept/reject come out the same
everywhere; evaluation and EffOPD's validation prompts are split across the processes and
their results gathered. With ``train.parallel=fsdp2`` the student (and, with
``train.shard_teacher``, the teacher) is sharded with FSDP2 (``sharding.py``) and every process
runs the same sequence of forward passes (padded shards, agreed micro-batch counts), as the
sharded layers gather their weights collectively.

Updates per batch: ``loss.ppo_epochs`` passes over ``loss.mini_batches`` mini-batches, one
optimizer update each. With one update per batch (the default) the "old" policy is the current
one, so ``lp_old`` is the detached ``lp_theta`` of the same forward pass (the PPO ratio is exactly
1 and the clip is inactive), as in verl/TRL with a single update per rollout; with several,
``lp_old`` is scored once before the first update.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from effopd import checkpoint as ckpt
from effopd import validation
from effopd.ahead import SampleAhead
from effopd.config import Config, ConfigError
from effopd.data import load_split
from effopd.data.loaders import DatasetError
from effopd.errors import RunStopped
from effopd.evaluate import evaluation_records, records_metrics
from effopd.extrapolate import Extrapolator, anchor_file
from effopd.methods import METHODS, Batch, Method, Models, Prompts, check_solutions, normaliser_count
from effopd.metrics import MetricsLog, read_metrics
from effopd.models import check_same_vocab, freeze, load_model, load_tokenizer
from effopd.replicas import any_replica, gather_list, max_across, mean_metrics, padded_shard, sum_across
from effopd.rundir import RunDirError, check_run_dir, flatten, init_run_dir
from effopd.scoring import score as score_logprobs
from effopd.sharding import is_sharded, load_sharded, save_consolidated, save_sharded, shard_model
from effopd.teachers import RemoteTeacher, Routed, TeacherUnavailable, is_url
from effopd.utils import atomic_write_text



class TrainingInterrupted(RunStopped):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was written."""

    prefix = ""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteError(RunStopped):
    """Too many consecutive steps had a non-finite loss or gradient."""


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (main thread only),
    restoring the previous handlers on exit. A second signal of the same kind aborts at once."""

    def __init__(self):
        self.signum, self._old = None, {}

    def _handle(self, signum, frame):
        if self.signum == signum:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    def requested(self, accelerator) -> bool:
        flag = torch.tensor([0 if self.signum is None else self.signum], device=accelerator.device)
        if accelerator.num_processes > 1:  # every replica must stop at the same step
            flag = accelerator.reduce(flag, reduction="max")
        if self.signum is None and int(flag):
            self.signum = int(flag)
        return bool(int(flag))


class PromptSampler:
    """Epoch-wise shuffled prompt order from its own generator; its state is two integers."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        out, order = [], self._order()
        while len(out) < k:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
            take = min(k - len(out), self.n - self.cursor)
            out += order[self.cursor : self.cursor + take]
            self.cursor += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.cursor = s["epoch"], s["cursor"]


def mixed_precision(cfg: Config, use_cpu: bool) -> str:
    """accelerate's mixed_precision for ``train.mixed_precision`` (``auto``: bf16 on a CUDA device
    that supports it, else no)."""
    mp = cfg.train.mixed_precision
    if mp == "auto":
        return "bf16" if not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return mp


def tracker_config(cfg: Config) -> dict:
    """The resolved config as flat ``group.key`` scalars (lists as strings), for trackers' run pages."""
    from omegaconf import OmegaConf

    flat = flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in flat.items()}


def check_context(cfg: Config, models: Models, sets: dict[str, list]) -> None:
    """Refuse a run whose longest prompt plus ``max_new_tokens`` exceeds a model's context
    (``max_position_embeddings``), naming the lengths, before any step runs."""
    longest, where = 0, ""
    for key, examples in sets.items():
        if examples:
            n = max(len(ids) for ids in models.tokenizer([e.prompt for e in examples])["input_ids"])
            if n > longest:
                longest, where = n, key
    new = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    t = models.teacher
    teachers = [(f"teacher {n}", m) for n, m in t.teachers.items()] if isinstance(t, Routed) else [("teacher", t)]
    for role, model in (("student", models.student), *teachers, ("base", models.base)):
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit and longest + new > limit:
            raise ConfigError(
                f"the longest prompt ({longest} tokens, in {where}) plus max_new_tokens ({new}) is {longest + new} "
                f"tokens, beyond the {role}'s context of {limit} (max_position_embeddings); shorten the prompts or lower "
                "rollout.max_new_tokens / eval.max_new_tokens"
            )


def needs_teacher(cfg: Config) -> bool:
    """The method's need, or EffOPD scoring candidates by the teacher's logprob."""
    x = cfg.extrapolate
    return METHODS[cfg.loss.method].needs_teacher or (x.enabled and x.score == "teacher_logprob")


def updates_per_batch(cfg: Config) -> int:
    return cfg.loss.ppo_epochs * cfg.loss.mini_batches


def load_teacher(cfg: Config, name: str, tok, device):
    """One teacher: a served one (``http://...``, its vocabulary checked over the wire) or a
    local frozen model (its tokenizer checked)."""
    m = cfg.model
    if is_url(name):
        why = METHODS[cfg.loss.method].local_teacher(cfg)
        if why:
            raise ConfigError(f"loss.method={cfg.loss.method} needs a local teacher for {why}, but model.teacher={name} "
                              "is a served one; point model.teacher at the model itself")
        teacher = RemoteTeacher(name, timeout=m.teacher_timeout, retries=m.teacher_retries)
        teacher.check_vocab(tok, m.student)
        return teacher
    check_same_vocab(tok, load_tokenizer(name, "teacher"), m.student, name)
    return freeze(load_model(name, "teacher", m.dtype, device))


def load_models(cfg: Config, device, student_path: str | None = None) -> Models:
    m, method = cfg.model, METHODS[cfg.loss.method]
    tok = load_tokenizer(m.student, "student")
    teacher = None
    if needs_teacher(cfg) and m.teachers:
        teacher = Routed({name: load_teacher(cfg, spec, tok, device) for name, spec in m.teachers.items()})
    elif needs_teacher(cfg):
        teacher = load_teacher(cfg, m.teacher, tok, device)
    student = load_model(student_path or m.student, "student", "float32", device)  # float32 master weights
    base = None
    if method.needs_base:  # the frozen student *init*, never a resumed checkpoint
        base = freeze(load_model(m.base or m.student, "student", m.dtype, device))
    return Models(student, teacher, base, tok)


def check_routes(models: Models, sets: dict[str, list]) -> None:
    """With several teachers, every prompt must name one of them (checked before any step)."""
    if isinstance(models.teacher, Routed):
        for key, examples in sets.items():
            try:
                models.teacher.index([e.teacher for e in examples], where=f"{key}: ")
            except KeyError as err:
                raise DatasetError(err.args[0]) from None


def evaluate_step(cfg: Config, accelerator, model, tokenizer, examples, run_dir: Path, step: int) -> dict:
    """Each process answers its contiguous share of ``examples``; the records are gathered (in
    the examples' order), every process computes the same metrics and the main one writes
    ``eval/step-N.jsonl``. Greedy evaluation (the default) does not depend on the number of
    processes; sampled evaluation draws each share from ``eval.seed``."""
    e = cfg.eval
    mine, real = padded_shard(accelerator, examples)
    n = 1 if e.greedy else e.samples
    records = evaluation_records(
        model, tokenizer, mine, max_new_tokens=e.max_new_tokens, samples=e.samples, greedy=e.greedy,
        temperature=e.temperature, top_p=e.top_p, batch_size=e.batch_size, seed=e.seed, backend=cfg.rollout.backend,
    )[: real * n]
    records = gather_list(accelerator, records)
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "eval" / f"step-{step}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    metrics = records_metrics(records, n)
    return {f"eval/{k}": v for k, v in metrics.items()}


# ---- one update ------------------------------------------------------------------------------

_MICRO_METRICS = ("clip_frac", "reverse_kl", "jsd", "nll")
"""Loss metrics averaged over micro-batches (by token share for token-mean, else by row share)."""


def micro_batches(cfg: Config, accelerator, batch: Batch) -> list[Batch]:
    """The micro-batches of one update, as many on every process (a process short of rows gets
    weightless ones). ``train.update_buckets`` > 1: the rows sorted by length first, and each
    micro-batch trimmed to its own widest row; without ``train.micro_batch_size`` there are
    ``update_buckets`` of them, of near-equal size."""
    B, mb, buckets = len(batch), cfg.train.micro_batch_size, cfg.train.update_buckets
    if buckets > 1:
        ro = batch.rollout
        batch = batch.select(torch.argsort(ro.prompt_mask_BP.sum(1) + ro.response_mask_BT.sum(1), stable=True))
    if mb is None and buckets > 1:
        count = int(min(buckets, max_across(accelerator, B)))
        sizes = [B // count + (i < B % count) for i in range(count)]
    else:
        mb = mb or B
        count = int(max_across(accelerator, -(-B // mb)))
        sizes = [mb] * count
    parts = [batch.part(sum(sizes[:j]), size) for j, size in enumerate(sizes)]
    return [p.trimmed() for p in parts] if buckets > 1 else parts


def accumulate_gradients(cfg: Config, accelerator: Accelerator, models: Models, method: Method, batch: Batch) -> dict:
    """Accumulate the gradient of ``method``'s loss on ``batch`` over its micro-batches
    (:func:`micro_batches`). Each micro-batch loss is divided by the whole batch's normaliser,
    so the summed gradient equals one pass over the batch."""
    B = len(batch)
    # DDP averages the processes' gradients, so each divides by the global count / world size
    denominator = max(sum_across(accelerator, [normaliser_count(cfg, batch)])[0], 1) / accelerator.num_processes
    total_tokens = batch.rollout.response_mask_BT.sum().clamp(min=1)
    sums: dict[str, float] = {"loss": 0.0}
    parts = micro_batches(cfg, accelerator, batch)
    count = len(parts)
    for j, part in enumerate(parts):
        last = j == count - 1
        # DDP decides in the forward whether the backward all-reduces: both go inside no_sync, so
        # only the last micro-batch synchronises the accumulated gradient
        with no_sync(accelerator, models.student) if not last else contextlib.nullcontext():
            with accelerator.autocast():
                loss, m = method.loss(cfg, models, part, denominator)
            accelerator.backward(loss)
        sums["loss"] += loss.item()
        rows = part.rollout.response_ids_BT.shape[0]
        share = (part.rollout.response_mask_BT.sum() / total_tokens) if cfg.loss.aggregation == "token-mean" else (rows / B)
        for key in _MICRO_METRICS:
            if key in m:
                sums[key] = sums.get(key, 0.0) + m[key] * float(share)
    return {f"train/{k}": v for k, v in sums.items()}


@contextlib.contextmanager
def no_sync(accelerator, model):
    """Accumulate this backward's gradient without synchronising it (DDP's ``no_sync``; FSDP2's
    ``set_requires_gradient_sync(False)``)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def mini_batches(accelerator, batch: Batch, n: int) -> list[Batch]:
    """``batch`` in ``n`` consecutive mini-batches of near-equal size (the first ``B % n`` one
    row longer); ``B`` of them when B < n, with ``B`` the most rows any process holds. Every
    process makes the same number of updates: one whose share is shorter (DAPO keeps what is
    informative) fills a missing mini-batch with a weightless row."""
    if n == 1:
        return [batch]
    count = int(min(n, max_across(accelerator, len(batch))))
    sizes = [len(batch) // count + (i < len(batch) % count) for i in range(count)]
    starts = [sum(sizes[:i]) for i in range(count)]
    return [batch.part(a, size) for a, size in zip(starts, sizes)]


def full(t):
    """A ``DTensor`` (a sharded model's gradient norm) as the whole tensor; anything else as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@dataclass
class NonFiniteCount:
    run: int = 0
    """Consecutive updates skipped for a non-finite loss or gradient (0 after a good one)."""
    total: int = 0


def optimize(cfg: Config, accelerator, models: Models, method: Method, batch: Batch, optimizer, scheduler,
             nonfinite: NonFiniteCount) -> dict:
    """The batch's no-grad signals (``method.prepare``; ``lp_old`` when the batch gets several
    updates), then ``loss.ppo_epochs`` passes over ``loss.mini_batches`` mini-batches, one
    optimizer update each. An update whose loss or gradient is not finite is skipped (weights
    and optimizer state stay as they were). Metrics are means over the updates."""
    t0 = time.time()
    with accelerator.autocast():
        if method.prepare is not None:
            method.prepare(cfg, models, batch)
        if method.ratio and updates_per_batch(cfg) > 1:
            batch.signals["old_logp_BT"] = score_logprobs(models.student, batch.rollout, temperature=cfg.rollout.temperature,
                                                          chunk_size=cfg.train.score_chunk_size,
                                                          chunk_positions=cfg.train.logit_chunk)
    t_score = time.time() - t0
    updates = []
    for _ in range(cfg.loss.ppo_epochs):
        for mini in mini_batches(accelerator, batch, cfg.loss.mini_batches):
            # the loss as a mean over processes: every process takes the same skip decision
            m = mean_metrics(accelerator, accumulate_gradients(cfg, accelerator, models, method, mini))
            m["train/grad_norm"] = float(full(accelerator.clip_grad_norm_(models.student.parameters(), cfg.optim.grad_clip or math.inf)))
            if math.isfinite(m["train/loss"]) and math.isfinite(m["train/grad_norm"]):
                optimizer.step()
                scheduler.step()
                nonfinite.run = 0
            else:
                nonfinite.run, nonfinite.total = nonfinite.run + 1, nonfinite.total + 1
            optimizer.zero_grad(set_to_none=True)
            updates.append(m)
    out = updates[0] if len(updates) == 1 else {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
    out["train/response_length"] = batch.rollout.lengths_B.float().mean().item()
    out.update(mean_metrics(accelerator, batch.metrics, summed=("train/kept_groups",)))
    out["time/score"] = t_score
    return out

def make_extrapolator(cfg: Config, model, accelerator=None) -> Extrapolator:
    """EffOPD over the 2-D weights of the configured module types (``validation.make_extrapolator``:
    of a sharded model this process's shards, the update norm summed over processes)."""
    x = cfg.extrapolate
    return validation.make_extrapolator(
        model, x.modules, accelerator, schedule=x.schedule, max_tries=x.max_tries, margin=x.margin, accept=x.accept,
        momentum=x.momentum,
        trigger_steps=x.trigger_steps, max_step=x.max_step, init_gain=x.init_gain, min_gain=x.min_gain,
        max_gain=x.max_gain, storage=x.storage,
    )


def prompt_scores(cfg: Config, model, models: Models, examples: list, seed: int) -> torch.Tensor:
    """``validation.prompt_scores`` with the run's settings: the rollout's length, temperature
    and top-p, ``extrapolate.score``/``val_samples``/``val_greedy``, the teacher."""
    x, r = cfg.extrapolate, cfg.rollout
    return validation.prompt_scores(
        model, models.tokenizer, examples, seed=seed, max_new_tokens=r.max_new_tokens, score=x.score, teacher=models.teacher,
        samples=x.val_samples, greedy=x.val_greedy, temperature=r.temperature, top_p=r.top_p, batch_size=r.generation_batch_size,
        score_chunk_size=cfg.train.score_chunk_size, logit_chunk=cfg.train.logit_chunk, score_buckets=cfg.train.score_buckets,
        backend=r.backend,
    )


def validation_scorer(cfg: Config, accelerator, model, models: Models, val_set, seed: int):
    """``score()`` for one search on the first ``extrapolate.val_prompts`` validation prompts
    (``validation.validation_scorer``: split across processes, one decision)."""
    return validation.validation_scorer(lambda examples: prompt_scores(cfg, model, models, examples, seed),
                                        val_set[: cfg.extrapolate.val_prompts], accelerator)


class ReplicaWriteError(OSError):
    """Another process could not write its part of a checkpoint."""


def _on_every_process(accelerator, write) -> None:
    """Run ``write`` (None: nothing to write on this process), then agree: if it failed on any
    process, every process raises (the one that failed its own error), so none is left waiting
    in a collective."""
    err = None
    if write is not None:
        try:
            write()
        except (OSError, SafetensorError) as e:
            err = e
    if any_replica(accelerator, err is not None):
        raise err if err is not None else ReplicaWriteError("another process could not write its part")


def save_checkpoint(accelerator, cfg, run_dir, step, models, optimizer, scheduler, sampler, extrapolator=None) -> None:
    root = run_dir / "checkpoints"
    try:
        _write_checkpoint(accelerator, cfg, root, step, models, optimizer, scheduler, sampler, extrapolator)
    except (OSError, SafetensorError) as err:  # a full disk surfaces from safetensors as SafetensorError
        if accelerator.is_main_process:
            shutil.rmtree(ckpt.tmp_dir(root, step), ignore_errors=True)
        previous = ckpt.latest(root)
        raise ckpt.CheckpointError(
            f"could not write checkpoint step-{step} in {root}: {err}. The previous checkpoint "
            f"({previous or 'none'}) is intact; free disk space or fix permissions, then continue with --resume"
        ) from err


def _write_checkpoint(accelerator, cfg, root, step, models, optimizer, scheduler, sampler, extrapolator) -> None:
    main, rank, tmp = accelerator.is_main_process, accelerator.process_index, ckpt.tmp_dir(root, step)
    student = accelerator.unwrap_model(models.student)
    sharded = is_sharded(student)

    def weights_and_state():
        ckpt.begin(root, step)
        if sharded:
            student.config.save_pretrained(tmp)
        else:
            student.save_pretrained(tmp)
        models.tokenizer.save_pretrained(tmp)
        state = {"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()}
        if extrapolator is not None:
            state["extrapolate"] = extrapolator.state_dict()
        ckpt.save_state(tmp, state, None if sharded else optimizer.state_dict())

    _on_every_process(accelerator, weights_and_state if main else None)
    if sharded:  # collectives: every process writes its shards
        _on_every_process(accelerator, lambda: save_sharded(tmp / ckpt.SHARDED_DIR, student, optimizer))
        if cfg.train.consolidate_checkpoints or step == cfg.train.steps:
            _on_every_process(accelerator, lambda: save_consolidated(student, tmp, main))

    def per_process():
        ckpt.save_rng(tmp, rank)
        if extrapolator is not None and (main or sharded):
            save_file({n: t.contiguous() for n, t in extrapolator.tensors().items()}, tmp / anchor_file(sharded, rank))

    _on_every_process(accelerator, per_process)
    _on_every_process(accelerator, (lambda: ckpt.finish(root, step, accelerator.num_processes, cfg.train.keep_last))
                      if main else None)


@dataclass
class Run:
    """Everything one training run holds while it runs."""

    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    method: Method
    models: Models
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: PromptSampler
    log: MetricsLog
    train_set: list
    eval_set: list
    val_set: list | None
    extrapolator: Extrapolator | None
    resume_from: Path | None

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.models.student)


def make_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    """The run's ``Accelerator``: device, mixed precision and trackers from ``cfg.train``."""
    from accelerate.state import AcceleratorState

    use_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    mp = mixed_precision(cfg, use_cpu)
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision") not in (None, mp) and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one state per process and refuses a second precision; a single process
        # that trains again (a notebook, the demo, tests) starts it afresh instead.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=use_cpu, mixed_precision=mp, log_with=list(cfg.train.report_to) or None,
                       project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "trackers")))


def setup(cfg: Config, run_dir: Path, resume: bool, overwrite: bool) -> Run:
    """Check the inputs and load everything before the run directory is touched (a failed start
    leaves nothing behind), then create it."""
    check_run_dir(cfg, run_dir, resume, overwrite)
    routed = cfg.data.teacher_field
    train_set, eval_set = load_split(cfg.data.train, cfg.data, "train", routed), load_split(cfg.data.eval, cfg.data, "eval")
    if not train_set:
        raise DatasetError(f"data.train={cfg.data.train} holds no examples; point it at a prompt set with at least one row")
    if METHODS[cfg.loss.method].needs_solutions:
        check_solutions(cfg, train_set)
    accelerator = make_accelerator(cfg, run_dir)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    # accelerate on CPU processes turns an FSDP launch into DDP without a word (it keeps only
    # the environment variable): refuse both, so nobody trains replicated believing it sharded
    launched = accelerator.distributed_type.value
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        launched = "FSDP"
    if launched in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"accelerate was launched with distributed_type={launched}, which effopd does not use: launch with "
            "accelerate_configs/ddp.yaml (or torchrun) and set train.parallel=fsdp2 to shard the student; effopd "
            "applies FSDP2 itself"
        )
    if cfg.rollout.batch_size % world:
        raise ConfigError(f"rollout.batch_size={cfg.rollout.batch_size} must be divisible by the {world} processes; "
                          f"use a multiple of {world} or launch fewer processes")

    resume_from = None
    if resume:
        if is_main:
            ckpt.recover(run_dir / "checkpoints")
        accelerator.wait_for_everyone()
        resume_from = ckpt.resumable(run_dir / "checkpoints", world)
        if resume_from is None:
            raise RunDirError(
                f"--resume: {run_dir / 'checkpoints'} holds no complete, readable checkpoint, so there is nothing to "
                "continue from; start again with --overwrite (the run's files are replaced)"
            )
    teacher_scored = cfg.extrapolate.score == "teacher_logprob"  # validation prompts name their teachers too
    val_set = load_split(cfg.data.val, cfg.data, "val", routed if teacher_scored else None) if cfg.extrapolate.enabled else None
    torch.manual_seed(cfg.train.seed + accelerator.process_index)
    sharded = cfg.train.parallel == "fsdp2" and world > 1
    if cfg.train.parallel == "fsdp2" and world == 1 and is_main:
        print("train.parallel=fsdp2 with one process: nothing to shard, the student trains unsharded")
    # a sharded run's checkpoint holds the weights in shards: start from the init, then load them
    models = load_models(cfg, accelerator.device, student_path=str(resume_from) if resume_from and not sharded else None)
    check_context(cfg, models, {"data.train": train_set, "data.eval": eval_set, "data.val": val_set or []})
    check_routes(models, {"data.train": train_set, **({"data.val": val_set} if val_set and teacher_scored else {})})
    accelerator.wait_for_everyone()  # every process checked the old run dir before it changes
    if is_main:
        init_run_dir(cfg, run_dir, overwrite)
    accelerator.wait_for_everyone()
    if cfg.train.report_to:
        accelerator.init_trackers(run_dir.name, config=tracker_config(cfg))
    if cfg.rollout.off_policy_steps and sharded:
        raise ConfigError("rollout.off_policy_steps=1 samples with a copy of the whole student, which a sharded one "
                          "(train.parallel=fsdp2) does not have; set rollout.off_policy_steps=0 or train.parallel=ddp")
    if cfg.train.gradient_checkpointing:
        models.student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    if sharded:  # before the optimizer, which must hold the sharded parameters
        shard_model(models.student, accelerator.device.type, world)
        for frozen in (models.teacher, models.base):
            if isinstance(frozen, torch.nn.Module) and cfg.train.shard_teacher:
                shard_model(frozen, accelerator.device.type, world)

    o = cfg.optim
    optimizer = torch.optim.AdamW(models.student.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    scheduler = get_scheduler(o.scheduler, optimizer, num_warmup_steps=o.warmup_steps,
                              num_training_steps=cfg.train.steps * updates_per_batch(cfg))
    if sharded:
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        models.student, optimizer, scheduler = accelerator.prepare(models.student, optimizer, scheduler)
    extrapolator = None
    if cfg.extrapolate.enabled:
        extrapolator = make_extrapolator(cfg, accelerator.unwrap_model(models.student), accelerator)
        if is_main:
            n = sum(p.numel() for p in extrapolator.params.values())
            print(f"EffOPD: extrapolating {len(extrapolator.params)} tensors ({n:,} parameters on this process) of types "
                  f"{cfg.extrapolate.modules}; validation on {min(len(val_set), cfg.extrapolate.val_prompts)} prompts")
    return Run(cfg, run_dir, accelerator, METHODS[cfg.loss.method], models, optimizer, scheduler,
               PromptSampler(len(train_set), cfg.train.seed), MetricsLog(run_dir / "metrics.jsonl", is_main),
               train_set, eval_set, val_set, extrapolator, resume_from)


def restore(run: Run) -> int:
    """Load the optimizer, scheduler, data order, EffOPD state and RNG of ``run.resume_from``
    (the student weights were loaded from it already); returns its step (0 for a fresh run)."""
    if run.resume_from is None:
        if run.accelerator.is_main_process:
            run.log.truncate_after(-1)
        return 0
    state = ckpt.load_state(run.resume_from)
    sharded = state["optimizer"] == ckpt.SHARDED_DIR
    if sharded != is_sharded(run.unwrapped):
        raise ckpt.CheckpointError(
            f"{run.resume_from} was written by a run with train.parallel={'fsdp2' if sharded else 'ddp'}; resume it with "
            f"the same setting")
    if sharded:
        load_sharded(run.resume_from / ckpt.SHARDED_DIR, run.unwrapped, run.optimizer)
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state_dict(state["sampler"])
    if run.extrapolator is not None:
        anchor = run.resume_from / anchor_file(sharded, run.accelerator.process_index)
        run.extrapolator.load_state_dict(state["extrapolate"], load_file(anchor))
    ckpt.load_rng(run.resume_from, run.accelerator.process_index)
    run.log.truncate_after(state["step"])
    if run.accelerator.is_main_process:
        print(f"resuming {run.run_dir} from {run.resume_from.name}")
    return state["step"]


def evaluate_now(run: Run, step: int) -> dict:
    """Evaluate the student on the held-out set (split across processes); ``eval/step-N.jsonl``."""
    with run.accelerator.autocast():
        return evaluate_step(run.cfg, run.accelerator, run.unwrapped, run.models.tokenizer, run.eval_set, run.run_dir, step)


def drawer(run: Run) -> Prompts:
    """This process's share of the next global batch of prompts (every process advances the
    shared order by the whole batch, so the replicas stay in step)."""
    acc, world = run.accelerator, run.accelerator.num_processes

    def draw(k: int) -> list:
        idx = run.sampler.next(k * world)
        return [run.train_set[i] for i in idx[acc.process_index * k : (acc.process_index + 1) * k]]

    return Prompts(draw, lambda flag: any_replica(acc, flag))


def extrapolate_now(run: Run, step: int) -> dict:
    """One EffOPD search after the update of ``step``; its metrics."""
    x = run.extrapolator
    with run.accelerator.autocast():
        rec = x.search(step, validation_scorer(run.cfg, run.accelerator, run.unwrapped, run.models, run.val_set,
                                               run.cfg.extrapolate.val_seed + len(x.history)))
    return {**rec.metrics(), "extrapolate/total_seconds": x.total_seconds}


def samples_ahead(run: Run, step: int) -> bool:
    """Whether the batch of ``step + 1`` is sampled during the update of ``step``
    (``rollout.off_policy_steps``): not when ``step`` checkpoints (a checkpoint holds no batch in
    flight, so resuming stays exact), runs an EffOPD search (its weights move far) or is the last."""
    t = run.cfg.train
    return not (step >= t.steps or step % t.save_every == 0
                or (run.extrapolator is not None and run.extrapolator.should_trigger(step)))


def log(run: Run, step: int, metrics: dict) -> None:
    """One row of metrics.jsonl, and the numeric entries to the configured trackers."""
    run.log.log(step, metrics)
    if run.cfg.train.report_to:
        run.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def _checkpoint(run: Run, step: int) -> None:
    save_checkpoint(run.accelerator, run.cfg, run.run_dir, step, run.models, run.optimizer, run.scheduler, run.sampler,
                    run.extrapolator)


def loop(run: Run, start: int, progress: bool) -> dict:
    """Steps ``start + 1 .. train.steps``; returns the final evaluation metrics."""
    cfg, acc = run.cfg, run.accelerator
    if start >= cfg.train.steps:
        if acc.is_main_process:
            print(f"{run.run_dir} already finished: its newest checkpoint is step {start} and train.steps={cfg.train.steps}; "
                  f"nothing to do. Raise train.steps (e.g. train.steps={start + cfg.train.steps}) with --resume to train on")
        rows = read_metrics(run.run_dir / "metrics.jsonl")[0]
        return {k: v for r in rows if r.get("step", -1) <= start for k, v in r.items() if k.startswith("eval/")}
    if start == 0 and cfg.train.eval_every:
        log(run, 0, evaluate_now(run, 0))
    draw, per_rank = drawer(run), cfg.rollout.batch_size // acc.num_processes
    bar = tqdm(range(start + 1, cfg.train.steps + 1), desc="train", disable=not (progress and acc.is_main_process),
               initial=start, total=cfg.train.steps)
    metrics: dict = {}
    nonfinite = NonFiniteCount()
    ahead = SampleAhead(run.unwrapped, acc.autocast) if cfg.rollout.off_policy_steps else None
    with StopSignal() as stop:
        for step in bar:
            t_step = time.time()
            sampled_ahead = ahead is not None and ahead.pending
            if sampled_ahead:
                batch = ahead.take()
            else:
                with acc.autocast():
                    batch = run.method.assemble(cfg, run.models, run.unwrapped, draw, per_rank)
            t_rollout = time.time() - t_step
            order = run.sampler.state_dict()  # before the next batch's prompts are drawn
            nxt = (lambda model: run.method.assemble(cfg, run.models, model, draw, per_rank)) \
                if ahead is not None and samples_ahead(run, step) else None

            t0 = time.time()
            with ahead.during(nxt) if ahead is not None else contextlib.nullcontext():
                metrics = optimize(cfg, acc, run.models, run.method, batch, run.optimizer, run.scheduler, nonfinite)
                t_update = time.time() - t0 - metrics["time/score"]
            metrics.update({
                "train/lr": run.scheduler.get_last_lr()[0], "train/nonfinite_skipped": nonfinite.total,
                "time/rollout": t_rollout, "time/update": t_update,
            })
            if ahead is not None:  # 1: this step's batch was sampled during the previous update
                metrics["train/sampled_ahead"] = float(sampled_ahead)
                metrics["time/sample_wait"] = time.time() - t0 - metrics["time/score"] - t_update
            if nonfinite.run >= cfg.train.max_nonfinite:
                log(run, step, metrics)
                last_good = ckpt.latest(run.run_dir / "checkpoints")
                raise NonFiniteError(
                    f"{nonfinite.run} consecutive updates (up to step {step}) had a non-finite loss or gradient; "
                    f"stopping. The last good checkpoint is {last_good or 'none (no checkpoint yet)'}. Lower optim.lr, "
                    "check the teacher's logprobs, or raise train.max_nonfinite"
                )
            if nonfinite.run == 0 and run.extrapolator is not None and run.extrapolator.should_trigger(step):
                metrics.update(extrapolate_now(run, step))
            metrics["time/step"] = time.time() - t_step

            last = step == cfg.train.steps
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or last:
                metrics.update(evaluate_now(run, step))
                if not progress and acc.is_main_process:  # no bar: one line per evaluation
                    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("eval/accuracy", "train/loss", "train/reward") if k in metrics)
                    print(f"step {step}/{cfg.train.steps}: {shown}", flush=True)
            log(run, step, metrics)
            shown = {"reward": "train/reward", "kl": "train/reverse_kl", "nll": "train/nll", "eval": "eval/accuracy"}
            bar.set_postfix({k: f"{metrics[key]:.3f}" for k, key in shown.items() if key in metrics})
            stopping = stop.requested(acc)
            if stopping and ahead is not None and ahead.pending:  # the resumed run samples that batch anew
                ahead.cancel()
                run.sampler.load_state_dict(order)
            if step % cfg.train.save_every == 0 or last or stopping:
                _checkpoint(run, step)
            if stopping and not last:
                bar.close()
                raise TrainingInterrupted(
                    f"stopped by {signal.Signals(stop.signum).name} after step {step}; checkpoint "
                    f"{run.run_dir / 'checkpoints' / f'step-{step}'} written. Continue with: effopd train --run-dir "
                    f"{run.run_dir} --resume", stop.signum,
                )
    bar.close()
    acc.wait_for_everyone()
    return {k: v for k, v in metrics.items() if k.startswith("eval/")}


def train(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Run (or resume) one training run in ``run_dir``; returns the final evaluation metrics."""
    run = setup(cfg, Path(run_dir), resume, overwrite)
    try:
        return loop(run, restore(run), progress)
    except TeacherUnavailable as err:
        last = ckpt.latest(run.run_dir / "checkpoints")
        raise TeacherUnavailable(f"{err}. Training stopped; the last complete checkpoint is {last or 'none (no checkpoint yet)'}: "
                                 f"once the server answers, continue with effopd train --run-dir {run.run_dir} --resume") from err
    finally:
        if cfg.train.report_to:
            run.accelerator.end_training()  # flush the trackers, also after an error
