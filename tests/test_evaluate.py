import math
from fractions import Fraction
from itertools import combinations

import pytest

from effopd.evaluate import pass_at_k, summarize


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize(
    "n, c, k",
    [(1, 0, 1), (1, 1, 1), (5, 0, 3), (5, 2, 1), (5, 2, 3), (5, 2, 4), (6, 1, 6), (8, 3, 2), (10, 5, 5), (12, 1, 4)],
)
def test_pass_at_k_matches_brute_force(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_by_hand():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the accuracy c/n
    # 4 samples, 1 correct, pairs: 3 of the 6 pairs hold the correct one.
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_pass_at_k_is_stable_for_large_n():
    # C(2000, 1000) is far beyond float range; the product form never forms it.
    n, c, k = 2000, 7, 1000
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


def test_summarize_by_hand():
    correct = [
        [True, False, False, False],  # c=1: pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
        [True, True, False, False],  # c=2: pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6
        [False, False, False, False],  # c=0: pass@2 = 0
    ]
    lengths = [[10, 20, 30, 40], [5, 5, 5, 5], [0, 0, 0, 120]]
    out = summarize(correct, lengths, ks=(1, 2, 8))
    assert set(out) == {"avg@4", "pass@1", "pass@2", "mean_length"}  # k=8 > n is skipped
    assert out["avg@4"] == pytest.approx(3 / 12)
    assert out["pass@1"] == pytest.approx(3 / 12)
    assert out["pass@2"] == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    assert out["mean_length"] == pytest.approx(240 / 12)


def test_summarize_without_lengths():
    out = summarize([[1], [0]])  # ints are read as booleans
    assert out == {"avg@1": 0.5, "pass@1": 0.5}


@pytest.mark.parametrize(
    "correct, lengths, match",
    [
        ([], None, "no problems"),
        ([[]], None, "no samples"),
        ([[True, False], [True]], None, r"correct\[1\] has 1 samples, expected 2"),
        ([[True], [False]], [[3]], "lengths has 1 problems"),
        ([[True], [False]], [[3], [4, 5]], r"lengths\[1\] has 2 samples"),
    ],
)
def test_summarize_rejects_bad_shapes(correct, lengths, match):
    with pytest.raises(ValueError, match=match):
        summarize(correct, lengths)


def test_summarize_rejects_bad_k():
    with pytest.raises(ValueError, match="k in ks must be >= 1"):
        summarize([[True]], ks=(0,))


def test_make_eval_fn_reads_the_prompts_once_and_evaluates_each_model_dir(tmp_path, tiny_models, monkeypatch):
    import json

    from effopd import cli, evaluate

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": i + 1}) + "\n" for i in range(3)))
    eval_fn = evaluate.make_eval_fn(str(data), 2, max_new_tokens=4)
    real = eval_fn(tiny_models["student"])  # a real greedy evaluation of the tiny model
    assert set(real) >= {"accuracy", "avg@1", "pass@1", "mean_length"} and real["accuracy"] in (0.0, 0.5, 1.0)
    assert 1 <= real["mean_length"] <= 4

    calls = []
    monkeypatch.setattr(evaluate, "evaluate_model",
                        lambda model, tok, examples, **kw: calls.append(([e.prompt for e in examples], kw)) or {"accuracy": 1.0})
    data.unlink()  # the prompts were read when the function was made
    assert eval_fn(tiny_models["teacher"]) == {"accuracy": 1.0}
    assert calls == [(["0+1=", "1+1="], {"max_new_tokens": 4})]
    assert cli.make_eval_fn is evaluate.make_eval_fn  # `effopd analyze` builds its eval_fn with the same function
