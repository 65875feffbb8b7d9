"""Per-token advantages and the clipped policy loss for on-policy distillation.

Pure functions of (B, T) tensors and masks; no model, no config object. Notation per sampled
token t (see DESIGN.md, "Losses"):

    lp_theta  current student logprob (the only tensor that receives gradient)
    lp_old    student logprob at sampling time
    lp_T      teacher logprob
    lp_B      base logprob (the frozen student init; never the EffOPD anchor)
    lp_roll   the rollout engine's own logprob, when the engine differs from the trainer

Temperature convention: a sampling temperature τ tempers both sides alike. The logprobs passed
here (lp_theta, lp_old, lp_T, lp_B) and the logits given to ``generalized_jsd`` all come from
logits / τ, so "the teacher at temperature τ" means the same in OPD, G-OPD and GKD: the
reverse KL of OPD is KL(softmax(s/τ) || softmax(t/τ)) at the sampled token, and GKD's β = 1
limit is the full-vocabulary form of the same divergence.

Every loss returns ``(loss, metrics)`` where ``metrics`` maps short keys to python floats.
Masked tokens (``mask_BT == 0``) contribute nothing to a loss, its gradient, or its metrics,
whatever values they hold (inf and nan included).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# |log r| is clamped to this before exp() in the PPO loss (the bound verl uses): exp(88) already
# overflows float32, and an infinite ratio gives a nan gradient even where the loss is clipped.
LOG_RATIO_BOUND = 20.0


def _check_same_shape(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    """Raise ValueError unless every tensor in ``others`` has the shape of ``ref``."""
    for name, x in others.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}; "
                f"pass per-token tensors of one shape (B, T), aligned token by token."
            )


def _check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (B, T) but has shape {tuple(x.shape)}; "
            f"add a batch dimension (x[None]) or flatten extra dimensions into B."
        )


def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
    # torch.where rather than x * mask: 0 * inf = nan, and where() also sends zero gradient.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is nonzero: sum(x*m) / sum(m).

    Over all entries when ``dim`` is None, else along ``dim``. An empty selection gives 0.
    """
    _check_same_shape("x", x, mask=mask)
    m = mask.to(x.dtype)
    x = _zero_masked(x, mask)
    if dim is None:
        total, count = x.sum(), m.sum()
    else:
        total, count = x.sum(dim), m.sum(dim)
    # A safe denominator (not where() on the quotient) keeps the gradient free of nan.
    return total / torch.where(count > 0, count, torch.ones_like(count))


def aggregation_count(mask_BT: Tensor, mode: str) -> int:
    """What ``aggregate(loss_BT, mask_BT, mode)`` counts in a batch:

    - ``token-mean``: the number of unmasked tokens;
    - ``seq-mean-token-mean``: the number of rows with at least one unmasked token;
    - ``seq-mean-token-sum-norm``: the number of rows B.

    Counts of several processes' shares of one batch add up to the count of the whole batch.
    """
    _check_2d("mask_BT", mask_BT)
    if mode == "token-mean":
        return int((mask_BT != 0).sum().item())
    if mode == "seq-mean-token-mean":
        return int((mask_BT.sum(-1) > 0).sum().item())
    if mode == "seq-mean-token-sum-norm":
        return mask_BT.shape[0]
    raise ValueError(f"unknown aggregation mode {mode!r}; use one of {AGGREGATIONS}.")


def aggregation_denominator(mask_BT: Tensor, mode: str) -> float:
    """The normaliser that ``aggregate(loss_BT, mask_BT, mode)`` divides by, for a whole batch:
    its ``aggregation_count``, at least 1, so that a fully masked batch gives exactly 0 as it
    does without a denominator.

    A trainer that splits a batch into micro-batches calls this once on the whole batch's mask
    and passes the result as ``denominator`` to every micro-batch's loss; the sum of the
    micro-batch losses (and of their gradients) then equals one pass over the whole batch.
    """
    return float(max(aggregation_count(mask_BT, mode), 1))


def _denominator_tensor(denominator: float | Tensor, like: Tensor) -> Tensor:
    """``denominator`` as a detached 0-dim tensor of ``like``'s dtype and device.

    A python number must be finite and > 0. A tensor must hold one element; its value is not
    checked (that would wait for the device).
    """
    if isinstance(denominator, Tensor):
        if denominator.numel() != 1:
            raise ValueError(
                f"denominator must hold one number but is a tensor of shape "
                f"{tuple(denominator.shape)}; pass aggregation_denominator(mask of the whole "
                f"batch, mode), a float."
            )
        return denominator.detach().reshape(()).to(dtype=like.dtype, device=like.device)
    if isinstance(denominator, bool) or not isinstance(denominator, numbers.Real):
        raise ValueError(
            f"denominator must be a number or a one-element tensor but is of type "
            f"{type(denominator).__name__}; pass aggregation_denominator(mask of the whole "
            f"batch, mode)."
        )
    if not (math.isfinite(denominator) and denominator > 0):
        raise ValueError(
            f"denominator must be a finite number > 0 but is {denominator!r}; pass "
            f"aggregation_denominator(mask of the whole batch, mode), which is at least 1."
        )
    # A tensor on the loss's device rather than a python scalar: CUDA divides by a scalar as a
    # multiplication by its reciprocal, which would round differently from the None path.
    return torch.tensor(float(denominator), dtype=like.dtype, device=like.device)


def aggregate(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: str = "token-mean",
    norm_len: float | None = None,
    *,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    - ``token-mean``: sum_{b,t} l*m / sum_{b,t} m (every token weighs the same).
    - ``seq-mean-token-mean``: mean over non-empty sequences b of (sum_t l*m / sum_t m).
    - ``seq-mean-token-sum-norm``: mean over all B sequences of sum_t l*m / norm_len, with
      ``norm_len`` a constant (default T, the padded length) so that length does not bias the
      per-token weight (Dr. GRPO, Liu et al. 2025, Sec. 3.1).

    A fully masked batch gives exactly 0.

    ``denominator`` replaces the normaliser of this batch by that of a larger batch that this
    one is a micro-batch of (see ``aggregation_denominator``), so that summing the micro-batch
    losses gives the loss of the whole batch:

    - ``token-mean``: sum_{b,t} l*m / denominator (the whole batch's unmasked tokens);
    - ``seq-mean-token-mean``: sum over non-empty rows of the row's masked mean, / denominator
      (the whole batch's non-empty rows); a fully masked row contributes nothing;
    - ``seq-mean-token-sum-norm``: sum over rows of sum_t l*m / norm_len, / denominator (the
      whole batch's row count B).

    With ``denominator`` equal to this batch's own normaliser, ``token-mean`` and
    ``seq-mean-token-mean`` give bit for bit what ``denominator=None`` gives. The denominator
    receives no gradient.
    """
    _check_2d("loss_BT", loss_BT)
    _check_same_shape("loss_BT", loss_BT, mask_BT=mask_BT)
    denom = None if denominator is None else _denominator_tensor(denominator, loss_BT)
    if mode == "token-mean":
        if denom is None:
            return masked_mean(loss_BT, mask_BT)
        return _zero_masked(loss_BT, mask_BT).sum() / denom
    if mode == "seq-mean-token-mean":
        seq_B = masked_mean(loss_BT, mask_BT, dim=-1)
        nonempty_B = mask_BT.sum(-1) > 0
        if denom is None:
            return masked_mean(seq_B, nonempty_B)
        return _zero_masked(seq_B, nonempty_B).sum() / denom
    if mode == "seq-mean-token-sum-norm":
        norm = loss_BT.shape[-1] if norm_len is None else norm_len
        if not norm > 0:
            raise ValueError(
                f"norm_len must be > 0 but is {norm_len!r}; pass the maximum response length "
                f"(or leave it None to use the padded length T)."
            )
        row_B = _zero_masked(loss_BT, mask_BT).sum(-1) / norm
        return row_B.mean() if denom is None else row_B.sum() / denom
    raise ValueError(f"unknown aggregation mode {mode!r}; use one of {AGGREGATIONS}.")


def opd_advantages(teacher_logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """OPD advantage A_t = lp_T - lp_old, the per-token negative reverse KL (detached).

    Zero on masked tokens.
    """
    _check_same_shape("teacher_logp_BT", teacher_logp_BT, old_logp_BT=old_logp_BT, mask_BT=mask_BT)
    return _zero_masked((teacher_logp_BT - old_logp_BT).detach(), mask_BT)


def gopd_advantages(
    teacher_logp_BT: Tensor, old_logp_BT: Tensor, base_logp_BT: Tensor, mask_BT: Tensor, lam: float
) -> Tensor:
    """G-OPD (reward extrapolation) advantage A_t = lam*(lp_T - lp_B) - (lp_old - lp_B).

    lam = 1 is OPD; lam = 1.25 is the published ExOPD setting. Computed in the equal form
    (lp_T - lp_old) + (lam - 1)*(lp_T - lp_B) so that lam = 1 reproduces OPD bit for bit.
    Detached; zero on masked tokens.
    """
    if not (isinstance(lam, (int, float)) and lam >= 0):
        raise ValueError(
            f"lam must be a number >= 0 but is {lam!r}; use lam = 1 for plain OPD or "
            f"lam > 1 to extrapolate the reward (ExOPD uses 1.25)."
        )
    _check_same_shape(
        "teacher_logp_BT", teacher_logp_BT,
        old_logp_BT=old_logp_BT, base_logp_BT=base_logp_BT, mask_BT=mask_BT,
    )
    lp_T, lp_old, lp_B = (x.detach() for x in (teacher_logp_BT, old_logp_BT, base_logp_BT))
    adv_BT = (lp_T - lp_old) + (lam - 1.0) * (lp_T - lp_B)
    return _zero_masked(adv_BT, mask_BT)


def token_is_weight(old_logp_BT: Tensor, rollout_logp_BT: Tensor, cap: float = 5.0) -> Tensor:
    """Truncated token importance weight w_t = min(exp(lp_old - lp_roll), cap), detached.

    Corrects for the rollout engine's logprobs differing from the trainer's (truncated IS).
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0 but is {cap!r}; the usual truncation is 5.0.")
    _check_same_shape("old_logp_BT", old_logp_BT, rollout_logp_BT=rollout_logp_BT)
    return torch.exp(old_logp_BT.detach() - rollout_logp_BT.detach()).clamp(max=cap)


def ppo_clip_loss(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = 3.0,
    is_weight_BT: Tensor | None = None,
    agg: str = "token-mean",
    norm_len: float | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Dual-clip PPO policy loss (Schulman et al. 2017, eq. 7; Ye et al. 2020, eq. 5).

        r_t  = exp(clamp(lp_theta - lp_old, -20, 20))
        pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))
        pg_t = min(pg_t, -A_t c)          for A_t < 0 (dual clip, c > 1; None disables)
        loss = aggregate(w_t * pg_t)      w_t = token IS weight, 1 when not given

    The log-ratio is clamped to [-20, 20] (``LOG_RATIO_BOUND``, as verl does) before exp():
    beyond it exp() would overflow float32 near 88 and give a nan gradient. A token past the
    bound has its ratio held at e^{+-20} and passes no gradient; such a token is clipped by PPO
    anyway unless dual clipping is off and A_t < 0 (or A_t > 0 with r_t below e^-20).

    ``agg``, ``norm_len`` and ``denominator`` are passed to ``aggregate`` (``denominator``: the
    normaliser of the whole batch when this is one micro-batch of it).

    Gradient flows only through ``logp_BT``. Metrics (means over unmasked tokens):
    ``clip_frac`` (PPO clip active), ``dual_clip_frac``, ``ratio_mean``, ``adv_mean``,
    ``is_weight_mean``.
    """
    for name, eps in (("clip_eps_low", clip_eps_low), ("clip_eps_high", clip_eps_high)):
        if not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(
                f"{name} must be a finite number >= 0 but is {eps!r}; the usual value is 0.2."
            )
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(
            f"dual_clip_c must be > 1 (or None to disable dual clipping) but is {dual_clip_c!r}; "
            f"the usual value is 3.0."
        )
    _check_2d("logp_BT", logp_BT)
    _check_same_shape(
        "logp_BT", logp_BT,
        old_logp_BT=old_logp_BT, adv_BT=adv_BT, mask_BT=mask_BT, is_weight_BT=is_weight_BT,
    )

    valid_BT = mask_BT.bool()
    # Mask the log-ratio before exp(): a huge value under the mask would otherwise give
    # exp() = inf and a nan gradient even though where() discards it later. The clamp does the
    # same for unmasked tokens.
    log_ratio_BT = _zero_masked(logp_BT - old_logp_BT.detach(), mask_BT)
    log_ratio_BT = log_ratio_BT.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio_BT = torch.exp(log_ratio_BT)
    adv_BT = _zero_masked(adv_BT.detach(), mask_BT)

    pg_unclipped_BT = -adv_BT * ratio_BT
    pg_clipped_BT = -adv_BT * ratio_BT.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg_BT = torch.maximum(pg_unclipped_BT, pg_clipped_BT)
    clipped_BT = (pg_clipped_BT > pg_unclipped_BT) & valid_BT

    dual_clipped_BT = torch.zeros_like(valid_BT)
    if dual_clip_c is not None:
        dual_bound_BT = -adv_BT * dual_clip_c
        dual_clipped_BT = (adv_BT < 0) & (pg_BT > dual_bound_BT) & valid_BT
        pg_BT = torch.where(dual_clipped_BT, dual_bound_BT, pg_BT)

    if is_weight_BT is not None:
        is_weight_BT = _zero_masked(is_weight_BT.detach(), mask_BT)
        pg_BT = pg_BT * is_weight_BT

    loss = aggregate(pg_BT, mask_BT, mode=agg, norm_len=norm_len, denominator=denominator)

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean(clipped_BT.float(), mask_BT).item(),
            "dual_clip_frac": masked_mean(dual_clipped_BT.float(), mask_BT).item(),
            "ratio_mean": masked_mean(ratio_BT, mask_BT).item(),
            "adv_mean": masked_mean(adv_BT, mask_BT).item(),
            "is_weight_mean": (
                1.0 if is_weight_BT is None else masked_mean(is_weight_BT, mask_BT).item()
            ),
        }
    return loss, metrics


# --- RL baselines (GRPO, DAPO) -------------------------------------------------------------


def group_advantages(rewards_B: Tensor, group_size: int, *, std_norm: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantage per sequence: (r - mean of its group) / (std of its group + eps).

    Rows are grouped consecutively: rows [g*n, (g+1)*n) are the n responses to one prompt. The
    std is the unbiased one (as in GRPO, Shao et al. 2024); ``std_norm=False`` keeps only the
    mean-centering (Dr. GRPO, Liu et al. 2025). Advantages in a group sum to zero; a group whose
    rewards are all equal gets 0 everywhere. Returns (B,); broadcast over tokens with
    ``[:, None]``.
    """
    if rewards_B.dim() != 1:
        raise ValueError(f"rewards_B must be 1-D (B,) but has shape {tuple(rewards_B.shape)}; pass one reward per response.")
    if not (isinstance(group_size, int) and group_size > 0) or rewards_B.numel() % group_size:
        raise ValueError(
            f"group_size={group_size!r} must be a positive integer dividing the {rewards_B.numel()} rewards; "
            f"sample rollout.n responses for every prompt and keep them together."
        )
    # float64, and exact zeros for all-equal groups: in float32 a reward like 0.9 leaves a mean
    # one rounding step off, and dividing that residue by (std + eps) would make it O(1e-2).
    r_GN = rewards_B.detach().to(torch.float64).view(-1, group_size)
    centered_GN = r_GN - r_GN.mean(-1, keepdim=True)
    if std_norm and group_size > 1:
        centered_GN = centered_GN / (r_GN.std(-1, keepdim=True) + eps)
    centered_GN = torch.where(informative_groups(rewards_B, group_size)[:, None], centered_GN, 0.0)
    return centered_GN.reshape(-1).to(torch.float32)


def overlong_penalty(lengths_B: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the outcome reward.

    0 for |y| <= max_len - buffer, falling linearly to -factor at |y| = max_len (and -factor
    beyond). ``buffer`` = 0 gives the hard penalty: -factor only for |y| >= max_len, i.e. for
    responses cut off by the length limit.
    """
    if not (0 <= buffer < max_len):
        raise ValueError(f"buffer={buffer!r} must be in [0, max_len={max_len}); DAPO uses a buffer of about max_len/4.")
    lengths_B = lengths_B.to(torch.float32)
    if buffer == 0:
        return torch.where(lengths_B >= max_len, -float(factor), 0.0)
    over = (lengths_B - (max_len - buffer)).clamp(min=0.0) / buffer
    return -factor * over.clamp(max=1.0)


def informative_groups(rewards_B: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling filter: a bool per group, True when its rewards are not all equal
    (an all-correct or all-wrong group has zero advantage everywhere and no gradient)."""
    if not (isinstance(group_size, int) and group_size > 0) or rewards_B.numel() % group_size:
        raise ValueError(f"{rewards_B.numel()} rewards cannot be split into groups of {group_size!r}; "
                         f"pass the rollout.n responses of every prompt together.")
    r_GN = rewards_B.detach().view(-1, group_size)
    return (r_GN != r_GN[:, :1]).any(-1)


# --- Distillation by matching distributions (GKD) and by imitation (SFT) --------------------


def _logsumexp_no_nan(x_BTV: Tensor) -> Tensor:
    """log sum_v exp(x) over the last axis, with rows of only -inf giving log(tiny) (about -87
    in float32) instead of -inf, and gradient 0 rather than nan into such rows."""
    m_BT1 = x_BTV.detach().amax(-1, keepdim=True)
    m_BT1 = torch.where(torch.isfinite(m_BT1), m_BT1, 0.0)
    # The sum is >= 1 whenever a row holds a finite entry (its maximum contributes exp(0)), so
    # the clamp acts only on all -inf rows, where it keeps log() and its gradient finite.
    total_BT = torch.exp(x_BTV - m_BT1).sum(-1)
    return m_BT1.squeeze(-1) + torch.log(total_BT.clamp(min=torch.finfo(x_BTV.dtype).tiny))


def _top_k_with_rest(logits_BCV: Tensor, idx_BCK: Tensor, valid_BC: Tensor) -> Tensor:
    """Log-probabilities under softmax(``logits_BCV``) of k + 1 outcomes: each token of
    ``idx_BCK`` and, last, all other tokens together; float32, rows where ``valid_BC`` is False
    read as all-zero logits (so whatever they hold, inf and nan included, stays out).

    Exact masses of the full softmax, from the raw logits and their logsumexp (no normalised
    distribution is built); the rest's log-mass is a log-sum-exp over the other tokens'
    log-probabilities, accurate however small it is (1 - top-k mass would cancel). A rest
    without tokens (k = V) or of zero mass gets log-probability log(tiny), about -87 in
    float32, and passes no gradient. Meant for one chunk of positions at a time: its
    temporaries are the size of ``logits_BCV``.
    """
    x_BCV = torch.where(valid_BC[..., None], logits_BCV.float(), 0.0)
    lse_BC1 = torch.logsumexp(x_BCV, -1, keepdim=True)
    top_BCK = x_BCV.gather(-1, idx_BCK) - lse_BC1
    # (x - lse) is a fresh tensor, so filling it in place leaves autograd intact.
    rest_BCV = (x_BCV - lse_BC1).scatter_(-1, idx_BCK, -math.inf)
    return torch.cat([top_BCK, _logsumexp_no_nan(rest_BCV)[..., None]], -1)


#: Elements (B x positions x V) of one chunk in top-k GKD: about 256 MiB per float32 temporary.
GKD_CHUNK_ELEMENTS = 1 << 26


def _positions_per_chunk(shape_BTV, chunk_positions: int | None) -> int:
    B, _, V = shape_BTV
    if chunk_positions is None:
        return max(1, GKD_CHUNK_ELEMENTS // max(1, B * V))
    if isinstance(chunk_positions, bool) or not isinstance(chunk_positions, numbers.Integral) or chunk_positions < 1:
        raise ValueError(f"chunk_positions must be a positive integer (positions per chunk) or None for about "
                         f"{GKD_CHUNK_ELEMENTS} logits per chunk, got {chunk_positions!r}.")
    return int(chunk_positions)


@torch.no_grad()
def teacher_top_k(teacher_logits_BTV: Tensor, valid_BT: Tensor, k: int, chunk_positions: int | None = None
                  ) -> tuple[Tensor, Tensor]:
    """The teacher's side of top-k GKD: its k most likely tokens at each position (``topk`` of
    its raw logits, ``(B, T, k)``) and the log-probabilities of those k tokens and of the rest
    (``(B, T, k + 1)``), ``chunk_positions`` positions at a time (None: about
    ``GKD_CHUNK_ELEMENTS`` logits per chunk). What a teacher server sends instead of its logits."""
    B, T, V = teacher_logits_BTV.shape
    if T == 0:
        return (torch.zeros((B, 0, k), dtype=torch.long, device=teacher_logits_BTV.device),
                teacher_logits_BTV.new_zeros((B, 0, k + 1), dtype=torch.float32))
    step = _positions_per_chunk(teacher_logits_BTV.shape, chunk_positions)
    idx_parts, lp_parts = [], []
    for t_BCV, valid_BC in zip(teacher_logits_BTV.detach().split(step, dim=1), valid_BT.split(step, dim=1)):
        t_BCV = torch.where(valid_BC[..., None], t_BCV.float(), 0.0)
        idx_BCK = t_BCV.topk(k, dim=-1).indices
        idx_parts.append(idx_BCK)
        lp_parts.append(_top_k_with_rest(t_BCV, idx_BCK, valid_BC))
        del t_BCV
    return torch.cat(idx_parts, 1), torch.cat(lp_parts, 1)


def _student_top_k(student_logits_BTV: Tensor, idx_BTK: Tensor, valid_BT: Tensor, chunk_positions: int | None) -> Tensor:
    """The student's log-probabilities of the teacher's k + 1 outcomes, ``(B, T, k + 1)``, chunk
    by chunk; with grad, each chunk is checkpointed and its backward recomputes the chunk's
    temporaries. split() rather than slices: its backward assembles the student's (B, T, V)
    gradient once, where every slice's backward would allocate a zero (B, T, V) tensor of its own."""
    B, T, V = student_logits_BTV.shape
    if T == 0:
        return student_logits_BTV.new_zeros((B, 0, idx_BTK.shape[-1] + 1), dtype=torch.float32)
    step = _positions_per_chunk(student_logits_BTV.shape, chunk_positions)
    checkpointed = torch.is_grad_enabled() and student_logits_BTV.requires_grad
    parts = []
    for s_BCV, idx_BCK, valid_BC in zip(student_logits_BTV.split(step, dim=1), idx_BTK.split(step, dim=1),
                                        valid_BT.split(step, dim=1)):
        if checkpointed:
            parts.append(checkpoint(_top_k_with_rest, s_BCV, idx_BCK, valid_BC, use_reentrant=False))
        else:
            parts.append(_top_k_with_rest(s_BCV, idx_BCK, valid_BC))
    return torch.cat(parts, 1)


def generalized_jsd(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor | None, mask_BT: Tensor, *, beta: float = 0.5,
    top_k: int | None = None, agg: str = "token-mean", norm_len: float | None = None,
    denominator: float | Tensor | None = None, chunk_positions: int | None = None,
    teacher_side: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 2) per token,
    between the teacher P and the student Q_theta at every response position:

        JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M),   M = beta*P + (1 - beta)*Q

    with the limits ``beta = 0`` -> forward KL(P || Q) and ``beta = 1`` -> reverse KL(Q || P)
    (JSD_beta / beta and JSD_beta / (1 - beta) tend to them). Computed in float32.

    ``top_k`` (sparse logits, for large vocabularies) compares P and Q over k + 1 outcomes
    instead of V: each of the teacher's k most likely tokens, and "any other token". Every
    outcome keeps its exact probability under the full softmax (nothing is renormalized), so
    student mass that leaves the teacher's top k raises the loss even though how it spreads
    over the other tokens does not matter. ``top_k = V`` gives the full-vocabulary loss (the
    rest then has mass 0); None uses the full vocabulary directly.

    Memory: the full-vocabulary mode builds float32 log-softmax copies of both (B, T, V)
    logits. The top-k mode builds none: the teacher's top-k ids and log-masses come from
    ``topk`` on its raw logits and a logsumexp, ``chunk_positions`` positions at a time (None:
    about ``GKD_CHUNK_ELEMENTS`` logits per chunk), each student chunk checkpointed under grad;
    only (B, T, k + 1) tensors outlive a chunk.

    ``teacher_side``: the teacher's side of top-k mode already computed (:func:`teacher_top_k`:
    ids ``(B, T, k)`` and log-probabilities ``(B, T, k + 1)``, e.g. from a teacher server), in
    place of ``teacher_logits_BTV`` (then None) and ``top_k``.

    ``agg``, ``norm_len`` and ``denominator`` are passed to ``aggregate``. Gradient flows into
    the student logits only. Metrics: ``jsd`` (the per-token mean over this batch's unmasked
    tokens, whatever ``agg``), ``teacher_mass`` (mean teacher probability of its top k tokens,
    1.0 without ``top_k``).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] but is {beta!r}; 0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD.")
    if teacher_side is not None:
        if teacher_logits_BTV is not None:
            raise ValueError("pass the teacher's logits or its top-k side (teacher_side), not both")
        idx_BTK, lp = teacher_side
        if student_logits_BTV.dim() != 3 or idx_BTK.shape[:2] != student_logits_BTV.shape[:2] \
                or lp.shape != (*idx_BTK.shape[:2], idx_BTK.shape[2] + 1):
            raise ValueError(f"teacher_side must be ids (B, T, k) and log-probabilities (B, T, k + 1) for student logits "
                             f"(B, T, V); got {tuple(idx_BTK.shape)}, {tuple(lp.shape)} and {tuple(student_logits_BTV.shape)}")
        top_k = idx_BTK.shape[-1]
    elif teacher_logits_BTV is None or student_logits_BTV.shape != teacher_logits_BTV.shape or student_logits_BTV.dim() != 3:
        raise ValueError(
            f"student and teacher logits must both be (B, T, V) with one vocabulary, got "
            f"{tuple(student_logits_BTV.shape)} and {None if teacher_logits_BTV is None else tuple(teacher_logits_BTV.shape)}."
        )
    _check_same_shape("mask_BT", mask_BT, logits_BT=student_logits_BTV[..., 0])
    # Masked rows are zeroed first: a nan/inf there would otherwise give a nan gradient through where().
    valid_BT = mask_BT.bool()
    teacher_mass = 1.0
    if top_k is None:
        s_BTV = torch.where(valid_BT[..., None], student_logits_BTV.float(), 0.0)
        t_BTV = torch.where(valid_BT[..., None], teacher_logits_BTV.detach().float(), 0.0)
        lq, lp = torch.log_softmax(s_BTV, -1), torch.log_softmax(t_BTV, -1)
    else:
        V = student_logits_BTV.shape[-1]
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 < top_k <= V:
            raise ValueError(
                f"top_k must be an integer in [1, {V}] (the vocabulary size) or None for the "
                f"full vocabulary, got {top_k!r}."
            )
        valid_BT = valid_BT.to(student_logits_BTV.device)
        if teacher_side is None:
            idx_BTK, lp = teacher_top_k(teacher_logits_BTV, valid_BT, int(top_k), chunk_positions)
        idx_BTK, lp = idx_BTK.to(student_logits_BTV.device), lp.to(student_logits_BTV.device)
        lq = _student_top_k(student_logits_BTV, idx_BTK, valid_BT, chunk_positions)
        with torch.no_grad():
            teacher_mass = masked_mean(lp[..., :-1].exp().sum(-1), mask_BT).item()

    def kl(la, lb):  # KL(a || b) over the last axis, from log-probabilities
        return (la.exp() * (la - lb)).sum(-1)

    if beta == 0.0:
        jsd_BT = kl(lp, lq)
    elif beta == 1.0:
        jsd_BT = kl(lq, lp)
    else:
        lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1.0 - beta)]), dim=0)
        jsd_BT = beta * kl(lp, lm) + (1.0 - beta) * kl(lq, lm)
    jsd_BT = _zero_masked(jsd_BT, mask_BT)
    loss = aggregate(jsd_BT, mask_BT, mode=agg, norm_len=norm_len, denominator=denominator)
    with torch.no_grad():
        jsd = masked_mean(jsd_BT.detach(), mask_BT).item()
    return loss, {"jsd": jsd, "teacher_mass": teacher_mass}


def sft_loss(
    logp_BT: Tensor, mask_BT: Tensor, *, agg: str = "token-mean", norm_len: float | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of target tokens: aggregate(-logp) over ``mask_BT`` (the completion
    tokens; prompt and padding positions carry mask 0 and contribute nothing).
    ``agg``, ``norm_len`` and ``denominator`` are passed to ``aggregate``.
    Metric ``nll`` is the per-token negative log-likelihood of this batch."""
    _check_2d("logp_BT", logp_BT)
    _check_same_shape("logp_BT", logp_BT, mask_BT=mask_BT)
    loss = aggregate(-logp_BT, mask_BT, mode=agg, norm_len=norm_len, denominator=denominator)
    with torch.no_grad():
        nll = masked_mean(-logp_BT.detach(), mask_BT).item()
    return loss, {"nll": nll}
