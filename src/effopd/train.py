"""The training loop: rollout -> score -> advantages -> loss -> update -> log -> eval -> checkpoint.

``train(cfg, run_dir)`` is read top to bottom; every stage is one call. It runs single-process by
default and under ``accelerate launch`` as data-parallel replicas (each process samples its
share of the global batch; gradients are averaged by DDP).

On-policy shortcut: with one optimizer update per batch the "old" policy is the current one, so
``lp_old`` is the detached ``lp_theta`` of the same forward pass (the PPO ratio is exactly 1 and
the clip is inactive), as in verl/TRL when there is a single update per rollout.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from effopd import checkpoint as ckpt
from effopd.config import Config, from_yaml_text, to_yaml
from effopd.data import load_split
from effopd.errors import RunStopped, UserError
from effopd.evaluate import evaluate_model
from effopd.extrapolate import Extrapolator, Score
from effopd.losses import (
    generalized_jsd, gopd_advantages, group_advantages, informative_groups, masked_mean, opd_advantages,
    overlong_penalty, ppo_clip_loss, sft_loss, token_is_weight,
)
from effopd.models import check_same_vocab, freeze, load_model, load_tokenizer
from effopd.module_groups import module_group
from effopd.rewards import reward
from effopd.rollout import Rollout, concat_rollouts, from_completions, generate
from effopd.scoring import gather_logprobs, response_logits, token_logprobs
from effopd.scoring import score as score_logprobs
from effopd.utils import atomic_write_text, isolated_rng

# Keys that may change when resuming (they do not alter the trajectory up to the checkpoint).
RESUMABLE_KEYS = {"train.steps", "train.eval_every", "train.save_every", "train.keep_last"}


class RunDirError(UserError, RuntimeError):
    """The run directory holds something that forbids this start (a run, a different config)."""


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


class MetricsLog:
    """Append-only metrics.jsonl, one object per step; truncated back to a checkpoint on resume."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


@dataclass
class Models:
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    base: torch.nn.Module | None
    tokenizer: object


SCORED_BY_TEACHER = ("opd", "gopd")  # advantages from the teacher's per-token logprobs
SFT_METHODS = ("sft", "sft-gt")


def needs_teacher(cfg: Config) -> bool:
    """grpo/dapo and sft-gt learn from rewards or data alone (unless EffOPD scores by the teacher)."""
    return cfg.loss.method not in ("grpo", "dapo", "sft-gt") or (cfg.extrapolate.enabled and cfg.extrapolate.score == "teacher_logprob")


def check_run_dir(cfg: Config, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Never overwrite a run silently: a non-empty run directory needs ``--resume`` (continue it)
    or ``--overwrite`` (delete it). Only checks; nothing is written until the inputs loaded."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one of them")
    saved = run_dir / "config.yaml"
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if occupied and not (resume or overwrite):
        raise RunDirError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it or "
            "--overwrite to delete it and start again"
        )
    if resume and saved.exists():
        old = from_yaml_text(saved.read_text())
        diff = _diff(old, cfg) - RESUMABLE_KEYS
        if diff:
            raise RunDirError(
                f"--resume: the config differs from {saved} in {sorted(diff)}; only "
                f"{sorted(RESUMABLE_KEYS)} may change on resume. Use a new run directory instead"
            )


def init_run_dir(cfg: Config, run_dir: Path, overwrite: bool) -> None:
    """Create (or, with ``overwrite``, recreate) the run directory and save the resolved config."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))


def _diff(a: Config, b: Config) -> set[str]:
    from omegaconf import OmegaConf

    fa, fb = (_flatten(OmegaConf.to_container(OmegaConf.structured(x))) for x in (a, b))
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def load_models(cfg: Config, device, student_path: str | None = None) -> Models:
    m = cfg.model
    tok = load_tokenizer(m.student, "student")
    teacher = None
    if needs_teacher(cfg):
        check_same_vocab(tok, load_tokenizer(m.teacher, "teacher"), m.student, m.teacher)
        teacher = freeze(load_model(m.teacher, "teacher", m.dtype, device))
    student = load_model(student_path or m.student, "student", m.dtype, device)
    base = None
    if cfg.loss.method == "gopd":  # the frozen student *init*, never a resumed checkpoint
        base = freeze(load_model(m.base or m.student, "student", m.dtype, device))
    return Models(student, teacher, base, tok)


def _lr_scheduler(cfg: Config, optimizer):
    name = cfg.optim.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.train.steps)


def evaluate_step(cfg: Config, model, tokenizer, examples, run_dir: Path, step: int) -> dict:
    e = cfg.eval
    records: list = []
    metrics = evaluate_model(
        model, tokenizer, examples, max_new_tokens=e.max_new_tokens, samples=e.samples, greedy=e.greedy,
        temperature=e.temperature, top_p=e.top_p, batch_size=e.batch_size, seed=e.seed, records=records,
    )
    atomic_write_text(run_dir / "eval" / f"step-{step}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return {f"eval/{k}": v for k, v in metrics.items()}


@dataclass
class Batch:
    """What one update trains on: the sequences, their reference answers, and (for grpo/dapo)
    the reward of each sequence, grouped by prompt in consecutive runs of ``group_size`` rows."""

    rollout: Rollout
    golds: list[str]
    rewards_B: torch.Tensor | None = None
    group_size: int = 1
    metrics: dict | None = None


def sample_rewards(cfg: Config, rollout: Rollout, golds: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(verifiable outcome reward, outcome + overlong penalty) per sampled response."""
    outcome_B = torch.tensor([reward(t, g) for t, g in zip(rollout.texts, golds)], dtype=torch.float32)
    total_B = outcome_B
    if cfg.loss.overlong_penalty > 0:
        total_B = outcome_B + overlong_penalty(rollout.lengths_B.cpu(), cfg.rollout.max_new_tokens,
                                               cfg.loss.overlong_buffer, cfg.loss.overlong_penalty)
    return outcome_B, total_B


def assemble_batch(cfg: Config, models: Models, student, draw, k: int) -> Batch:
    """Build the batch of one update from ``k`` prompts; ``draw(k)`` returns the next k training
    examples of this process. The methods differ only here and in ``policy_step``'s loss:

    - on-policy (opd, gopd, gkd, grpo, dapo): the student samples n responses per prompt;
    - dapo (dynamic sampling): groups whose rewards are all equal are dropped and fresh prompts
      are sampled until the batch is full again (at most ``loss.max_sample_rounds`` rounds);
    - sft: the teacher samples the responses (off-policy distillation);
    - sft-gt: the responses are the data's own worked solutions.
    """
    r = cfg.rollout
    method = cfg.loss.method

    def sample(model, examples):
        return generate(model, models.tokenizer, [e.prompt for e in examples], max_new_tokens=r.max_new_tokens,
                        temperature=r.temperature, top_p=r.top_p)

    if method == "sft-gt":
        examples = draw(k)
        missing = [e for e in examples if e.solution is None]
        if missing:
            raise ValueError(
                f"loss.method=sft-gt trains on worked solutions, but {missing[0].source or 'a training example'} has none; "
                f"add a `{cfg.data.solution_field}` field to data.train (or set data.solution_field)"
            )
        ro = from_completions(models.tokenizer, [e.prompt for e in examples], [e.solution for e in examples])
        return Batch(ro, [e.answer for e in examples])
    if method == "sft":
        examples = [e for e in draw(k) for _ in range(r.n)]
        ro = sample(models.teacher, examples)
        golds = [e.answer for e in examples]
        return Batch(ro, golds, metrics={"train/target_reward": sum(map(reward, ro.texts, golds)) / len(golds)})

    examples = [e for e in draw(k) for _ in range(r.n)]
    ro = sample(student, examples)
    golds = [e.answer for e in examples]
    if method not in ("grpo", "dapo"):
        return Batch(ro, golds)
    outcome_B, total_B = sample_rewards(cfg, ro, golds)
    if not cfg.loss.dynamic_sampling:
        return Batch(ro, golds, total_B, r.n, {"train/reward": outcome_B.mean().item()})

    parts, kept_golds, kept_rewards, all_outcomes, rounds = [], [], [], [outcome_B], 1
    while True:
        keep_G = informative_groups(total_B, r.n)
        rows = keep_G.repeat_interleave(r.n).nonzero().squeeze(-1)
        parts.append(ro.select(rows))
        kept_golds += [golds[i] for i in rows.tolist()]
        kept_rewards.append(total_B[rows])
        if len(kept_golds) >= k * r.n or rounds >= cfg.loss.max_sample_rounds:
            break
        examples = [e for e in draw(k) for _ in range(r.n)]
        ro, golds, rounds = sample(student, examples), [e.answer for e in examples], rounds + 1
        outcome_B, total_B = sample_rewards(cfg, ro, golds)
        all_outcomes.append(outcome_B)
    metrics = {"train/reward": torch.cat(all_outcomes).mean().item(), "train/sample_rounds": rounds}
    if not kept_golds:  # nothing informative: every advantage is 0, the update is weight decay only
        metrics["train/kept_groups"] = 0
        return Batch(ro, golds, total_B, r.n, metrics)
    kept = concat_rollouts([p for p in parts if p.texts], models.tokenizer.pad_token_id)
    n_rows = min(len(kept_golds), k * r.n)
    metrics["train/kept_groups"] = n_rows // r.n
    return Batch(kept.select(slice(0, n_rows)), kept_golds[:n_rows], torch.cat(kept_rewards)[:n_rows], r.n, metrics)


def policy_step(cfg: Config, accelerator: Accelerator, models: Models, batch: Batch) -> dict:
    """Form each method's per-token signal and accumulate gradients of its loss over
    micro-batches (weighted so that the result equals one pass over the whole batch)."""
    method, loss_cfg, rollout = cfg.loss.method, cfg.loss, batch.rollout
    temperature = 1.0 if method in SFT_METHODS else cfg.rollout.temperature
    t0 = time.time()
    chunk = cfg.train.score_chunk_size
    teacher_logp_BT = score_logprobs(models.teacher, rollout, chunk_size=chunk) if method in SCORED_BY_TEACHER else None
    base_logp_BT = score_logprobs(models.base, rollout, chunk_size=chunk) if models.base is not None else None
    seq_adv_B = None
    if batch.rewards_B is not None:
        seq_adv_B = group_advantages(batch.rewards_B, batch.group_size, std_norm=loss_cfg.std_norm)
    t_score = time.time() - t0

    B = rollout.response_ids_BT.shape[0]
    mb = cfg.train.micro_batch_size or B
    total_tokens = rollout.response_mask_BT.sum().clamp(min=1)
    sums: dict[str, float] = {"loss": 0.0}
    for i in range(0, B, mb):
        part, sl = rollout.select(slice(i, i + mb)), slice(i, i + mb)
        mask_BT = part.response_mask_BT.to(accelerator.device)
        if method == "gkd":
            logits_BTV = response_logits(models.student, part, temperature)
            with torch.no_grad():
                teacher_logits_BTV = response_logits(models.teacher, part, temperature)
            loss, m = generalized_jsd(logits_BTV, teacher_logits_BTV, mask_BT, beta=loss_cfg.gkd_beta,
                                      top_k=loss_cfg.gkd_top_k, agg=loss_cfg.aggregation)
            with torch.no_grad():
                m["reverse_kl"] = masked_mean(gather_logprobs(logits_BTV, part) - gather_logprobs(teacher_logits_BTV, part), mask_BT).item()
        elif method in SFT_METHODS:
            loss, m = sft_loss(token_logprobs(models.student, part), mask_BT, agg=loss_cfg.aggregation,
                               norm_len=rollout.response_ids_BT.shape[1])
        else:
            logp_BT = token_logprobs(models.student, part, temperature=temperature)
            old_logp_BT = logp_BT.detach()
            if method == "gopd":
                adv_BT = gopd_advantages(teacher_logp_BT[sl], old_logp_BT, base_logp_BT[sl], mask_BT, loss_cfg.lam)
            elif method == "opd":
                adv_BT = opd_advantages(teacher_logp_BT[sl], old_logp_BT, mask_BT)
            else:  # grpo / dapo: the sequence's advantage on each of its tokens
                adv_BT = seq_adv_B[sl].to(mask_BT.device)[:, None] * mask_BT
            w_BT = token_is_weight(old_logp_BT, part.logp_BT.to(old_logp_BT.device), loss_cfg.is_cap) if loss_cfg.rollout_is else None
            loss, m = ppo_clip_loss(
                logp_BT, old_logp_BT, adv_BT, mask_BT, clip_eps_low=loss_cfg.clip_eps_low,
                clip_eps_high=loss_cfg.clip_eps_high, dual_clip_c=loss_cfg.dual_clip_c, is_weight_BT=w_BT,
                agg=loss_cfg.aggregation, norm_len=rollout.response_ids_BT.shape[1],
            )
            if teacher_logp_BT is not None:
                m["reverse_kl"] = float(masked_mean(old_logp_BT - teacher_logp_BT[sl], mask_BT))
        weight = (mask_BT.sum() / total_tokens) if loss_cfg.aggregation == "token-mean" else (part.response_ids_BT.shape[0] / B)
        last = i + mb >= B
        with accelerator.no_sync(models.student) if not last else contextlib.nullcontext():
            accelerator.backward(loss * weight)
        sums["loss"] += loss.item() * float(weight)
        for key in ("clip_frac", "reverse_kl", "jsd", "nll"):
            if key in m:
                sums[key] = sums.get(key, 0.0) + m[key] * float(weight)
    out = {f"train/{k}": v for k, v in sums.items()}
    out.update(batch.metrics or {})
    if method not in SFT_METHODS and "train/reward" not in out:  # grpo/dapo scored their samples already
        out["train/reward"] = sum(map(reward, rollout.texts, batch.golds)) / len(batch.golds)
    out.update({"train/response_length": rollout.lengths_B.float().mean().item(), "time/score": t_score})
    return out


ANCHOR_FILE = "extrapolate_anchor.safetensors"


def make_extrapolator(cfg: Config, model) -> Extrapolator:
    """EffOPD over the 2-D weights of the configured module types (logged at start-up)."""
    x = cfg.extrapolate
    params = {n: p for n, p in model.named_parameters() if p.ndim == 2 and module_group(n).type in x.modules}
    return Extrapolator(
        params, schedule=x.schedule, max_tries=x.max_tries, margin=x.margin, trigger_steps=x.trigger_steps,
        max_step=x.max_step, init_gain=x.init_gain, min_gain=x.min_gain, max_gain=x.max_gain, storage=x.storage,
    )


def validation_scorer(cfg: Config, model, models: Models, val_set, seed: int):
    """``score()`` for one search: samples the validation prompts with a fixed seed (the same for
    every candidate: common random numbers) and returns the mean and standard error over prompts
    of the verifiable reward, or of the teacher's mean per-token logprob of the samples."""
    x = cfg.extrapolate
    k = 1 if x.val_greedy else x.val_samples
    examples = val_set[: x.val_prompts]
    prompts = [e.prompt for e in examples for _ in range(k)]

    def score() -> Score:
        with isolated_rng(seed):
            ro = generate(model, models.tokenizer, prompts, max_new_tokens=cfg.rollout.max_new_tokens,
                          temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, greedy=x.val_greedy)
        if x.score == "reward":
            per_sample = torch.tensor([reward(t, examples[i // k].answer) for i, t in enumerate(ro.texts)])
        else:
            lp_BT = score_logprobs(models.teacher, ro, chunk_size=cfg.train.score_chunk_size)
            per_sample = (lp_BT.sum(-1) / ro.response_mask_BT.sum(-1).clamp(min=1)).cpu()
        per_prompt = per_sample.view(len(examples), k).mean(-1)
        noise = float(per_prompt.std() / len(examples) ** 0.5) if len(examples) > 1 else 0.0
        return Score(float(per_prompt.mean()), noise)

    return score


def save_checkpoint(accelerator, cfg, run_dir, step, models, optimizer, scheduler, sampler, extrapolator=None) -> None:
    root = run_dir / "checkpoints"
    try:
        _write_checkpoint(accelerator, cfg, root, step, models, optimizer, scheduler, sampler, extrapolator)
    except OSError as err:
        shutil.rmtree(ckpt.tmp_dir(root, step), ignore_errors=True)
        previous = ckpt.latest(root)
        raise ckpt.CheckpointError(
            f"could not write checkpoint step-{step} in {root}: {err}. The previous checkpoint "
            f"({previous or 'none'}) is intact; free disk space or fix permissions, then continue with --resume"
        ) from err


def _write_checkpoint(accelerator, cfg, root, step, models, optimizer, scheduler, sampler, extrapolator) -> None:
    if accelerator.is_main_process:
        tmp = ckpt.begin(root, step)
        accelerator.unwrap_model(models.student).save_pretrained(tmp)
        models.tokenizer.save_pretrained(tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()}
        if extrapolator is not None:
            state["extrapolate"] = extrapolator.state_dict()
            save_file({n: t.contiguous() for n, t in extrapolator.anchor.items()}, tmp / ANCHOR_FILE)
        torch.save(state, tmp / ckpt.STATE_FILE)
    accelerator.wait_for_everyone()
    ckpt.save_rng(ckpt.tmp_dir(root, step), accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.finish(root, step, accelerator.num_processes, cfg.train.keep_last)
    accelerator.wait_for_everyone()


def train(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Run (or resume) one training run in ``run_dir``; returns the final evaluation metrics."""
    run_dir = Path(run_dir)
    use_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=use_cpu)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    check_run_dir(cfg, run_dir, resume, overwrite)
    if cfg.rollout.batch_size % world:
        raise ValueError(f"rollout.batch_size={cfg.rollout.batch_size} must be divisible by the {world} processes")

    resume_from = ckpt.latest(run_dir / "checkpoints") if resume else None
    train_set, eval_set = load_split(cfg.data.train, cfg.data, "train"), load_split(cfg.data.eval, cfg.data, "eval")
    if not train_set:
        raise ValueError(f"data.train={cfg.data.train} holds no examples")
    val_set = load_split(cfg.data.val, cfg.data, "val") if cfg.extrapolate.enabled else None
    torch.manual_seed(cfg.train.seed + accelerator.process_index)
    models = load_models(cfg, accelerator.device, student_path=str(resume_from) if resume_from else None)
    accelerator.wait_for_everyone()  # every process checked the old run dir before it changes
    if is_main:
        init_run_dir(cfg, run_dir, overwrite)
    accelerator.wait_for_everyone()

    optimizer = torch.optim.AdamW(
        models.student.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    scheduler = _lr_scheduler(cfg, optimizer)
    models.student, optimizer, scheduler = accelerator.prepare(models.student, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(models.student)
    sampler = PromptSampler(len(train_set), cfg.train.seed)
    log = MetricsLog(run_dir / "metrics.jsonl", is_main)
    extrapolator = None
    if cfg.extrapolate.enabled:
        extrapolator = make_extrapolator(cfg, unwrapped)
        if is_main:
            n = sum(p.numel() for p in extrapolator.params.values())
            print(f"EffOPD: extrapolating {len(extrapolator.params)} tensors ({n:,} parameters) of types "
                  f"{cfg.extrapolate.modules}; validation on {min(len(val_set), cfg.extrapolate.val_prompts)} prompts")

    start = 0
    if resume_from is not None:
        state = ckpt.load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        start = state["step"]
        if extrapolator is not None:
            extrapolator.load_state_dict(state["extrapolate"], load_file(resume_from / ANCHOR_FILE))
        ckpt.load_rng(resume_from, accelerator.process_index)
        log.truncate_after(start)
        if is_main:
            print(f"resuming {run_dir} from {resume_from.name}")
    elif is_main:
        log.truncate_after(-1)

    def maybe_eval(step: int) -> dict:
        metrics = {}
        if is_main:
            metrics = evaluate_step(cfg, unwrapped, models.tokenizer, eval_set, run_dir, step)
        accelerator.wait_for_everyone()
        return metrics

    if start == 0 and cfg.train.eval_every:
        log.log(0, maybe_eval(0))

    per_rank = cfg.rollout.batch_size // world

    def draw(k: int) -> list:
        """This process's share of the next global batch of prompts (every process advances the
        shared order by the whole batch, so the replicas stay in step)."""
        idx = sampler.next(k * world)
        return [train_set[i] for i in idx[accelerator.process_index * k : (accelerator.process_index + 1) * k]]
    bar = tqdm(range(start + 1, cfg.train.steps + 1), desc="train", disable=not (progress and is_main), initial=start, total=cfg.train.steps)
    metrics: dict = {}
    nonfinite_run, nonfinite_total = 0, 0
    with StopSignal() as stop:
        for step in bar:
            t_step = time.time()
            t0 = time.time()
            batch = assemble_batch(cfg, models, unwrapped, draw, per_rank)
            t_rollout = time.time() - t0

            t0 = time.time()
            metrics = policy_step(cfg, accelerator, models, batch)
            grad_norm = float(accelerator.clip_grad_norm_(models.student.parameters(), cfg.optim.grad_clip or math.inf))
            if math.isfinite(metrics["train/loss"]) and math.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
                nonfinite_run = 0
            else:  # skip the update; the weights and the optimizer state stay as they were
                nonfinite_run, nonfinite_total = nonfinite_run + 1, nonfinite_total + 1
            optimizer.zero_grad(set_to_none=True)
            metrics.update({
                "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                "train/nonfinite_skipped": nonfinite_total,
                "time/rollout": t_rollout, "time/update": time.time() - t0 - metrics["time/score"],
            })
            if nonfinite_run >= cfg.train.max_nonfinite:
                log.log(step, metrics)
                last_good = ckpt.latest(run_dir / "checkpoints")
                raise NonFiniteError(
                    f"{nonfinite_run} consecutive steps (up to step {step}) had a non-finite loss or gradient; "
                    f"stopping. The last good checkpoint is {last_good or 'none (no checkpoint yet)'}. Lower optim.lr, "
                    "check the teacher's logprobs, or raise train.max_nonfinite"
                )
            if nonfinite_run == 0 and extrapolator is not None and extrapolator.should_trigger(step):
                seed = cfg.extrapolate.val_seed + len(extrapolator.history)
                rec = extrapolator.search(step, validation_scorer(cfg, unwrapped, models, val_set, seed))
                metrics.update({
                    "extrapolate/s0": rec.s0, "extrapolate/best": rec.best, "extrapolate/accepted_c": rec.accepted_c,
                    "extrapolate/candidates": rec.candidates, "extrapolate/scores": rec.scores, "extrapolate/noise": rec.noise,
                    "extrapolate/update_norm": rec.update_norm, "extrapolate/seconds": rec.seconds,
                    "extrapolate/total_seconds": extrapolator.total_seconds,
                })
            metrics["time/step"] = time.time() - t_step

            last = step == cfg.train.steps
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or last:
                metrics.update(maybe_eval(step))
            log.log(step, metrics)
            shown = {"reward": "train/reward", "kl": "train/reverse_kl", "nll": "train/nll", "eval": "eval/accuracy"}
            bar.set_postfix({k: f"{metrics[key]:.3f}" for k, key in shown.items() if key in metrics})
            stopping = stop.requested(accelerator)
            if step % cfg.train.save_every == 0 or last or stopping:
                save_checkpoint(accelerator, cfg, run_dir, step, models, optimizer, scheduler, sampler, extrapolator)
            if stopping and not last:
                bar.close()
                name = signal.Signals(stop.signum).name
                raise TrainingInterrupted(
                    f"stopped by {name} after step {step}; checkpoint {run_dir / 'checkpoints' / f'step-{step}'} "
                    f"written. Continue with: effopd train --run-dir {run_dir} --resume", stop.signum,
                )
    bar.close()
    accelerator.wait_for_everyone()
    return {k: v for k, v in metrics.items() if k.startswith("eval/")}
