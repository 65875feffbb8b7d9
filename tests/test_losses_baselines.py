"""Tests for the RL-baseline and distillation-baseline losses in effopd.losses:
GRPO group advantages, DAPO (asymmetric clip, dynamic sampling, soft overlong punishment),
GKD's generalized JSD and the SFT loss (checked against Hugging Face's own causal-LM loss).

References are computed independently in float64 (torch.distributions, closed forms, HF).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical, kl_divergence

from effopd.losses import (
    aggregation_denominator,
    generalized_jsd,
    group_advantages,
    informative_groups,
    overlong_penalty,
    ppo_clip_loss,
    sft_loss,
)
from effopd.rollout import from_completions
from effopd.scoring import token_logprobs

D = torch.float64
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def t(rows):
    return torch.tensor(rows, dtype=D)


# Rewards on a dyadic grid (k/4): 0/1 outcome rewards, partial credit of 1/2 and the like all
# live here. group_advantages computes in float64 and returns float32, so it is compared with
# the float64 references below to float32 precision; all-equal groups come out exactly 0 for
# any reward (non-dyadic ones: test_equal_non_dyadic_rewards_give_zero_advantage).
dyadic = st.integers(-16, 16).map(lambda k: k / 4)


@st.composite
def grouped_rewards(draw, values=dyadic, max_groups=5, max_n=8):
    n = draw(st.integers(1, max_n))
    g = draw(st.integers(1, max_groups))
    # Bias towards all-equal groups, which are the interesting edge case.
    rows = []
    for _ in range(g):
        if draw(st.booleans()):
            rows += [draw(values)] * n
        else:
            rows += draw(st.lists(values, min_size=n, max_size=n))
    return torch.tensor(rows, dtype=D), n


# ============================================================== GRPO group advantages


@FAST
@given(grouped_rewards())
def test_group_advantages_sum_to_zero_in_every_group(rn):
    rewards, n = rn
    for std_norm in (True, False):
        adv_GN = group_advantages(rewards, n, std_norm=std_norm).view(-1, n)
        assert adv_GN.shape[0] * n == rewards.numel()
        assert torch.allclose(adv_GN.sum(-1).double(), torch.zeros(adv_GN.shape[0], dtype=D), atol=1e-5)


@FAST
@given(grouped_rewards())
def test_group_advantages_are_exactly_zero_for_equal_groups_and_unit_std_otherwise(rn):
    rewards, n = rn
    r_GN = rewards.view(-1, n)
    adv_GN = group_advantages(rewards, n).view(-1, n).double()
    for r, a in zip(r_GN, adv_GN):
        if (r == r[0]).all():
            assert torch.equal(a, torch.zeros_like(a)), (r, a)
        else:
            # Unbiased (ddof=1) std of the normalized advantages is s/(s+eps) ~= 1.
            assert a.std(unbiased=True).item() == pytest.approx(1.0, rel=1e-4)
            assert torch.allclose(a, (r - r.mean()) / r.std(unbiased=True), atol=1e-4)


@FAST
@given(grouped_rewards())
def test_group_advantages_without_std_norm_is_mean_centering(rn):
    rewards, n = rn
    r_GN = rewards.view(-1, n)
    expected = (r_GN - r_GN.mean(-1, keepdim=True)).reshape(-1)
    assert torch.allclose(group_advantages(rewards, n, std_norm=False).double(), expected, atol=1e-6)


def test_group_advantages_hand_values_use_unbiased_std():
    # Group [0, 1]: mean 0.5, unbiased std sqrt(0.5) = 0.7071 -> -/+ 0.7071
    # (the biased std 0.5 would give -/+ 1). Group [2, 2, 2, 2] split in two groups of 2 -> 0.
    adv = group_advantages(t([0.0, 1.0, 2.0, 2.0]), 2)
    s = math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([-0.5 / (s + 1e-6), 0.5 / (s + 1e-6), 0.0, 0.0], abs=1e-6)
    # Group [1, 2, 3, 6]: mean 3, deviations -2 -1 0 3, unbiased var 14/3.
    adv = group_advantages(t([1.0, 2.0, 3.0, 6.0]), 4)
    sd = math.sqrt(14 / 3)
    assert adv.tolist() == pytest.approx([-2 / sd, -1 / sd, 0.0, 3 / sd], abs=1e-5)
    # Rows are grouped consecutively, not strided: [0, 0, 1, 1] in groups of 2 is all-zero.
    assert torch.equal(group_advantages(t([0.0, 0.0, 1.0, 1.0]), 2), torch.zeros(4))
    assert not torch.equal(group_advantages(t([0.0, 1.0, 0.0, 1.0]), 2), torch.zeros(4))


def test_group_advantages_are_detached_and_one_per_row():
    r = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=D, requires_grad=True)
    adv = group_advantages(r, 3)
    assert adv.shape == (6,) and not adv.requires_grad


@pytest.mark.parametrize("group_size", [0, -2, 4, 7, 2.0])
def test_group_advantages_bad_group_size_raises(group_size):
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), group_size)


def test_group_advantages_rejects_2d_rewards():
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 3), 3)


@pytest.mark.parametrize("value, n", [(0.9, 3), (0.1, 7), (0.3, 6)])
def test_equal_non_dyadic_rewards_give_zero_advantage(value, n):
    adv = group_advantages(torch.full((n,), value, dtype=D), n)
    assert torch.equal(adv, torch.zeros_like(adv))


def test_informative_groups_agrees_with_group_advantages_for_float64_rewards():
    r = t([1.0, 1.0 + 1e-9])
    assert informative_groups(r, 2).item()
    assert group_advantages(r, 2).abs().sum().item() > 0


# ============================================================== DAPO: asymmetric clip


DAPO = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=None)


def ppo_grad(ratio, adv, **kw):
    logp = torch.tensor([[math.log(ratio)]], dtype=D, requires_grad=True)
    loss, metrics = ppo_clip_loss(logp, t([[0.0]]), t([[adv]]), t([[1.0]]), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


@pytest.mark.parametrize(
    "ratio, adv, clipped",
    [
        (1.25, 1.0, False),   # inside the clip-higher range (would be clipped at eps = 0.2)
        (1.279, 1.0, False),  # just below 1 + eps_high
        (1.281, 1.0, True),   # just above it
        (1.5, 2.0, True),
        (0.5, 1.0, False),    # A > 0 is never clipped from below
        (0.801, -1.0, False), # just above 1 - eps_low
        (0.799, -1.0, True),  # just below it
        (0.6, -3.0, True),
        (1.25, -1.0, False),  # A < 0 is not clipped above ...
        (10.0, -1.0, False),  # ... at all with dual clip disabled
    ],
)
def test_dapo_clip_higher_bounds_are_asymmetric(ratio, adv, clipped):
    loss, grad, m = ppo_grad(ratio, adv, **DAPO)
    if clipped:
        bound = 1.28 if adv > 0 else 0.8
        assert grad == 0.0
        assert loss == pytest.approx(-adv * bound, abs=1e-12)
    else:
        assert grad == pytest.approx(-adv * ratio, rel=1e-12)
        assert grad != 0.0
        assert loss == pytest.approx(-adv * ratio, rel=1e-12)
    assert m["clip_frac"] == float(clipped)


def test_dapo_ratio_1_25_is_clipped_only_under_the_symmetric_setting():
    _, grad_sym, m_sym = ppo_grad(1.25, 1.0, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=None)
    _, grad_dapo, m_dapo = ppo_grad(1.25, 1.0, **DAPO)
    assert grad_sym == 0.0 and m_sym["clip_frac"] == 1.0
    assert grad_dapo == pytest.approx(-1.25) and m_dapo["clip_frac"] == 0.0
    # eps_high does not move the lower bound: r = 0.79 with A < 0 is clipped either way.
    assert ppo_grad(0.79, -1.0, **DAPO)[1] == 0.0
    assert ppo_grad(0.79, -1.0, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=None)[1] == 0.0


@FAST
@given(
    log_ratio=st.floats(-1.0, 1.0),
    adv=st.one_of(st.floats(0.05, 5.0), st.floats(-5.0, -0.05)),
)
def test_dapo_gradient_vanishes_exactly_outside_the_trust_region(log_ratio, adv):
    hi, lo = math.log(1.28), math.log(0.8)
    assume(abs(log_ratio - hi) > 1e-9 and abs(log_ratio - lo) > 1e-9)
    r = math.exp(log_ratio)
    _, grad, m = ppo_grad(r, adv, **DAPO)
    clipped = (adv > 0 and log_ratio > hi) or (adv < 0 and log_ratio < lo)
    assert (grad == 0.0) == clipped
    assert m["clip_frac"] == float(clipped)
    if not clipped:
        assert grad == pytest.approx(-adv * r, rel=1e-9)


def test_dapo_clip_frac_counts_only_unmasked_clipped_tokens():
    ratios = [1.3, 1.25, 0.75, 0.85, 0.5, 2.0]
    advs = [1.0, 1.0, -1.0, -1.0, 1.0, 1.0]
    mask = [1, 1, 1, 1, 1, 0]  # the last token would be clipped but is masked
    logp = t([[math.log(r) for r in ratios]])
    old, adv, m = torch.zeros_like(logp), t([advs]), t([mask])
    _, metrics = ppo_clip_loss(logp, old, adv, m, **DAPO)
    assert metrics["clip_frac"] == pytest.approx(2 / 5)  # 1.3 (A>0) and 0.75 (A<0)
    _, metrics = ppo_clip_loss(logp, old, adv, m, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=None)
    assert metrics["clip_frac"] == pytest.approx(3 / 5)  # 1.25 now clipped too


# ============================================================== DAPO: dynamic sampling


@FAST
@given(grouped_rewards(values=st.one_of(dyadic, st.floats(-10, 10, width=32, allow_subnormal=False))))
def test_informative_groups_keeps_exactly_the_groups_with_reward_variance(rn):
    rewards, n = rn
    keep = informative_groups(rewards, n)
    r_GN = rewards.view(-1, n)
    assert keep.dtype == torch.bool and keep.shape == (r_GN.shape[0],)
    var_G = r_GN.var(-1, unbiased=False)
    assert torch.equal(keep, var_G > 0)
    for r in r_GN[keep]:  # what dynamic sampling passes on always has reward variance
        assert r.var(unbiased=False) > 0
    for r in r_GN[~keep]:
        assert r.var(unbiased=False) == 0


@FAST
@given(grouped_rewards())
def test_dropped_groups_are_exactly_those_with_zero_advantage(rn):
    rewards, n = rn
    keep = informative_groups(rewards, n)
    adv_GN = group_advantages(rewards, n).view(-1, n)
    assert torch.equal(keep, (adv_GN != 0).any(-1))


def test_informative_groups_hand_example_and_bad_split():
    r = t([1, 1, 1, 0, 1, 0, 0, 0, 0, 0.5, 0.5, 0.5])
    assert informative_groups(r, 3).tolist() == [False, True, False, False]
    assert informative_groups(r, 1).tolist() == [False] * 12  # a single sample has no variance
    with pytest.raises(ValueError):
        informative_groups(r, 5)


# ============================================================== DAPO: overlong penalty


def dapo_reference(length, max_len, buffer, factor):
    """Yu et al. 2025, eq. 13 (scaled by factor), written out directly."""
    if length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return factor * ((max_len - buffer) - length) / buffer
    return -factor


def test_overlong_penalty_piecewise_hand_values():
    # max_len 20, buffer 4: free up to 16, then -0.25 per token (x factor 2), -2 from 20 on.
    got = overlong_penalty(torch.arange(0, 25), 20, 4, factor=2.0)
    expected = [0.0] * 17 + [-0.5, -1.0, -1.5, -2.0, -2.0, -2.0, -2.0, -2.0]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got[20].item() == -2.0 and got[24].item() == -2.0  # exactly -factor
    assert got[16].item() == 0.0


@FAST
@given(
    max_len=st.integers(2, 4096),
    buffer_frac=st.floats(0.0, 1.0, exclude_max=True),
    factor=st.floats(0.0, 5.0),
    lengths=st.lists(st.integers(0, 5000), min_size=1, max_size=20),
)
def test_overlong_penalty_matches_dapo_formula(max_len, buffer_frac, factor, lengths):
    buffer = min(int(buffer_frac * max_len), max_len - 1)
    got = overlong_penalty(torch.tensor(lengths), max_len, buffer, factor=factor)
    for L, g in zip(lengths, got.tolist()):
        if buffer == 0:
            assert g == pytest.approx(-factor if L >= max_len else 0.0, abs=1e-6)
        else:
            assert g == pytest.approx(dapo_reference(L, max_len, buffer, factor), abs=1e-5 * (1 + factor))
        assert -factor - 1e-6 <= g <= 0.0
    # monotone non-increasing in length
    lin = overlong_penalty(torch.arange(0, max_len + 3), max_len, buffer, factor=factor)
    assert (lin[1:] <= lin[:-1] + 1e-6).all()
    assert lin[max_len].item() == pytest.approx(-factor, abs=1e-6)


def test_overlong_penalty_with_zero_buffer_is_the_hard_truncation_penalty():
    got = overlong_penalty(torch.tensor([0, 9, 10, 11, 50]), 10, 0, factor=1.5)
    assert got.tolist() == [0.0, 0.0, -1.5, -1.5, -1.5]


@pytest.mark.parametrize("buffer", [-1, 10, 11])
def test_overlong_penalty_invalid_buffer_raises(buffer):
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([5]), 10, buffer)


# ============================================================== GKD generalized JSD


def ref_gjsd_BT(s_BTV, t_BTV, beta):
    """Per-token generalized JSD in float64 from torch.distributions (independent of losses.py)."""
    P, Q = Categorical(logits=t_BTV.double()), Categorical(logits=s_BTV.double())
    if beta == 0.0:
        return kl_divergence(P, Q)
    if beta == 1.0:
        return kl_divergence(Q, P)
    M = Categorical(probs=beta * P.probs + (1 - beta) * Q.probs)
    return beta * kl_divergence(P, M) + (1 - beta) * kl_divergence(Q, M)


def token_mean(x_BT, mask_BT):
    return (x_BT * mask_BT).sum() / mask_BT.sum()


def binary_entropy(beta):
    return -sum(p * math.log(p) for p in (beta, 1 - beta) if p > 0)


def random_logits(seed, B=2, T=3, V=7, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=D) * scale
    te = torch.randn(B, T, V, generator=g, dtype=D) * scale
    mask = t([[1, 1, 0], [1, 0, 0]])[:B, :T]
    return s, te, mask


def test_gkd_beta_zero_is_forward_kl_and_beta_one_is_reverse_kl():
    s, te, mask = random_logits(0)
    fwd = token_mean(kl_divergence(Categorical(logits=te), Categorical(logits=s)), mask)
    rev = token_mean(kl_divergence(Categorical(logits=s), Categorical(logits=te)), mask)
    assert abs(fwd.item() - rev.item()) > 1e-2  # the two directions really differ here
    # Independent second reference for the forward KL: F.kl_div(input=log q, target=log p).
    fwd2 = torch.nn.functional.kl_div(
        torch.log_softmax(s, -1), torch.log_softmax(te, -1), log_target=True, reduction="none"
    ).sum(-1)
    assert token_mean(fwd2, mask).item() == pytest.approx(fwd.item(), rel=1e-10)
    loss0, m0 = generalized_jsd(s, te, mask, beta=0.0)
    loss1, _ = generalized_jsd(s, te, mask, beta=1.0)
    assert loss0.item() == pytest.approx(fwd.item(), rel=1e-5)
    assert loss1.item() == pytest.approx(rev.item(), rel=1e-5)
    assert m0["jsd"] == pytest.approx(loss0.item())
    assert m0["teacher_mass"] == 1.0


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_gkd_intermediate_beta_matches_reference(beta):
    s, te, mask = random_logits(1)
    loss, _ = generalized_jsd(s, te, mask, beta=beta)
    assert loss.item() == pytest.approx(token_mean(ref_gjsd_BT(s, te, beta), mask).item(), rel=1e-5)


@pytest.mark.parametrize("top_k", [None, 1, 3, 7])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_gkd_identical_distributions_give_zero(beta, top_k):
    s, _, mask = random_logits(2)
    student = s.clone().requires_grad_()
    loss, _ = generalized_jsd(student, s, mask, beta=beta, top_k=top_k)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert student.grad.abs().max().item() < 1e-6


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    beta=st.floats(0.01, 0.99),
    scale=st.sampled_from([0.1, 1.0, 5.0, 20.0]),
)
def test_gkd_is_nonnegative_and_bounded_by_binary_entropy(seed, beta, scale):
    # One token, so the loss is that token's divergence.
    s, te, _ = random_logits(seed, B=1, T=1, V=5, scale=scale)
    v = generalized_jsd(s, te, torch.ones(1, 1, dtype=D), beta=beta)[0].item()
    assert -1e-6 <= v <= binary_entropy(beta) + 1e-5
    assert v == pytest.approx(ref_gjsd_BT(s, te, beta).item(), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.8])
def test_gkd_bound_is_attained_for_disjoint_supports(beta):
    te = t([[[30.0, 0.0, 0.0, 0.0]]])
    s = t([[[0.0, 30.0, 0.0, 0.0]]])
    v = generalized_jsd(s, te, t([[1.0]]), beta=beta)[0].item()
    assert v <= binary_entropy(beta) + 1e-6
    assert v >= 0.999 * binary_entropy(beta)
    if beta == 0.5:
        assert v == pytest.approx(math.log(2), rel=1e-3)


def test_gkd_small_beta_limits_are_forward_and_reverse_kl():
    s, te, mask = random_logits(3, scale=1.0)
    fwd = token_mean(kl_divergence(Categorical(logits=te), Categorical(logits=s)), mask).item()
    rev = token_mean(kl_divergence(Categorical(logits=s), Categorical(logits=te)), mask).item()
    errs_f, errs_r = [], []
    for beta in (1e-1, 1e-2, 1e-3, 1e-4):
        errs_f.append(abs(generalized_jsd(s, te, mask, beta=beta)[0].item() / beta - fwd) / fwd)
        errs_r.append(abs(generalized_jsd(s, te, mask, beta=1 - beta)[0].item() / beta - rev) / rev)
    # The gap is O(beta) (about 12% at 0.1 here); at 1e-4 float32 rounding dominates.
    assert errs_f[-1] < 1e-2 and errs_r[-1] < 1e-2
    assert errs_f[0] > errs_f[1] > errs_f[2] and errs_r[0] > errs_r[1] > errs_r[2]


@pytest.mark.parametrize("top_k", [None, 1, 3])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_masked_positions_do_not_contribute(beta, top_k):
    s, te, mask = random_logits(4)
    g = torch.Generator().manual_seed(99)
    garbage_s, garbage_t = s.clone(), te.clone()
    off = mask == 0
    garbage_s[off] = torch.randn(int(off.sum()), s.shape[-1], generator=g, dtype=D) * 1e4
    garbage_t[off] = torch.randn(int(off.sum()), s.shape[-1], generator=g, dtype=D) * 1e4
    a = s.clone().requires_grad_()
    b = garbage_s.clone().requires_grad_()
    la, ma = generalized_jsd(a, te, mask, beta=beta, top_k=top_k)
    lb, mb = generalized_jsd(b, garbage_t, mask, beta=beta, top_k=top_k)
    la.backward()
    lb.backward()
    assert lb.item() == pytest.approx(la.item(), rel=1e-6)
    assert torch.equal(b.grad[off], torch.zeros_like(b.grad[off]))
    assert torch.allclose(a.grad, b.grad, atol=1e-7)
    assert a.grad[~off].abs().sum() > 0  # unmasked positions do get gradient
    assert mb == pytest.approx(ma)


@pytest.mark.parametrize("top_k", [None, 1, 3])
@pytest.mark.parametrize("which", ["student_inf", "teacher_nan"])
def test_gkd_nonfinite_logits_under_the_mask_give_finite_zero_gradient(which, top_k):
    s, te, mask = random_logits(5)
    off = mask == 0
    if which == "student_inf":
        s[off] = float("inf")
    else:
        te[off] = float("nan")
    s.requires_grad_()
    loss, _ = generalized_jsd(s, te, mask, beta=0.5, top_k=top_k)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(s.grad).all()
    assert torch.equal(s.grad[off], torch.zeros_like(s.grad[off]))


def test_gkd_forward_kl_gradient_is_q_minus_p_over_token_count():
    s, te, mask = random_logits(6)
    student = s.clone().requires_grad_()
    generalized_jsd(student, te, mask, beta=0.0)[0].backward()
    expected = (torch.softmax(s, -1) - torch.softmax(te, -1)) * mask[..., None] / mask.sum()
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_gkd_gradient_flows_only_into_student_logits():
    s, te, mask = random_logits(7)
    student = s.clone().requires_grad_()
    teacher = te.clone().requires_grad_()
    loss, _ = generalized_jsd(student, teacher, mask, beta=0.5)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert generalized_jsd(s, te.detach(), mask, beta=0.5)[0].item() == loss.item()


def test_gkd_top_k_full_vocabulary_equals_no_top_k():
    s, te, mask = random_logits(8)
    V = s.shape[-1]
    for beta in (0.0, 0.5, 1.0):
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        full, mf = generalized_jsd(a, te, mask, beta=beta)
        topv, mk = generalized_jsd(b, te, mask, beta=beta, top_k=V)  # the rest has mass 0
        full.backward()
        topv.backward()
        assert topv.item() == pytest.approx(full.item(), rel=1e-5)
        assert torch.isfinite(b.grad).all()
        assert torch.allclose(b.grad, a.grad, atol=1e-6)
        assert mk["teacher_mass"] == pytest.approx(1.0, abs=1e-6)


def bucketed_log_probs(logits_BTV, idx_BTK):
    """float64 log-probabilities of the k + 1 outcomes (tokens idx_BTK, then all the others)."""
    p = torch.softmax(logits_BTV.double(), -1)
    rest = p.scatter(-1, idx_BTK, 0.0).sum(-1, keepdim=True)
    return torch.cat([p.gather(-1, idx_BTK), rest], -1).log()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 3])
def test_gkd_top_k_compares_top_tokens_and_the_rest_with_full_softmax_masses(k, beta):
    s, te, mask = random_logits(9)
    idx = te.topk(k, dim=-1).indices
    mass = token_mean(torch.softmax(te, -1).gather(-1, idx).sum(-1), mask).item()
    ref = token_mean(ref_gjsd_BT(bucketed_log_probs(s, idx), bucketed_log_probs(te, idx), beta), mask).item()
    loss, m = generalized_jsd(s, te, mask, beta=beta, top_k=k)
    assert m["teacher_mass"] < 1.0
    assert m["teacher_mass"] == pytest.approx(mass, rel=1e-5)
    assert loss.item() > 1e-3
    assert loss.item() == pytest.approx(ref, rel=1e-5)


# Teacher P = (1/2, 1/4, 1/8, 1/8) and a uniform student Q, top_k = 1: the outcomes are token 0
# and the rest, P = (1/2, 1/2) and Q = (1/4, 3/4). By hand:
#   beta = 0: KL(P || Q) = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
#   beta = 1: KL(Q || P) = 1/4 ln(1/2) + 3/4 ln(3/2)
# and d KL(P || Q) / d s_j = q_j - p_0 for j = 0 and q_j - p_rest q_j / q_rest otherwise:
#   (1/4 - 1/2, 1/4 - (1/2)(1/4)/(3/4), ...) = (-1/4, 1/12, 1/12, 1/12).
HALVES_TEACHER = [[[math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]]]


def test_gkd_top_1_is_not_zero_hand_values():
    te, one = t(HALVES_TEACHER), t([[1.0]])
    student = torch.zeros(1, 1, 4, dtype=D, requires_grad=True)
    loss, m = generalized_jsd(student, te, one, beta=0.0, top_k=1)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert student.grad[0, 0].tolist() == pytest.approx([-1 / 4, 1 / 12, 1 / 12, 1 / 12], abs=1e-6)
    assert m["teacher_mass"] == pytest.approx(0.5, rel=1e-6)
    rev, _ = generalized_jsd(torch.zeros(1, 1, 4, dtype=D), te, one, beta=1.0, top_k=1)
    assert rev.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
    mid = torch.zeros(1, 1, 4, dtype=D, requires_grad=True)
    jsd, _ = generalized_jsd(mid, te, one, beta=0.5, top_k=1)
    jsd.backward()
    assert jsd.item() > 1e-3 and mid.grad.abs().sum().item() > 1e-3


# Teacher P = (0.4, 0.3, 0.1, 0.1, 0.1), top_k = 2: outcomes token 0, token 1, rest; P = (0.4, 0.3, 0.3).
#   QA = (0.2, 0.2, 0.1, 0.2, 0.3) -> (0.2, 0.2, 0.6)
#   QB = (0.2, 0.2, 0.3, 0.1, 0.2) -> (0.2, 0.2, 0.6): QA with mass moved among the rest
#   QD = (0.1, 0.1, 0.2, 0.3, 0.3) -> (0.1, 0.1, 0.8): mass moved out of the top 2, whose
#        renormalized shares (1/2, 1/2) equal QA's
# Forward KL by hand: KL(P || QA) = 0.4 ln 2 + 0.3 ln 1.5 + 0.3 ln 0.5 = 0.1 ln 2 + 0.3 ln 1.5;
# KL(P || QD) = 0.4 ln 4 + 0.3 ln 3 + 0.3 ln(3/8) = 0.6 ln 3 - 0.1 ln 2.
TEACHER_5 = [0.4, 0.3, 0.1, 0.1, 0.1]
QA, QB, QD = [0.2, 0.2, 0.1, 0.2, 0.3], [0.2, 0.2, 0.3, 0.1, 0.2], [0.1, 0.1, 0.2, 0.3, 0.3]


def gkd_of_probs(q, beta, top_k=2):
    """The one-token loss of a student with probabilities q against TEACHER_5."""
    student, teacher = torch.log(t([[q]])), torch.log(t([[TEACHER_5]]))
    return generalized_jsd(student, teacher, t([[1.0]]), beta=beta, top_k=top_k)[0].item()


def test_gkd_top_k_hand_values_with_mass_outside_the_top_k():
    assert gkd_of_probs(QA, 0.0) == pytest.approx(0.1 * math.log(2) + 0.3 * math.log(1.5), rel=1e-6)
    assert gkd_of_probs(QD, 0.0) == pytest.approx(0.6 * math.log(3) - 0.1 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gkd_top_k_sees_mass_leaving_the_top_k_but_not_where_it_goes(beta):
    assert gkd_of_probs(QB, beta) == pytest.approx(gkd_of_probs(QA, beta), rel=1e-6)
    assert abs(gkd_of_probs(QD, beta) - gkd_of_probs(QA, beta)) > 1e-2


def test_gkd_top_k_small_beta_limits_are_forward_and_reverse_kl():
    s, te, mask = random_logits(13, scale=1.0)
    for k in (1, 3):
        fwd = generalized_jsd(s, te, mask, beta=0.0, top_k=k)[0].item()
        rev = generalized_jsd(s, te, mask, beta=1.0, top_k=k)[0].item()
        assert abs(fwd - rev) > 1e-3  # the two directions really differ here
        # JSD_beta / beta -> KL(P || Q) and JSD_{1-beta} / beta -> KL(Q || P), with an O(beta) gap
        beta = 1e-3
        assert generalized_jsd(s, te, mask, beta=beta, top_k=k)[0].item() / beta == pytest.approx(fwd, rel=1e-2)
        assert generalized_jsd(s, te, mask, beta=1 - beta, top_k=k)[0].item() / beta == pytest.approx(rev, rel=1e-2)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_top_k_rest_of_zero_student_mass_gives_finite_loss_and_gradient(beta):
    # The student puts no mass outside the teacher's top 2 (logits -inf there) while the
    # teacher does: the rest has mass 0 on one side only.
    s, te, mask = random_logits(14)
    idx = te.topk(2, dim=-1).indices
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, idx, False)
    s = s.masked_fill(outside, -float("inf")).requires_grad_()
    loss, _ = generalized_jsd(s, te, mask, beta=beta, top_k=2)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_gkd_micro_batches_with_the_denominator_sum_to_one_pass(agg, top_k):
    g = torch.Generator().manual_seed(15)
    s, te = (torch.randn(4, 3, 6, generator=g, dtype=D) * 2 for _ in range(2))
    mask = t([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]])  # a fully masked row in the first half
    whole, parts = s.clone().requires_grad_(), s.clone().requires_grad_()
    single, _ = generalized_jsd(whole, te, mask, beta=0.5, top_k=top_k, agg=agg)
    single.backward()
    denominator = aggregation_denominator(mask, agg)
    total = 0.0
    for sl in (slice(0, 2), slice(2, 4)):
        loss, _ = generalized_jsd(
            parts[sl], te[sl], mask[sl], beta=0.5, top_k=top_k, agg=agg, denominator=denominator
        )
        total = total + loss
    total.backward()
    assert total.item() == pytest.approx(single.item(), rel=1e-6)
    assert torch.allclose(parts.grad, whole.grad, atol=1e-7)


@pytest.mark.parametrize("beta", [-0.1, 1.1, float("nan")])
def test_gkd_bad_beta_raises(beta):
    s, te, mask = random_logits(10)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, te, mask, beta=beta)


@pytest.mark.parametrize("top_k", [0, 8, 2.0, True])
def test_gkd_bad_top_k_raises(top_k):
    s, te, mask = random_logits(11)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 7\] \(the vocabulary size\) or None"):
        generalized_jsd(s, te, mask, top_k=top_k)


def test_gkd_shape_mismatch_raises():
    s, te, mask = random_logits(12)
    with pytest.raises(ValueError):
        generalized_jsd(s, te[..., :-1], mask)
    with pytest.raises(ValueError):
        generalized_jsd(s, te, mask[:, :-1])


# ============================================================== SFT loss


PROMPTS = ["12+34=", "5+7=", "84+74-9="]
COMPLETIONS = ["12+34=46;\\boxed{46}", "5+7=12;\\boxed{12}", "84+74=158;158-9=149;\\boxed{149}"]


@pytest.fixture(scope="module")
def student(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], torch_dtype=torch.float32)
    return model.eval()


def hf_loss(model, tok, prompt, completion, label_prompt=False):
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = (p if label_prompt else [-100] * len(p)) + c
    with torch.no_grad():
        out = model(input_ids=torch.tensor([p + c]), labels=torch.tensor([labels]))
    return out.loss.item(), len(c)


def test_from_completions_response_mask_covers_completion_and_eos(task_tokenizer):
    tok = task_tokenizer
    ro = from_completions(tok, PROMPTS, COMPLETIONS)
    lens = [len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for c in COMPLETIONS]
    assert len(set(lens)) == len(lens)  # different lengths: right padding happens
    assert ro.response_mask_BT.sum(-1).tolist() == lens
    assert ro.prompt_mask_BP.sum(-1).tolist() == [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert (ro.prompt_mask_BP == 0).any()  # left padding happens too
    for b, n in enumerate(lens):
        row = ro.response_ids_BT[b]
        assert row[n - 1].item() == tok.eos_token_id
        assert tok.decode(row[: n - 1]) == COMPLETIONS[b]
        assert (row[n:] == tok.pad_token_id).all()
        assert ro.response_mask_BT[b, :n].all() and not ro.response_mask_BT[b, n:].any()
    with pytest.raises(ValueError):
        from_completions(tok, PROMPTS, COMPLETIONS[:-1])


def test_sft_loss_matches_hugging_face_loss_with_prompt_labels_ignored(task_tokenizer, student):
    tok = task_tokenizer
    ro = from_completions(tok, PROMPTS, COMPLETIONS)
    with torch.no_grad():
        logp = token_logprobs(student, ro)
    mask = ro.response_mask_BT
    hf, counts = zip(*(hf_loss(student, tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS)))
    for b in range(len(PROMPTS)):
        loss_b, metrics = sft_loss(logp[b : b + 1], mask[b : b + 1])
        assert loss_b.item() == pytest.approx(hf[b], abs=1e-5)
        assert metrics["nll"] == pytest.approx(hf[b], abs=1e-5)
        # Had the prompt tokens been targets, HF's loss would be a different number.
        assert abs(hf_loss(student, tok, PROMPTS[b], COMPLETIONS[b], label_prompt=True)[0] - hf[b]) > 1e-3
    # Batch aggregations: token-mean weights tokens, seq-mean-token-mean weights sequences.
    n = torch.tensor(counts, dtype=D)
    hf_t = torch.tensor(hf, dtype=D)
    tok_mean = sft_loss(logp, mask)[0].item()
    seq_mean = sft_loss(logp, mask, agg="seq-mean-token-mean")[0].item()
    assert tok_mean == pytest.approx(((hf_t * n).sum() / n.sum()).item(), abs=1e-5)
    assert seq_mean == pytest.approx(hf_t.mean().item(), abs=1e-5)
    assert abs(tok_mean - seq_mean) > 1e-6  # unequal lengths make them differ


def test_sft_loss_ignores_non_target_positions_but_not_the_completion(task_tokenizer, student):
    tok = task_tokenizer
    ro = from_completions(tok, PROMPTS, COMPLETIONS)
    logp = token_logprobs(student, ro)  # with grad
    mask = ro.response_mask_BT
    base, _ = sft_loss(logp, mask)
    # Garbage (even inf / nan) at positions outside the mask changes neither loss nor gradient.
    leaf = logp.detach().clone().requires_grad_()
    junk = leaf.detach().clone()
    off = (mask == 0).nonzero()
    assert len(off) >= 2
    junk[mask == 0] = float("nan")
    junk[tuple(off[0])] = -float("inf")
    junk_leaf = junk.clone().requires_grad_()
    l1, _ = sft_loss(leaf, mask)
    l2, _ = sft_loss(junk_leaf, mask)
    l1.backward()
    l2.backward()
    assert l1.item() == pytest.approx(base.item(), abs=1e-12)
    assert l2.item() == l1.item()
    assert torch.equal(junk_leaf.grad, leaf.grad)
    assert (leaf.grad[mask == 0] == 0).all() and (leaf.grad[mask == 1] != 0).all()
    # The loss trains the model: its gradient reaches the parameters.
    student.zero_grad()
    base.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    student.zero_grad()
    # Changing the completion changes that row's loss; the other rows are unaffected.
    changed = [COMPLETIONS[0].replace("46", "47"), *COMPLETIONS[1:]]
    ro2 = from_completions(tok, PROMPTS, changed)
    with torch.no_grad():
        logp2 = token_logprobs(student, ro2)
        per_seq = lambda lp, ro_: [
            sft_loss(lp[b : b + 1], ro_.response_mask_BT[b : b + 1])[0].item() for b in range(len(PROMPTS))
        ]
        before, after = per_seq(logp.detach(), ro), per_seq(logp2, ro2)
    assert abs(after[0] - before[0]) > 1e-4
    assert after[1:] == pytest.approx(before[1:], abs=1e-6)
    assert after[0] == pytest.approx(hf_loss(student, tok, PROMPTS[0], changed[0])[0], abs=1e-5)
