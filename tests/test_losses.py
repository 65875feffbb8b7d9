"""Identity tests for effopd.losses on tiny hand-made tensors.

Expected values are worked out by hand in the comments. float64 throughout so that the
boundary tests (a ratio 1e-3 either side of 1 +- eps) are not decided by rounding.
"""

import math

import pytest
import torch

from effopd.losses import (
    AGGREGATIONS,
    aggregate,
    aggregation_denominator,
    gopd_advantages,
    masked_mean,
    opd_advantages,
    ppo_clip_loss,
    sft_loss,
    token_is_weight,
)

D = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=D)


def leaf(rows):
    return torch.tensor(rows, dtype=D, requires_grad=True)


def loss_and_grad(logp, old, adv, mask=None, **kw):
    """One-token (or small) PPO loss and its gradient w.r.t. logp."""
    logp = leaf(logp)
    old, adv = t(old), t(adv)
    mask = torch.ones_like(old) if mask is None else t(mask)
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, **kw)
    loss.backward()
    return loss.item(), logp.grad, metrics


# ---------------------------------------------------------------- masked_mean / aggregate


def test_masked_mean_ignores_masked_entries_and_empty_rows_give_zero():
    x = t([[1.0, 3.0, 100.0], [7.0, 8.0, 9.0]])
    m = t([[1, 1, 0], [0, 0, 0]])
    # whole tensor: (1 + 3) / 2 = 2
    assert masked_mean(x, m).item() == 2.0
    # per row: row 0 -> 2, row 1 has no tokens -> 0
    assert masked_mean(x, m, dim=-1).tolist() == [2.0, 0.0]


# loss_BT = [[1, 2, 3, pad], [4, pad, pad, pad], [pad x4]], T = 4
LOSS = [[1.0, 2.0, 3.0, 50.0], [4.0, 60.0, 70.0, 80.0], [9.0, 9.0, 9.0, 9.0]]
MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    "mode, norm_len, expected",
    [
        # (1 + 2 + 3 + 4) / 4 tokens = 2.5
        ("token-mean", None, 2.5),
        # row means 6/3 = 2 and 4/1 = 4; the empty row is excluded -> (2 + 4) / 2 = 3
        ("seq-mean-token-mean", None, 3.0),
        # row sums 6, 4, 0 over norm_len T = 4 -> 1.5, 1, 0; mean over all 3 rows = 2.5/3
        ("seq-mean-token-sum-norm", None, 2.5 / 3),
        # with norm_len = 2: 3, 2, 0 -> 5/3
        ("seq-mean-token-sum-norm", 2, 5.0 / 3),
    ],
)
def test_aggregations_on_hand_example(mode, norm_len, expected):
    got = aggregate(t(LOSS), t(MASK), mode=mode, norm_len=norm_len)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_token_mean_and_seq_mean_agree_when_all_rows_have_equal_length():
    loss = t([[1.0, 2.0, 0.5], [4.0, 6.0, -1.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    # token-mean 13/4; seq means 1.5 and 5 -> 3.25; sum-norm with norm_len=2: (1.5 + 5)/2
    a = aggregate(loss, mask, "token-mean")
    b = aggregate(loss, mask, "seq-mean-token-mean")
    c = aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=2)
    assert a.item() == b.item() == c.item() == 3.25


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_fully_masked_batch_gives_exact_zero_and_finite_gradient(mode):
    logp = leaf([[-1.0, -2.0], [-0.5, -3.0]])
    old = t([[-3.0, 0.0], [-0.5, -9.0]])
    adv = t([[2.0, -1.0], [5.0, float("nan")]])
    mask = torch.zeros(2, 2, dtype=D)
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, agg=mode)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    assert all(math.isfinite(v) for v in metrics.values())
    assert aggregate(t(LOSS), torch.zeros(3, 4, dtype=D), mode).item() == 0.0


# ---------------------------------------------------------------- micro-batches: denominator

# Five rows of 3, 0, 2, 1 and 4 tokens (10 in all, 4 non-empty rows), split into micro-batches
# of 2, 1 and 2 rows; the first holds the fully masked row next to a non-empty one.
SPLIT_MASK = [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
SPLITS = [slice(0, 2), slice(2, 3), slice(3, 5)]
# d loss / d l_bt for an unmasked token of row b, by hand:
#   token-mean:              1 / 10 tokens
#   seq-mean-token-mean:     1 / (4 rows * row length): rows 0, 2, 3, 4 -> 1/12, 1/8, 1/4, 1/16
#   seq-mean-token-sum-norm: 1 / (5 rows * norm_len 4) = 1/20
SPLIT_GRAD = {
    "token-mean": [[1 / 10] * 3 + [0], [0] * 4, [1 / 10] * 2 + [0] * 2, [1 / 10] + [0] * 3, [1 / 10] * 4],
    "seq-mean-token-mean": [[1 / 12] * 3 + [0], [0] * 4, [1 / 8] * 2 + [0] * 2, [1 / 4] + [0] * 3, [1 / 16] * 4],
    "seq-mean-token-sum-norm": [[1 / 20] * 3 + [0], [0] * 4, [1 / 20] * 2 + [0] * 2, [1 / 20] + [0] * 3, [1 / 20] * 4],
}


def split_values(seed=0, dtype=D):
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(
    "mask, expected",
    [
        # LOSS/MASK above: 4 tokens; 2 non-empty rows; 3 rows
        (MASK, {"token-mean": 4.0, "seq-mean-token-mean": 2.0, "seq-mean-token-sum-norm": 3.0}),
        (SPLIT_MASK, {"token-mean": 10.0, "seq-mean-token-mean": 4.0, "seq-mean-token-sum-norm": 5.0}),
        # nothing to count: 1, so that the loss of a fully masked batch stays exactly 0
        ([[0, 0], [0, 0]], {"token-mean": 1.0, "seq-mean-token-mean": 1.0, "seq-mean-token-sum-norm": 2.0}),
    ],
)
def test_aggregation_denominator_hand_values(mask, expected):
    for mode in AGGREGATIONS:
        got = aggregation_denominator(t(mask), mode)
        assert type(got) is float and got == expected[mode]


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_with_the_whole_batch_denominator_sum_to_one_pass(mode):
    values, mask = split_values(), t(SPLIT_MASK)
    whole = values.clone().requires_grad_()
    single = aggregate(whole, mask, mode)
    single.backward()
    parts = values.clone().requires_grad_()
    denominator = aggregation_denominator(mask, mode)
    total = sum(aggregate(parts[sl], mask[sl], mode, denominator=denominator) for sl in SPLITS)
    total.backward()
    assert total.item() == pytest.approx(single.item(), abs=1e-12)
    assert torch.allclose(parts.grad, whole.grad, atol=1e-12)
    assert torch.allclose(parts.grad, t(SPLIT_GRAD[mode]), atol=1e-12)


def test_seq_mean_weighting_micro_batches_by_row_share_is_wrong_with_an_empty_row():
    # The case the denominator exists for. Weighting each micro-batch's own seq-mean by its
    # share of the rows gives row 0 (alone among the non-empty rows of micro-batch 0) the weight
    # 2/5 instead of 1/4, and rows 3 and 4 the weight (2/5)(1/2) = 1/5 instead of 1/4.
    values, mask = split_values(), t(SPLIT_MASK)
    mode = "seq-mean-token-mean"
    single = aggregate(values, mask, mode).item()
    by_share = sum(aggregate(values[sl], mask[sl], mode) * (sl.stop - sl.start) / 5 for sl in SPLITS)
    exact = sum(aggregate(values[sl], mask[sl], mode, denominator=4.0) for sl in SPLITS)
    assert abs(by_share.item() - single) > 1e-3
    assert exact.item() == pytest.approx(single, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("sl", [*SPLITS, slice(1, 2), slice(0, 5)])  # slice(1, 2): the empty row alone
def test_own_denominator_gives_the_default_bit_for_bit(dtype, mode, sl):
    values, mask = split_values(seed=1, dtype=dtype)[sl], t(SPLIT_MASK).to(dtype)[sl]
    a, b, c = (values.clone().requires_grad_() for _ in range(3))
    own = aggregation_denominator(mask, mode)
    ref = aggregate(a, mask, mode)
    got = aggregate(b, mask, mode, denominator=own)
    got_tensor = aggregate(c, mask, mode, denominator=torch.tensor(own))
    for x in (ref, got, got_tensor):
        x.backward()
    assert torch.equal(got, ref) and torch.equal(got_tensor, ref)
    assert torch.equal(b.grad, a.grad) and torch.equal(c.grad, a.grad)


@pytest.mark.parametrize("norm_len", [None, 6])
def test_own_denominator_matches_the_default_for_seq_mean_token_sum_norm(norm_len):
    # mean() and sum() / B may round differently, so close rather than equal here.
    values, mask = split_values(seed=2), t(SPLIT_MASK)
    mode = "seq-mean-token-sum-norm"
    ref = aggregate(values, mask, mode, norm_len=norm_len)
    got = aggregate(values, mask, mode, norm_len=norm_len, denominator=aggregation_denominator(mask, mode))
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_ppo_and_sft_micro_batches_with_the_denominator_sum_to_one_pass(mode):
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(5, 4, generator=g, dtype=D) * 3
    old = logp + 0.3 * torch.randn(5, 4, generator=g, dtype=D)  # ratios both sides of the clip range
    adv = torch.randn(5, 4, generator=g, dtype=D)
    mask = t(SPLIT_MASK)
    denominator = aggregation_denominator(mask, mode)

    def ppo(x, sl, **kw):
        return ppo_clip_loss(x[sl], old[sl], adv[sl], mask[sl], agg=mode, norm_len=4, **kw)[0]

    def sft(x, sl, **kw):
        return sft_loss(x[sl], mask[sl], agg=mode, norm_len=4, **kw)[0]

    for loss_fn in (ppo, sft):
        whole, parts = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        single = loss_fn(whole, slice(None))
        single.backward()
        total = sum(loss_fn(parts, sl, denominator=denominator) for sl in SPLITS)
        total.backward()
        assert total.item() == pytest.approx(single.item(), abs=1e-12)
        assert torch.allclose(parts.grad, whole.grad, atol=1e-12)
        assert whole.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "denominator, pattern",
    [
        (0.0, r"denominator must be a finite number > 0 but is 0.0; pass aggregation_denominator"),
        (-4, r"denominator must be a finite number > 0 but is -4"),
        (float("nan"), r"denominator must be a finite number > 0 but is nan"),
        (float("inf"), r"denominator must be a finite number > 0 but is inf"),
        ("4", r"denominator must be a number or a one-element tensor but is of type str"),
        (True, r"denominator must be a number or a one-element tensor but is of type bool"),
        (torch.ones(2), r"denominator must hold one number but is a tensor of shape \(2,\)"),
    ],
)
def test_bad_denominator_raises_informative_errors(denominator, pattern):
    for mode in AGGREGATIONS:
        with pytest.raises(ValueError, match=pattern):
            aggregate(t(LOSS), t(MASK), mode, denominator=denominator)


def test_aggregation_denominator_bad_inputs_raise_informative_errors():
    with pytest.raises(ValueError, match=r"unknown aggregation mode 'mean'; use one of"):
        aggregation_denominator(t(MASK), "mean")
    with pytest.raises(ValueError, match=r"mask_BT must be 2-D \(B, T\) but has shape \(4,\)"):
        aggregation_denominator(t([1, 1, 0, 0]), "token-mean")


# ---------------------------------------------------------------- advantages


def test_opd_advantage_is_zero_when_teacher_equals_student():
    lp = t([[-0.1, -2.3, -5.0], [-1.0, -0.7, -0.2]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    assert torch.equal(opd_advantages(lp, lp.clone(), mask), torch.zeros_like(lp))


def test_opd_advantage_hand_values_detached_and_zero_under_mask():
    teacher = leaf([[-1.0, -0.5, -4.0]])
    old = t([[-2.0, -0.5, -1.0]])
    mask = t([[1, 1, 0]])
    adv = opd_advantages(teacher, old, mask)
    # -1 - (-2) = 1; -0.5 - (-0.5) = 0; masked -> 0 (would be -3)
    assert adv.tolist() == [[1.0, 0.0, 0.0]]
    assert not adv.requires_grad


def test_gopd_with_lambda_one_equals_opd_exactly():
    # A base far from teacher and student makes the literal formula lam*(T-B) - (old-B)
    # round differently from T - old on most entries; "exactly" must still hold.
    g = torch.Generator().manual_seed(0)
    teacher, old = (-torch.rand(4, 8, generator=g, dtype=D) * 4 for _ in range(2))
    base = -torch.rand(4, 8, generator=g, dtype=D) * 30
    mask = (torch.rand(4, 8, generator=g) > 0.3).to(D)
    assert not torch.equal((teacher - base) - (old - base), teacher - old)
    assert torch.equal(
        gopd_advantages(teacher, old, base, mask, lam=1.0), opd_advantages(teacher, old, mask)
    )


@pytest.mark.parametrize(
    "lam, expected",
    [
        # lp_T = -1, lp_B = -2, lp_old = -1.5
        (2.0, 1.5),  # 2*(-1 + 2) - (-1.5 + 2) = 2 - 0.5
        (1.25, 0.75),  # 1.25*1 - 0.5
        (0.0, -0.5),  # only "stay near base": -(lp_old - lp_B)
    ],
)
def test_gopd_hand_values(lam, expected):
    adv = gopd_advantages(t([[-1.0]]), t([[-1.5]]), t([[-2.0]]), t([[1]]), lam=lam)
    assert adv.item() == pytest.approx(expected, abs=1e-12)


def test_is_weight_is_capped_and_one_when_logprobs_match():
    old = leaf([[-1.0, -1.0, -1.0]])
    roll = t([[-1.0, -1.0 - math.log(2.0), -1.0 - math.log(10.0)]])
    w = token_is_weight(old, roll)
    # exp(0) = 1 exactly; exp(log 2) = 2; exp(log 10) = 10 -> capped at 5
    assert w[0, 0].item() == 1.0
    assert w[0, 1].item() == pytest.approx(2.0, abs=1e-12)
    assert w[0, 2].item() == 5.0
    assert not w.requires_grad
    assert token_is_weight(old, roll, cap=1.5)[0, 1].item() == 1.5


# ---------------------------------------------------------------- PPO clip: values and gradients


def test_ratio_above_one_plus_eps_is_clipped_with_zero_gradient():
    # r = e^0.5 = 1.6487 > 1.2, A = 1: pg = max(-1.6487, -1.2) = -1.2, constant in logp
    loss, grad, m = loss_and_grad([[0.5]], [[0.0]], [[1.0]])
    assert loss == pytest.approx(-1.2, abs=1e-12)
    assert grad.item() == 0.0
    assert m["clip_frac"] == 1.0
    assert m["ratio_mean"] == pytest.approx(math.exp(0.5), abs=1e-12)


def test_ratio_inside_range_gives_gradient():
    # r = e^0.1 = 1.10517 in [0.8, 1.2], A = 1: pg = -r, d pg / d logp = -r
    loss, grad, m = loss_and_grad([[0.1]], [[0.0]], [[1.0]])
    assert loss == pytest.approx(-math.exp(0.1), abs=1e-12)
    assert grad.item() == pytest.approx(-math.exp(0.1), abs=1e-12)
    assert m["clip_frac"] == 0.0


@pytest.mark.parametrize(
    "log_ratio, adv, clipped",
    [
        (math.log(1.2) - 1e-3, 1.0, False),  # just inside the upper edge
        (math.log(1.2) + 1e-3, 1.0, True),  # just outside it
        (math.log(0.8) + 1e-3, -1.0, False),  # just inside the lower edge (A < 0)
        (math.log(0.8) - 1e-3, -1.0, True),  # just outside it
        (math.log(0.5), 1.0, False),  # A > 0 is never clipped below
        (math.log(2.0), -1.0, False),  # A < 0 is never clipped above (r = 2 < c = 3)
    ],
)
def test_clipping_happens_exactly_at_one_plus_minus_eps(log_ratio, adv, clipped):
    r = math.exp(log_ratio)
    loss, grad, m = loss_and_grad([[log_ratio]], [[0.0]], [[adv]])
    if clipped:
        assert loss == pytest.approx(-adv * (1.2 if adv > 0 else 0.8), abs=1e-12)
        assert grad.item() == 0.0
    else:
        assert loss == pytest.approx(-adv * r, abs=1e-12)
        assert grad.item() == pytest.approx(-adv * r, abs=1e-12)
    assert m["clip_frac"] == float(clipped)


def test_asymmetric_eps_low_and_eps_high():
    kw = dict(clip_eps_low=0.1, clip_eps_high=0.3)
    # A = +1, r = 1.25: inside [0.9, 1.3] -> pg = -1.25 with gradient -1.25 ...
    loss, grad, _ = loss_and_grad([[math.log(1.25)]], [[0.0]], [[1.0]], **kw)
    assert loss == pytest.approx(-1.25, abs=1e-12)
    assert grad.item() == pytest.approx(-1.25, abs=1e-12)
    # ... whereas the symmetric 0.2 clips it to -1.2 with zero gradient
    loss, grad, _ = loss_and_grad([[math.log(1.25)]], [[0.0]], [[1.0]])
    assert loss == pytest.approx(-1.2, abs=1e-12)
    assert grad.item() == 0.0
    # A = -1, r = 0.85: below 1 - 0.1 -> pg = max(0.85, 0.9) = 0.9, zero gradient ...
    loss, grad, _ = loss_and_grad([[math.log(0.85)]], [[0.0]], [[-1.0]], **kw)
    assert loss == pytest.approx(0.9, abs=1e-12)
    assert grad.item() == 0.0
    # ... whereas eps_low = 0.2 leaves it inside: pg = 0.85, gradient 0.85
    loss, grad, _ = loss_and_grad([[math.log(0.85)]], [[0.0]], [[-1.0]])
    assert loss == pytest.approx(0.85, abs=1e-12)
    assert grad.item() == pytest.approx(0.85, abs=1e-12)


def test_dual_clip_bounds_negative_advantage_loss_at_c_times_abs_adv():
    # A = -2, r = e^2 = 7.389: PPO alone gives max(2*7.389, 2*1.2) = 14.78;
    # dual clip: min(14.78, 3 * 2) = 6, constant in logp
    loss, grad, m = loss_and_grad([[2.0]], [[0.0]], [[-2.0]])
    assert loss == pytest.approx(6.0, abs=1e-12)
    assert grad.item() == 0.0
    assert m["dual_clip_frac"] == 1.0
    # disabled: the unbounded 2*e^2 with gradient 2*e^2
    loss, grad, m = loss_and_grad([[2.0]], [[0.0]], [[-2.0]], dual_clip_c=None)
    assert loss == pytest.approx(2 * math.exp(2.0), abs=1e-12)
    assert grad.item() == pytest.approx(2 * math.exp(2.0), abs=1e-12)
    assert m["dual_clip_frac"] == 0.0
    # a positive advantage is untouched by the dual clip: -1 * 1.2
    loss, grad, m = loss_and_grad([[2.0]], [[0.0]], [[1.0]])
    assert loss == pytest.approx(-1.2, abs=1e-12)
    assert m["dual_clip_frac"] == 0.0


# Log-ratios beyond +-20 are clamped to +-20 before exp(). By hand, with eps = 0.2, c = 3 and
# one token (so the loss is that token's pg):
#   +L, A = +1:          max(-e^20, -1.2) = -1.2 (PPO clip)
#   +L, A = -1, c = 3:   max(e^20, 1.2) = e^20 > 3 -> 3 (dual clip)
#   +L, A = -1, no c:    e^20 (the clamped ratio)
#   -L, A = +1:          max(-e^-20, -0.8) = -e^-20
#   -L, A = -1:          max(e^-20, 0.8) = 0.8 (PPO clip; 0.8 < 3 leaves the dual clip off)
# and no gradient in every case: clipped, or the clamp holds the ratio.
@pytest.mark.parametrize("dtype, big", [(torch.float32, 100.0), (D, 1000.0)])  # exp(big) overflows dtype
@pytest.mark.parametrize(
    "sign, adv, dual_clip_c, expected",
    [
        (1, 1.0, 3.0, -1.2),
        (1, -1.0, 3.0, 3.0),
        (1, -1.0, None, math.exp(20.0)),
        (-1, 1.0, 3.0, -math.exp(-20.0)),
        (-1, -1.0, 3.0, 0.8),
        (-1, -1.0, None, 0.8),
    ],
)
def test_extreme_log_ratio_gives_finite_loss_and_gradient(dtype, big, sign, adv, dual_clip_c, expected):
    logp = torch.tensor([[sign * big]], dtype=dtype, requires_grad=True)
    zeros, ones = torch.zeros(1, 1, dtype=dtype), torch.ones(1, 1, dtype=dtype)
    loss, m = ppo_clip_loss(logp, zeros, torch.full((1, 1), adv, dtype=dtype), ones, dual_clip_c=dual_clip_c)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(logp.grad).all() and logp.grad.item() == 0.0
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize(
    "log_ratio, loss_and_grad_expected",
    [
        (0.0, (1.0, 1.0)),  # r = 1, A = -1: pg = r, d pg / d logp = r
        (19.5, (math.exp(19.5), math.exp(19.5))),  # inside the bound: the plain ratio and its gradient
        (20.5, (math.exp(20.0), 0.0)),  # beyond it: held at e^20, no gradient
    ],
)
def test_log_ratio_clamp_acts_only_beyond_twenty(log_ratio, loss_and_grad_expected):
    # A = -1 with dual clipping off, the one case where a huge ratio is not clipped away.
    loss, grad, _ = loss_and_grad([[log_ratio]], [[0.0]], [[-1.0]], dual_clip_c=None)
    assert loss == pytest.approx(loss_and_grad_expected[0], rel=1e-12)
    assert grad.item() == pytest.approx(loss_and_grad_expected[1], rel=1e-12)


def test_is_weight_multiplies_the_per_token_loss():
    # r = 1, A = 1, w = 2 -> pg = -2, gradient -2; second token w = 1: pg = -1
    logp = leaf([[0.0, 0.0]])
    w = token_is_weight(t([[0.0, 0.0]]), t([[-math.log(2.0), 0.0]]))
    loss, m = ppo_clip_loss(logp, t([[0.0, 0.0]]), t([[1.0, 1.0]]), t([[1, 1]]), is_weight_BT=w)
    loss.backward()
    # token-mean: (-2 - 1) / 2
    assert loss.item() == pytest.approx(-1.5, abs=1e-12)
    assert logp.grad[0].tolist() == pytest.approx([-1.0, -0.5], abs=1e-12)
    assert m["is_weight_mean"] == pytest.approx(1.5, abs=1e-12)


def test_gradient_flows_only_through_logp():
    logp = leaf([[0.1, -0.1]])
    old, adv, w = leaf([[0.0, 0.0]]), leaf([[1.0, -1.0]]), leaf([[1.0, 2.0]])
    loss, _ = ppo_clip_loss(logp, old, adv, t([[1, 1]]), is_weight_BT=w)
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert old.grad is None and adv.grad is None and w.grad is None


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_masked_tokens_change_neither_loss_nor_gradient(mode):
    mask = t([[1, 1, 0, 0], [1, 0, 0, 0]])
    logp = [[-0.2, -1.0, -0.3, -0.4], [-0.6, -0.1, -0.2, -0.3]]
    old = [[-0.3, -0.9, -0.3, -0.4], [-0.5, -0.1, -0.2, -0.3]]
    adv = [[1.0, -0.5, 2.0, 2.0], [0.3, 1.0, 1.0, 1.0]]
    w = [[1.0, 2.0, 1.0, 1.0], [0.5, 1.0, 1.0, 1.0]]

    def run(logp, old, adv, w):
        logp = leaf(logp)
        loss, m = ppo_clip_loss(logp, t(old), t(adv), mask, is_weight_BT=t(w), agg=mode)
        loss.backward()
        return loss, logp.grad, m

    loss_a, grad_a, m_a = run(logp, old, adv, w)
    # rewrite every masked position with garbage: a log-ratio of 1000 (exp overflows), inf, nan
    for rows, junk in ((logp, 500.0), (old, -500.0), (adv, float("nan")), (w, float("inf"))):
        for b in range(2):
            for k in range(4):
                if mask[b, k] == 0:
                    rows[b][k] = junk
    loss_b, grad_b, m_b = run(logp, old, adv, w)
    assert torch.isfinite(loss_b) and loss_a.item() == loss_b.item()
    assert torch.equal(grad_a, grad_b)
    assert torch.equal(grad_b * (1 - mask), torch.zeros_like(grad_b))
    assert m_a == m_b
    assert loss_a.item() != 0.0  # the unmasked tokens do contribute


def test_sgd_step_moves_student_toward_teacher_preferred_token():
    # One context, vocab of 3, uniform student (p = 1/3 each). Two samples: token 0 and token 2.
    # Teacher p = (0.1, 0.1, 0.8): A_0 = log 0.1 - log 1/3 = -1.20 < 0, A_2 = log 0.8 - log 1/3
    # = +0.88 > 0. At r = 1 the loss gradient w.r.t. the logits is
    # -1/2 [A_0 (e_0 - p) + A_2 (e_2 - p)] = (+0.55, -0.05, -0.49), so SGD raises z_2, lowers z_0.
    logits_V = torch.zeros(3, dtype=D, requires_grad=True)
    tokens_BT = torch.tensor([[0], [2]])
    teacher_logp_V = torch.log(t([0.1, 0.1, 0.8]))

    logp_BT = torch.log_softmax(logits_V, -1)[tokens_BT]
    mask_BT = torch.ones(2, 1, dtype=D)
    adv_BT = opd_advantages(teacher_logp_V[tokens_BT], logp_BT.detach(), mask_BT)
    assert adv_BT[0, 0] < 0 < adv_BT[1, 0]
    loss, _ = ppo_clip_loss(logp_BT, logp_BT.detach(), adv_BT, mask_BT)
    loss.backward()

    with torch.no_grad():
        p_before = torch.softmax(logits_V, -1)
        p_after = torch.softmax(logits_V - 1.0 * logits_V.grad, -1)
    assert p_after[2] > p_before[2]  # the teacher-preferred token gains mass
    assert p_after[0] < p_before[0]  # the teacher-disfavoured sample loses it

    def reverse_kl(p):
        return (p * (p.log() - teacher_logp_V)).sum().item()

    assert reverse_kl(p_after) < reverse_kl(p_before)


def test_metrics_are_python_floats_with_hand_values():
    # tokens: r = e^0.5 clipped (A = 1), r = 1 (A = -1), masked
    loss, _, m = loss_and_grad(
        [[0.5, 0.0, 9.0]], [[0.0, 0.0, 0.0]], [[1.0, -1.0, 7.0]], mask=[[1, 1, 0]]
    )
    assert set(m) == {"clip_frac", "dual_clip_frac", "ratio_mean", "adv_mean", "is_weight_mean"}
    assert all(type(v) is float for v in m.values())
    assert m["clip_frac"] == 0.5
    assert m["adv_mean"] == 0.0  # (1 - 1) / 2
    assert m["ratio_mean"] == pytest.approx((math.exp(0.5) + 1) / 2, abs=1e-12)
    assert m["is_weight_mean"] == 1.0
    # (-1.2 + 1) / 2
    assert loss == pytest.approx(-0.1, abs=1e-12)


# ---------------------------------------------------------------- bad inputs


def _ppo(**overrides):
    args = dict(
        logp_BT=torch.zeros(2, 3), old_logp_BT=torch.zeros(2, 3),
        adv_BT=torch.zeros(2, 3), mask_BT=torch.ones(2, 3),
    )
    kw = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    return ppo_clip_loss(**args, **kw)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            dict(adv_BT=torch.zeros(2, 4)),
            r"adv_BT has shape \(2, 4\) but logp_BT has shape \(2, 3\)",
        ),
        (dict(mask_BT=torch.ones(3)), r"mask_BT has shape \(3,\)"),
        (dict(is_weight_BT=torch.ones(1, 3)), r"is_weight_BT has shape \(1, 3\)"),
        (
            dict(logp_BT=torch.zeros(6), old_logp_BT=torch.zeros(6),
                 adv_BT=torch.zeros(6), mask_BT=torch.ones(6)),
            r"logp_BT must be 2-D \(B, T\).*add a batch dimension",
        ),
        (dict(clip_eps_low=-0.1), r"clip_eps_low must be a finite number >= 0 but is -0.1"),
        (dict(clip_eps_high=float("nan")), r"clip_eps_high must be"),
        (dict(dual_clip_c=1.0), r"dual_clip_c must be > 1 \(or None to disable"),
        (dict(agg="mean"), r"unknown aggregation mode 'mean'; use one of .*token-mean"),
        (dict(agg="seq-mean-token-sum-norm", norm_len=0), r"norm_len must be > 0 but is 0"),
    ],
)
def test_ppo_bad_inputs_raise_informative_errors(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _ppo(**overrides)


def test_advantage_and_weight_bad_inputs_raise_informative_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"lam must be a number >= 0 but is -0.5; use lam = 1"):
        gopd_advantages(z, z, z, torch.ones(2, 3), lam=-0.5)
    with pytest.raises(ValueError, match=r"base_logp_BT has shape \(2, 2\)"):
        gopd_advantages(z, z, torch.zeros(2, 2), torch.ones(2, 3), lam=1.0)
    with pytest.raises(ValueError, match=r"old_logp_BT has shape \(3, 2\) but teacher_logp_BT"):
        opd_advantages(z, torch.zeros(3, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"cap must be > 0 but is 0"):
        token_is_weight(z, z, cap=0)
    with pytest.raises(ValueError, match=r"rollout_logp_BT has shape"):
        token_is_weight(z, torch.zeros(2))
