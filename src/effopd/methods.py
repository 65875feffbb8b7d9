"""The training methods, one record each, registered in ``METHODS`` at the bottom of this file.

A ``Method`` says what it needs loaded, which loss settings it fills when they are left null,
how it assembles the batch of one update, what it computes once per batch without gradient
(teacher and base logprobs, advantages), and its loss on one micro-batch. The trainer
(``train.py``) knows no method by name: it calls ``assemble``, then ``prepare``, then ``loss``
on each micro-batch. Adding a method is one record here (and its math in ``losses.py``).

Every loss of a micro-batch is divided by the normaliser of the whole (mini-)batch, counted
over every data-parallel process (``losses.aggregation_count``), so the gradients summed over
micro-batches and averaged over processes equal one pass over the whole global batch, for
every aggregation.

Temperature (one convention for every method, see ``losses.py``): ``rollout.temperature`` τ
tempers the student's sampling distribution and every distribution it is compared with. The
student's logprobs, the teacher's and the base's (OPD, G-OPD, EffOPD's teacher score) and both
sides of GKD's divergence are all taken from logits / τ. SFT learns the untempered distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from effopd.losses import (
    aggregation_count, generalized_jsd, gopd_advantages, group_advantages, informative_groups, masked_mean,
    opd_advantages, overlong_penalty, ppo_clip_loss, sft_loss, token_is_weight,
)
from effopd.rewards import reward
from effopd.rollout import Rollout, concat_rollouts, from_completions, generate
from effopd.scoring import gather_logprobs, response_logits, token_logprobs, trimmed
from effopd.scoring import score as score_logprobs
from effopd.teachers import Routed, Teacher
from effopd.teachers import start_logprobs as start_teacher_logprobs


@dataclass
class Models:
    student: torch.nn.Module
    teacher: torch.nn.Module | Teacher | Routed | None
    """A local model, a served teacher's client, or several of them routed by prompt."""
    base: torch.nn.Module | None
    tokenizer: object


@dataclass
class Batch:
    """What one update trains on: the sequences, their reference answers, per-row tensors
    computed once per batch (``signals``: teacher/base/old logprobs ``(B, T)``, sequence
    advantages ``(B,)``), and for grpo/dapo the reward of each sequence, grouped by prompt in
    consecutive runs of ``group_size`` rows."""

    rollout: Rollout
    golds: list[str]
    rewards_B: torch.Tensor | None = None
    group_size: int = 1
    metrics: dict = field(default_factory=dict)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.golds)

    def weightless(self) -> "Batch":
        """The batch with every response token masked out: it still runs forward and backward
        (so a process joins the gradient all-reduce) but adds nothing to the loss, its gradient
        or the normaliser."""
        ro = self.rollout
        zero = Rollout(ro.prompt_ids_BP, ro.prompt_mask_BP, ro.response_ids_BT, torch.zeros_like(ro.response_mask_BT),
                       ro.logp_BT, ro.texts)
        return Batch(zero, self.golds, self.rewards_B, self.group_size, self.metrics, self.signals)

    def part(self, start: int, size: int) -> "Batch":
        """Rows ``start .. start + size``; with none there (a process short of rows, size 0 or
        past its end), one weightless row, so that it still makes the forward passes the others make."""
        if size > 0 and start < len(self):
            return self.select(slice(start, start + size))
        return self.select(slice(0, 1)).weightless()

    def select(self, rows: slice | torch.Tensor) -> "Batch":
        """Rows ``rows`` (a slice or an index tensor) of everything (for mini- and micro-batches)."""
        golds = self.golds[rows] if isinstance(rows, slice) else [self.golds[i] for i in rows.tolist()]
        return Batch(self.rollout.select(rows), golds,
                     None if self.rewards_B is None else self.rewards_B[rows], self.group_size, self.metrics,
                     {k: v[rows] for k, v in self.signals.items()})

    def trimmed(self) -> "Batch":
        """The same rows on the narrowest padded width (:func:`effopd.scoring.trimmed`); the
        per-token signals are cut to the new response width."""
        ro = trimmed(self.rollout)
        T, t = self.rollout.response_ids_BT.shape[1], ro.response_ids_BT.shape[1]
        signals = {k: v[:, :t] if v.dim() >= 2 and v.shape[1] == T else v for k, v in self.signals.items()}
        return Batch(ro, self.golds, self.rewards_B, self.group_size, self.metrics, signals)


@dataclass
class Prompts:
    """Where a method gets its prompts: ``prompts(k)`` returns the next k training examples of
    this process; ``any_replica(flag)`` is True on every process when ``flag`` is True on one
    (so a process decides to sample again only together with the others)."""

    draw: Callable[[int], list]
    any_replica: Callable[[bool], bool] = bool

    def __call__(self, k: int) -> list:
        return self.draw(k)


Draw = Prompts | Callable[[int], list]
"""A ``Prompts``, or a plain ``draw(k)`` for methods that never sample twice in one batch."""


@dataclass(frozen=True)
class Method:
    name: str
    assemble: Callable[..., Batch]
    """``assemble(cfg, models, student, draw, k) -> Batch`` from k prompts."""
    loss: Callable[..., tuple[torch.Tensor, dict]]
    """``loss(cfg, models, part, denominator) -> (loss, metrics)`` of one micro-batch ``part``."""
    prepare: Callable[..., None] | None = None
    """``prepare(cfg, models, batch)``: per-batch tensors without gradient, into ``batch.signals``."""
    needs_teacher: bool = False
    local_teacher: Callable[..., str | None] = lambda cfg: None
    """``local_teacher(cfg)``: why the teacher must be a local model under ``cfg`` (what a served
    teacher cannot give), or None when a served one will do."""
    needs_base: bool = False
    group: bool = False
    """n responses per prompt form a group that the loss compares (needs rollout.n >= 2)."""
    ratio: bool = False
    """The loss is a clipped ratio to the sampling-time policy (``lp_old``)."""
    needs_solutions: bool = False
    """Every training example must carry a worked solution (checked before the run starts)."""
    defaults: dict = field(default_factory=dict)
    """``loss.*`` values filled when the config leaves them null (explicit values win)."""


# ---- batches -----------------------------------------------------------------------------------


def _sample(cfg, models: Models, model, examples) -> Rollout:
    r = cfg.rollout
    # several teachers: the sampler's logprobs give each teacher's reverse KL (train/reverse_kl/NAME)
    return generate(model, models.tokenizer, [e.prompt for e in examples], max_new_tokens=r.max_new_tokens,
                    temperature=r.temperature, top_p=r.top_p, batch_size=r.generation_batch_size, backend=r.backend,
                    keep_logprobs=cfg.loss.rollout_is or isinstance(models.teacher, Routed))


def _reward_metric(cfg, key: str, ro: Rollout, golds: list[str]) -> dict:
    """``{key: mean verifiable reward}`` of a batch the loss does not score by reward, or nothing
    with ``train.log_reward=false`` (no answer is checked)."""
    return {key: sum(map(reward, ro.texts, golds)) / len(golds)} if cfg.train.log_reward else {}


def _repeat(cfg, examples) -> list:
    return [e for e in examples for _ in range(cfg.rollout.n)]


def student_samples(cfg, models: Models, student, draw: Draw, k: int) -> Batch:
    """The student samples rollout.n responses to each of k prompts; logs their reward (``train.log_reward``)."""
    examples = _repeat(cfg, draw(k))
    ro = _sample(cfg, models, student, examples)
    golds = [e.answer for e in examples]
    batch = Batch(ro, golds, metrics=_reward_metric(cfg, "train/reward", ro, golds))
    if isinstance(models.teacher, Routed):  # each row is scored by its prompt's teacher
        batch.signals["teacher_route_B"] = models.teacher.index([e.teacher for e in examples])
    return batch


def teacher_samples(cfg, models: Models, student, draw: Draw, k: int) -> Batch:
    """The teacher samples the responses (off-policy distillation); logs their reward (``train.log_reward``)."""
    examples = _repeat(cfg, draw(k))
    ro = _sample(cfg, models, models.teacher, examples)
    golds = [e.answer for e in examples]
    return Batch(ro, golds, metrics=_reward_metric(cfg, "train/target_reward", ro, golds))


def check_solutions(cfg, examples) -> None:
    """Raise naming the first example (in file order) without a worked solution."""
    missing = next((e for e in examples if e.solution is None), None)
    if missing is not None:
        from effopd.data.loaders import DatasetError

        raise DatasetError(
            f"loss.method={cfg.loss.method} trains on worked solutions, but {missing.source or 'a training example'} has "
            f"none; add a `{cfg.data.solution_field}` field to data.train (or set data.solution_field)"
        )


def worked_solutions(cfg, models: Models, student, draw: Draw, k: int) -> Batch:
    """The data's own worked solutions (``data.solution_field``), teacher-forced."""
    examples = draw(k)
    check_solutions(cfg, examples)
    ro = from_completions(models.tokenizer, [e.prompt for e in examples], [e.solution for e in examples])
    return Batch(ro, [e.answer for e in examples])


def sample_rewards(cfg, rollout: Rollout, golds: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(verifiable outcome reward, outcome + overlong penalty) per sampled response."""
    outcome_B = torch.tensor([reward(t, g) for t, g in zip(rollout.texts, golds)], dtype=torch.float32)
    total_B = outcome_B
    if cfg.loss.overlong_penalty > 0:
        total_B = outcome_B + overlong_penalty(rollout.lengths_B.cpu(), cfg.rollout.max_new_tokens,
                                               cfg.loss.overlong_buffer, cfg.loss.overlong_penalty)
    return outcome_B, total_B


def rewarded_groups(cfg, models: Models, student, draw: Draw, k: int) -> Batch:
    """The student samples groups of rollout.n responses, each scored by the verifier. With
    ``loss.dynamic_sampling``, groups whose rewards are all equal are dropped and fresh prompts
    are sampled until the batch is full again (at most ``loss.max_sample_rounds`` rounds)."""
    n = cfg.rollout.n
    examples = _repeat(cfg, draw(k))
    ro, golds = _sample(cfg, models, student, examples), [e.answer for e in examples]
    outcome_B, total_B = sample_rewards(cfg, ro, golds)
    if not cfg.loss.dynamic_sampling:
        return Batch(ro, golds, total_B, n, {"train/reward": outcome_B.mean().item()})

    agree = draw.any_replica if isinstance(draw, Prompts) else bool
    parts, kept_golds, kept_rewards, all_outcomes, rounds = [], [], [], [outcome_B], 1
    while True:
        keep_G = informative_groups(total_B, n)
        rows = keep_G.repeat_interleave(n).nonzero().squeeze(-1)
        parts.append(ro.select(rows))
        kept_golds += [golds[i] for i in rows.tolist()]
        kept_rewards.append(total_B[rows])
        # every process runs the same number of rounds (each round advances the shared prompt
        # order): the rounds go on while any process is short, up to loss.max_sample_rounds
        short = len(kept_golds) < k * n
        if rounds >= cfg.loss.max_sample_rounds or not agree(short):
            break
        # a process that is full samples too (a sharded student generates collectively); it
        # keeps only its first k groups
        examples, rounds = _repeat(cfg, draw(k)), rounds + 1
        ro, golds = _sample(cfg, models, student, examples), [e.answer for e in examples]
        outcome_B, total_B = sample_rewards(cfg, ro, golds)
        all_outcomes.append(outcome_B)
    metrics = {"train/reward": torch.cat(all_outcomes).mean().item(), "train/sample_rounds": rounds}
    if not kept_golds:  # nothing informative: every advantage and so the loss's gradient is 0, but AdamW
        # still applies weight decay and the momentum of earlier updates. The rows count for nothing,
        # also not in the normaliser of the other processes' kept rows.
        metrics.update({"train/kept_groups": 0, "train/response_length": ro.lengths_B.float().mean().item()})
        return Batch(ro, golds, total_B, n, metrics).weightless()
    kept = concat_rollouts([p for p in parts if p.texts], models.tokenizer.pad_token_id).select(slice(0, k * n))
    metrics.update({"train/kept_groups": len(kept.texts) // n, "train/response_length": kept.lengths_B.float().mean().item()})
    return Batch(kept, kept_golds[: k * n], torch.cat(kept_rewards)[: k * n], n, metrics)


# ---- per-batch signals (no gradient) -----------------------------------------------------------


def teacher_logprobs(cfg, models: Models, batch: Batch, while_waiting: Callable[[], None] | None = None) -> None:
    """The teacher's logprob of each sampled token at rollout.temperature (see the module docstring);
    with several teachers, each row's own teacher's, and each teacher's reverse KL on its rows.
    ``while_waiting`` runs while a served teacher's request is out (local work that overlaps it)."""
    route = batch.signals.get("teacher_route_B")
    pending = start_teacher_logprobs(models.teacher, batch.rollout, cfg.rollout.temperature, route=route,
                                     chunk_size=cfg.train.score_chunk_size, chunk_positions=cfg.train.logit_chunk,
                                     buckets=cfg.train.score_buckets, pack=cfg.train.pack)
    if while_waiting is not None:
        while_waiting()
    lp_BT = pending()
    batch.signals["teacher_logp_BT"] = lp_BT
    if route is not None:  # token-weighted over processes: a sum and a count per teacher
        ro = batch.rollout
        mask_BT = ro.response_mask_BT.to(lp_BT.device).float()
        kl_BT = (ro.logp_BT.to(lp_BT.device) - lp_BT) * mask_BT
        for k, name in enumerate(models.teacher.names):
            rows = (route == k).to(lp_BT.device)
            batch.metrics[f"train/reverse_kl/{name}:sum"] = float(kl_BT[rows].sum())
            batch.metrics[f"train/reverse_kl/{name}:count"] = float(mask_BT[rows].sum())


def teacher_and_base_logprobs(cfg, models: Models, batch: Batch) -> None:
    """G-OPD's teacher and base logprobs; the base (local) is scored while a served teacher answers."""

    def base() -> None:
        batch.signals["base_logp_BT"] = score_logprobs(models.base, batch.rollout, temperature=cfg.rollout.temperature,
                                                       chunk_size=cfg.train.score_chunk_size,
                                                       chunk_positions=cfg.train.logit_chunk,
                                                       buckets=cfg.train.score_buckets, pack=cfg.train.pack)

    teacher_logprobs(cfg, models, batch, while_waiting=base)


def sequence_advantages(cfg, models: Models, batch: Batch) -> None:
    batch.signals["seq_adv_B"] = group_advantages(batch.rewards_B, batch.group_size, std_norm=cfg.loss.std_norm)


# ---- losses of one micro-batch -----------------------------------------------------------------


def _opd(part: Batch, old_logp_BT, mask_BT, cfg):
    return opd_advantages(part.signals["teacher_logp_BT"], old_logp_BT, mask_BT)


def _gopd(part: Batch, old_logp_BT, mask_BT, cfg):
    s = part.signals
    return gopd_advantages(s["teacher_logp_BT"], old_logp_BT, s["base_logp_BT"], mask_BT, cfg.loss.lam)


def _sequence(part: Batch, old_logp_BT, mask_BT, cfg):
    """The sequence's advantage on each of its tokens (GRPO/DAPO)."""
    return part.signals["seq_adv_B"].to(mask_BT.device)[:, None] * mask_BT


def policy_gradient(advantages: Callable) -> Callable:
    """The clipped policy loss with per-token advantages from ``advantages(part, lp_old, mask, cfg)``.
    ``lp_old`` is the sampling-time logprob: precomputed when a batch gets several updates
    (``signals["old_logp_BT"]``), else the detached current logprob (then the ratio is 1)."""

    def loss(cfg, models: Models, part: Batch, denominator):
        lc, ro = cfg.loss, part.rollout
        mask_BT = ro.response_mask_BT.to(next(models.student.parameters()).device)
        logp_BT = token_logprobs(models.student, ro, temperature=cfg.rollout.temperature, chunk_positions=cfg.train.logit_chunk,
                                 pack=cfg.train.pack)
        old_logp_BT = part.signals["old_logp_BT"].to(logp_BT.device) if "old_logp_BT" in part.signals else logp_BT.detach()
        adv_BT = advantages(part, old_logp_BT, mask_BT, cfg)
        w_BT = token_is_weight(old_logp_BT, ro.logp_BT.to(old_logp_BT.device), lc.is_cap) if lc.rollout_is else None
        out, m = ppo_clip_loss(
            logp_BT, old_logp_BT, adv_BT, mask_BT, clip_eps_low=lc.clip_eps_low, clip_eps_high=lc.clip_eps_high,
            dual_clip_c=lc.dual_clip_c, is_weight_BT=w_BT, agg=lc.aggregation, norm_len=cfg.rollout.max_new_tokens,
            denominator=denominator,
        )
        if "teacher_logp_BT" in part.signals:
            m["reverse_kl"] = float(masked_mean(logp_BT.detach() - part.signals["teacher_logp_BT"], mask_BT))
        return out, m

    return loss


def gkd_loss(cfg, models: Models, part: Batch, denominator):
    """Generalized JSD between teacher and student next-token distributions (both at
    rollout.temperature), plus the sampled tokens' reverse KL as a metric.

    Memory: both models' full (B, T, V) float32 logits are built (``response_logits``), the one
    place in training that does. With ``loss.gkd_top_k`` nothing else of that size is: the
    divergence takes the teacher's top-k from its raw logits chunk by chunk, and the reverse-KL
    metric is the chosen logit minus a chunked logsumexp (no full softmax of either model).
    A served teacher (which needs ``loss.gkd_top_k``) sends that top-k side and the sampled
    tokens' logprobs instead: no teacher logits are built in the trainer at all."""
    ro, t = part.rollout, cfg.rollout.temperature
    logits_BTV = response_logits(models.student, ro, t)
    mask_BT = ro.response_mask_BT.to(logits_BTV.device)
    common = dict(beta=cfg.loss.gkd_beta, agg=cfg.loss.aggregation, norm_len=cfg.rollout.max_new_tokens, denominator=denominator)
    if isinstance(models.teacher, torch.nn.Module):
        with torch.no_grad():
            teacher_logits_BTV = response_logits(models.teacher, ro, t)
        out, m = generalized_jsd(logits_BTV, teacher_logits_BTV, mask_BT, top_k=cfg.loss.gkd_top_k, **common)
        with torch.no_grad():
            teacher_lp_BT = gather_logprobs(teacher_logits_BTV, ro)
    else:  # a served teacher sends its top-k side (the same numbers teacher_top_k computes here)
        ids_BTK, lp_BTK1, teacher_lp_BT = models.teacher.topk(ro, cfg.loss.gkd_top_k, t)
        out, m = generalized_jsd(logits_BTV, None, mask_BT, teacher_side=(ids_BTK, lp_BTK1), **common)
    with torch.no_grad():
        m["reverse_kl"] = masked_mean(gather_logprobs(logits_BTV, ro) - teacher_lp_BT.to(logits_BTV.device), mask_BT).item()
    return out, m


def nll_loss(cfg, models: Models, part: Batch, denominator):
    """Cross-entropy of the batch's responses under the (untempered) student."""
    logp_BT = token_logprobs(models.student, part.rollout, chunk_positions=cfg.train.logit_chunk, pack=cfg.train.pack)
    mask_BT = part.rollout.response_mask_BT.to(logp_BT.device)
    return sft_loss(logp_BT, mask_BT, agg=cfg.loss.aggregation, norm_len=cfg.rollout.max_new_tokens, denominator=denominator)


def normaliser_count(cfg, batch: Batch) -> int:
    """What ``loss.aggregation`` counts in this process's share of a (mini-)batch; the trainer
    adds the counts of all processes to get the loss's denominator."""
    return aggregation_count(batch.rollout.response_mask_BT, cfg.loss.aggregation)


# ---- the table ---------------------------------------------------------------------------------

_PG = {"aggregation": "token-mean", "clip_eps_high": None, "dynamic_sampling": False, "overlong_penalty": 0.0}
"""Loss defaults of every method unless its record says otherwise (clip_eps_high None = clip_eps_low)."""

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("opd", student_samples, policy_gradient(_opd), prepare=teacher_logprobs, needs_teacher=True, ratio=True),
    Method("gopd", student_samples, policy_gradient(_gopd), prepare=teacher_and_base_logprobs, needs_teacher=True,
           needs_base=True, ratio=True),
    Method("gkd", student_samples, gkd_loss, needs_teacher=True,
           local_teacher=lambda cfg: None if cfg.loss.gkd_top_k else "its full distribution (with loss.gkd_top_k=K a "
           "served teacher sends its top K instead)"),
    Method("grpo", rewarded_groups, policy_gradient(_sequence), prepare=sequence_advantages, group=True, ratio=True,
           defaults={"aggregation": "seq-mean-token-mean"}),
    Method("dapo", rewarded_groups, policy_gradient(_sequence), prepare=sequence_advantages, group=True, ratio=True,
           defaults={"clip_eps_high": 0.28, "dynamic_sampling": True, "overlong_penalty": 1.0}),
    Method("sft", teacher_samples, nll_loss, needs_teacher=True, local_teacher=lambda cfg: "its own samples"),
    Method("sft-gt", worked_solutions, nll_loss, needs_solutions=True),
)}


def method_defaults(name: str) -> dict:
    """The loss defaults of method ``name`` (the shared ones, overridden by its record's)."""
    return {**_PG, **METHODS[name].defaults}
