"""The EffOPD controller on toy problems: no model needed."""

import pytest
import torch

from effopd.extrapolate import SCHEDULES, Extrapolator, Score, SearchRecord, extrapolated, pow2_steps


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}


def _distance_score(params, target, calls=None):
    """Score = −‖θ − target‖ (higher is better), noise-free."""
    def score():
        if calls is not None:
            calls.append({n: p.clone() for n, p in params.items()})
        return Score(-sum(float((params[n] - target[n]).pow(2).sum()) for n in params) ** 0.5)
    return score


def test_pow2_trigger_and_explicit_steps():
    assert [s for s in range(1, 40) if pow2_steps(s)] == [1, 2, 4, 8, 16, 32]
    ex = Extrapolator(_params(), trigger_steps=[3, 7], max_step=5)
    assert [s for s in range(10) if ex.should_trigger(s)] == [3]


def test_search_lands_where_the_score_peaks():
    """θ0 = 0, one step moved θ to d; the optimum is at 7·d: the paper grid accepts 3, 5, 7 and
    stops at 9 (worse than 7), leaving exactly 7·d."""
    d = _params(1)
    params = {n: v.clone() for n, v in d.items()}
    ex = Extrapolator(params, schedule="paper")
    for n in ex.anchor:
        ex.anchor[n].zero_()
    target = {n: 7 * v for n, v in d.items()}
    rec = ex.search(1, _distance_score(params, target))
    assert rec.candidates == [3, 5, 7, 9]
    assert rec.accepted_c == 7
    for n in params:
        torch.testing.assert_close(params[n], 7 * d[n])
        assert torch.equal(ex.anchor[n], params[n])  # the anchor becomes the accepted state


def test_rollback_is_bitwise_and_anchor_moves_to_theta_t():
    anchor, theta = _params(2), _params(3)
    params = {n: v.clone() for n, v in theta.items()}
    ex = Extrapolator(params)
    for n in ex.anchor:
        ex.anchor[n].copy_(anchor[n])
    scores = iter([0.5, 0.4])  # s0, then c=3 is worse: reject and stop
    rec = ex.search(1, lambda: Score(next(scores)))
    assert rec.candidates == [3] and rec.accepted_c == 1.0
    for n in params:
        assert torch.equal(params[n], theta[n])
        assert torch.equal(ex.anchor[n], theta[n])


def test_state_after_search_never_scores_below_s0():
    torch.manual_seed(0)
    for trial in range(20):
        params = _params(trial)
        ex = Extrapolator(params, schedule="adaptive")
        target = _params(100 + trial)
        score = _distance_score(params, target)
        rec = ex.search(1, score)
        assert score().value >= rec.s0
        assert score().value == rec.best


def test_margin_rejects_gains_within_noise():
    params = _params()
    ex = Extrapolator(params, margin=2.0)
    scores = iter([Score(0.50, 0.05), Score(0.55, 0.05)])  # +0.05 < 2 x 0.05
    rec = ex.search(1, lambda: next(scores))
    assert rec.accepted_c == 1.0


def test_adaptive_schedule_probes_small_scales_and_adapts():
    ex = Extrapolator(_params(), schedule="adaptive", max_tries=4, init_gain=0.5, min_gain=0.125, max_gain=2.0)
    assert ex.candidates() == [1.5, 2.0, 3.0, 5.0]
    ex._adapt(None)
    assert ex.candidates()[0] == 1.25
    ex._adapt(None), ex._adapt(None)
    assert ex.candidates()[0] == 1.125  # floored at min_gain
    ex._adapt(2)
    assert ex.candidates()[0] == 1.5
    ex._adapt(None, only_ties=True)
    assert ex.candidates()[0] == 2.0
    ex._adapt(None, only_ties=True)
    assert ex.candidates()[0] == 3.0  # capped at max_gain


def test_adaptive_search_continues_through_ties_and_stops_at_worse():
    params = _params()
    ex = Extrapolator(params, schedule="adaptive", max_tries=5, init_gain=0.5)
    scores = iter([0.3, 0.3, 0.3, 0.5, 0.4])  # s0; c=1.5 tie; c=2 tie; c=3 better; c=5 worse
    rec = ex.search(1, lambda: Score(next(scores)))
    assert rec.candidates == [1.5, 2.0, 3.0, 5.0] and rec.accepted_c == 3.0
    assert ex.gain == 2.0  # accepted at index 2: 0.5 * 2^2
    ex2 = Extrapolator(_params(), schedule="adaptive", max_tries=3, init_gain=0.5)
    ties = iter([0.3, 0.3, 0.3, 0.3])
    rec2 = ex2.search(1, lambda: Score(next(ties)))
    assert rec2.accepted_c == 1.0 and len(rec2.candidates) == 3 and ex2.gain == 1.0  # only ties: grow


def test_paper_schedule_stops_at_a_tie():
    ex = Extrapolator(_params(), schedule="paper")
    scores = iter([0.3, 0.3])
    rec = ex.search(1, lambda: Score(next(scores)))
    assert rec.candidates == [3.0] and rec.accepted_c == 1.0


def test_only_selected_tensors_change():
    full = {"sel": torch.ones(3), "other": torch.full((3,), 2.0)}
    ex = Extrapolator({"sel": full["sel"]})
    ex.anchor["sel"].zero_()
    scores = iter([0.0, 1.0, 0.5])  # accept c=3, reject c=5
    ex.search(1, lambda: Score(next(scores)))
    assert torch.equal(full["sel"], torch.full((3,), 3.0))
    assert torch.equal(full["other"], torch.full((3,), 2.0))


def test_state_dict_round_trip():
    params = _params()
    ex = Extrapolator(params, schedule="adaptive")
    scores = iter([0.0, 1.0, 0.5])
    ex.search(4, lambda: Score(next(scores)))
    other = Extrapolator(_params(9), schedule="adaptive")
    other.load_state_dict(ex.state_dict(), ex.anchor)
    assert other.gain == ex.gain and other.history == ex.history
    assert all(torch.equal(other.anchor[n], ex.anchor[n]) for n in params)


@pytest.mark.parametrize("kwargs, match", [(dict(schedule="x"), "schedule"), (dict(max_tries=0), "max_tries"), (dict(margin=-1), "margin")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Extrapolator(_params(), **kwargs)


def test_bad_schedule_message_lists_the_schedules():
    with pytest.raises(ValueError, match="choose one of paper, adaptive"):
        Extrapolator(_params(), schedule="linear")
    for name in SCHEDULES:
        assert Extrapolator(_params(), schedule=name).candidates()  # every listed schedule is accepted


@pytest.mark.parametrize("c", [3.0, 5.0, 11.0, 1.5, 1.125, 0.3, 65.0, -2.0])
def test_extrapolated_is_bitwise_the_float32_formula(c):
    g = torch.Generator().manual_seed(int(abs(c) * 1000))
    a, b = torch.randn(257, 33, generator=g), torch.randn(257, 33, generator=g) * 3
    a0, b0 = a.clone(), b.clone()
    out = extrapolated(a, b, c)
    assert out.dtype == torch.float32
    assert torch.equal(out, a0 + c * (b0 - a0))
    assert torch.equal(a, a0) and torch.equal(b, b0)  # the inputs are left as they were


def test_extrapolated_limits_and_dtypes():
    a = torch.randn(64, dtype=torch.float64).to(torch.bfloat16)
    b = torch.randn(64, dtype=torch.float64).to(torch.bfloat16)
    assert extrapolated(a, b, 1.0) is b
    assert torch.equal(extrapolated(a, b, 0.0), a)
    assert extrapolated(a.float(), b, 0.0).dtype == torch.bfloat16  # cast to the current tensor's dtype
    out = extrapolated(a, b, 3.0)
    exact = a.double() + 3.0 * (b.double() - a.double())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-6)  # one bf16 rounding of the fp32 result
    assert torch.equal(out, (a.float() + 3.0 * (b.float() - a.float())).to(torch.bfloat16))


def test_search_record_metrics_are_the_logged_keys():
    params = _params()
    norm = sum(float(p.pow(2).sum()) for p in params.values()) ** 0.5
    ex = Extrapolator(params, schedule="paper", max_tries=3)
    for n in ex.anchor:
        ex.anchor[n].zero_()  # the update is θ itself
    scores = iter([Score(0.25, 0.01), Score(0.5, 0.02), Score(0.375, 0.02)])  # accept c=3, stop at c=5
    rec = ex.search(4, lambda: next(scores))
    m = rec.metrics()
    assert m.pop("extrapolate/update_norm") == pytest.approx(norm)
    assert 0 <= m.pop("extrapolate/seconds") <= ex.total_seconds
    assert m == {
        "extrapolate/s0": 0.25, "extrapolate/best": 0.5, "extrapolate/accepted_c": 3.0,
        "extrapolate/candidates": [3.0, 5.0], "extrapolate/scores": [0.5, 0.375], "extrapolate/noise": 0.01,
    }
    plain = SearchRecord(step=1, s0=0.0, noise=0.0).metrics()
    assert plain["extrapolate/accepted_c"] == 1.0 and plain["extrapolate/candidates"] == []


def test_search_records_no_autograd_history():
    params = {"w": torch.ones(3, requires_grad=True)}
    ex = Extrapolator(params, schedule="paper", max_tries=1)
    ex.anchor["w"].zero_()
    scores = iter([0.0, 1.0])  # accept c=3
    ex.search(1, lambda: Score(next(scores)))
    assert torch.equal(params["w"].detach(), torch.full((3,), 3.0))
    assert params["w"].grad_fn is None and params["w"].requires_grad  # changed in place, outside autograd


# ---- the other schedules and the paired rule ---------------------------------------------------

def _moved(anchor_seed, theta_seed, schedule, **kw):
    anchor, theta = _params(anchor_seed), _params(theta_seed)
    params = {n: v.clone() for n, v in theta.items()}
    ex = Extrapolator(params, schedule=schedule, **kw)
    for n in ex.anchor:
        ex.anchor[n].copy_(anchor[n])
    return ex, params, anchor, theta


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_no_schedule_accepts_anything_when_every_extrapolation_is_worse(schedule):
    """Score peaks exactly at θ_t: whatever the direction, every candidate scores lower, so each
    schedule must restore θ_t bitwise, on consecutive searches with training steps between."""
    ex, params, _, _ = _moved(4, 5, schedule, trigger_steps=[1, 2, 3])
    for step in (1, 2, 3):
        if step > 1:  # a training step moves θ
            for n, p in params.items():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        theta = {n: v.clone() for n, v in params.items()}
        rec = ex.search(step, _distance_score(params, theta))
        assert rec.accepted_c == 1.0 and rec.best == rec.s0 == 0.0
        assert rec.candidates and all(s < 0 for s in rec.scores)
        for n in params:
            assert torch.equal(params[n], theta[n])


def test_expo_keeps_the_initial_anchor_and_scores_every_factor():
    """θ0 = 0, θ_t = d, optimum at 2·d: expo tries all max_tries factors, keeps c = 2, and the anchor
    stays at θ0 (the next search scales the whole update from the init again)."""
    d = _params(6)
    params = {n: v.clone() for n, v in d.items()}
    ex = Extrapolator(params, schedule="expo")
    for n in ex.anchor:
        ex.anchor[n].zero_()
    rec = ex.search(1, _distance_score(params, {n: 2 * v for n, v in d.items()}))
    assert rec.candidates == [1.5, 2.0, 3.0, 5.0, 8.0] and rec.accepted_c == 2.0
    for n in params:
        torch.testing.assert_close(params[n], 2 * d[n])
        assert not ex.anchor[n].any()


def test_rank1_moves_only_along_the_top_singular_direction():
    """The update is a known rank-2 matrix σ1 u1 v1ᵀ + σ2 u2 v2ᵀ; with the optimum far along u1 v1ᵀ
    the accepted state differs from θ_t only by a multiple of u1 v1ᵀ."""
    q1, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    q2, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    top = torch.outer(q1[:, 0], q2[:, 0])
    delta = 3.0 * top + 1.0 * torch.outer(q1[:, 1], q2[:, 1])
    params = {"w": delta.clone()}
    ex = Extrapolator(params, schedule="rank1")
    ex.anchor["w"].zero_()
    rec = ex.search(1, _distance_score(params, {"w": delta + 12.0 * top}))  # c = 5 lands exactly there
    assert rec.accepted_c == 5.0
    torch.testing.assert_close(params["w"], delta + 12.0 * top)


def test_lookahead_follows_the_momentum_and_checkpoints_it():
    """Two searches: the first direction is the update itself; the second is momentum·m + Δ2. The
    momentum survives tensors() / load_state_dict() into a new controller."""
    params = {"w": torch.ones(3, 2)}
    ex = Extrapolator(params, schedule="lookahead", momentum=0.5, max_tries=1)
    ex.anchor["w"].zero_()
    worse = iter([1.0, 0.0, 1.0, 0.0])
    ex.search(1, lambda: Score(next(worse)))  # Δ1 = 1, nothing accepted
    torch.testing.assert_close(ex.velocity["w"], torch.ones(3, 2))
    params["w"].add_(2.0)  # Δ2 = 2 (anchor moved to θ_1 = 1)
    scores = iter([0.0, 1.0])
    rec = ex.search(2, lambda: Score(next(scores)))  # c = 3 accepted: θ = 3 + 2·(0.5·1 + 2)
    assert rec.accepted_c == 3.0
    torch.testing.assert_close(params["w"], torch.full((3, 2), 8.0))
    again = Extrapolator({"w": params["w"].clone()}, schedule="lookahead")
    again.load_state_dict(ex.state_dict(), ex.tensors())
    torch.testing.assert_close(again.velocity["w"], torch.full((3, 2), 2.5))


def test_paired_rule_accepts_a_consistent_small_gain_the_unpaired_rule_rejects():
    """Per-prompt scores vary a lot between prompts, but the candidate is better on every prompt
    by 0.05: the paired difference is far beyond one standard error, the unpaired one is not."""
    base = [0.0, 1.0, 0.2, 0.8, 0.4, 0.6, 0.1, 0.9]
    s0 = Score(sum(base) / 8, float(torch.tensor(base).std() / 8**0.5), base)
    better = [b + 0.05 for b in base]
    s1 = Score(sum(better) / 8, s0.noise, better)
    assert s1.beats(s0, 1.0, paired=True)
    assert not s1.beats(s0, 1.0, paired=False)
    mixed = [b + (0.3 if i % 2 else -0.25) for i, b in enumerate(base)]  # higher mean, no consistent gain
    s2 = Score(sum(mixed) / 8, s0.noise, mixed)
    assert s2.value > s0.value and not s2.beats(s0, 1.0, paired=True)


def test_paired_rule_needs_per_prompt_scores():
    ex, params, _, _ = _moved(0, 1, "paper", accept="paired", margin=1.0)
    with pytest.raises(ValueError, match="per-prompt scores"):
        ex.search(1, lambda: Score(0.5, 0.1))


def test_top_component_of_a_large_update_matches_the_exact_svd():
    """Above EXACT_SVD_MAX the randomized SVD must find the same top component (a clear spectral
    gap, as a trained update has), and leave the global random stream where it was."""
    from effopd.extrapolate import EXACT_SVD_MAX, top_component

    g = torch.Generator().manual_seed(0)
    m, n = EXACT_SVD_MAX + 8, 300
    u, v = torch.randn(m, generator=g), torch.randn(n, generator=g)
    delta = 5.0 * torch.outer(u / u.norm(), v / v.norm()) + 0.01 * torch.randn(m, n, generator=g)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    got = top_component(delta)
    assert torch.equal(torch.rand(3), expected_next)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(got, torch.outer(U[:, 0] * S[0], Vh[0]), atol=1e-4, rtol=1e-3)


def test_the_shipped_default_rule_accepts_nothing_when_every_extrapolation_is_worse():
    """effopd train's default (rank1 schedule, paired acceptance, margin 1) on a per-prompt toy
    score that peaks at θ_t on every prompt, over consecutive searches: θ_t is restored bitwise."""
    from effopd.config import ExtrapolateConfig

    d = ExtrapolateConfig()
    ex, params, _, _ = _moved(7, 8, d.schedule, accept=d.accept, margin=d.margin, trigger_steps=[1, 2, 3])
    weights = [0.5, 1.0, 2.0, 4.0]
    for step in (1, 2, 3):
        if step > 1:
            for n, p in params.items():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        theta = {n: v.clone() for n, v in params.items()}

        def score():
            dist = sum(float((params[n] - theta[n]).pow(2).sum()) for n in params) ** 0.5
            per = [-w * dist for w in weights]
            return Score(sum(per) / len(per), 0.0, per)

        rec = ex.search(step, score)
        assert rec.accepted_c == 1.0 and rec.candidates
        for n in params:
            assert torch.equal(params[n], theta[n])
