import signal
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effopd import rewards
from effopd.rewards import extract_boxed, is_equivalent, reward

# --- extract_boxed -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("so $\\boxed{\\frac{\\sqrt{3}}{2}}$ done", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}", "3"),  # last wins
        ("\\boxed{ 7 }", "7"),  # surrounding whitespace dropped
        ("\\boxed  {x + 1}", "x + 1"),  # space before the brace
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not counted
        ("\\boxed{a\\\\}", "a\\\\"),  # an escaped backslash does not escape the brace
        ("\\boxed{}", ""),
        ("\\boxed 42 is it", "42"),  # unbraced form
        ("\\boxed{1} and \\boxedfoo{2}", "1"),  # \boxedfoo is another macro
        ("\\boxed{\\boxed{5}}", "5"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no box here, the answer is 42",
        "",
        "\\boxed{12",  # unterminated
        "\\boxed{1} then truncated \\boxed{\\frac{1}{2}",  # last box unterminated: no answer
        "\\boxed",
        "\\boxed}",
        "\\boxed{\\}",  # the only closing brace is escaped
    ],
)
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


def test_extract_boxed_is_linear_on_adversarial_input():
    # Many unterminated boxes and deep nesting: a quadratic scan would take minutes here.
    cases = ["\\boxed{" * 200_000, "\\boxed{" + "{" * 500_000 + "}" * 499_999, "\\boxedx" * 200_000]
    for text in cases:
        start = time.perf_counter()
        assert extract_boxed(text) is None
        assert time.perf_counter() - start < 2.0


# --- is_equivalent -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("42", "42"),
        (" 42 ", "42"),
        ("066", "66"),
        ("-3", "-3.0"),
        ("+5", "5"),
        (".5", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("\\frac12", "\\frac{1}{2}"),
        ("0.75", "\\dfrac{3}{4}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("1,000", "1000"),
    ],
)
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        (None, "1"),
        ("", "1"),
        ("41", "42"),
        ("-3", "3"),
        ("0.5", "0.50001"),  # plain numbers compare exactly
        ("\\frac{1}{3}", "0.5"),
        ("abc", "3"),
        ("\\frac{1}{2", "0.5"),  # unbalanced: not silently repaired
        ("}{", "1"),
        ("\\\\\\{{{", "1"),
    ],
)
def test_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold)


def test_overlong_answer_is_rejected_without_math_verify():
    # math-verify needs its full timeout to give up on 1,000 open parentheses.
    start = time.perf_counter()
    assert not is_equivalent("(" * 1000, "1")
    assert time.perf_counter() - start < 1.0


def test_is_equivalent_rejects_non_strings():
    with pytest.raises(TypeError, match="gold of type int"):
        is_equivalent("1", 1)


def test_is_equivalent_works_outside_the_main_thread():
    # math-verify's signal-based timeout raises outside the main thread unless it is disabled.
    results = {}

    def work():
        results["frac"] = is_equivalent("\\frac{1}{2}", "0.5")
        results["wrong"] = is_equivalent("\\frac{1}{3}", "0.5")

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=60)
    assert results == {"frac": True, "wrong": False}


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_callers_timer_survives_math_verify():
    old = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert is_equivalent("\\frac{1}{2}", "0.5")  # goes through math-verify's alarm
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90.0 < remaining <= 100.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- reward / rewards ----------------------------------------------------------------------------


def test_reward():
    assert reward("We get $\\boxed{\\frac{1}{2}}$.", "0.5") == 1.0
    assert reward("Guess \\boxed{3}, no wait: \\boxed{4}", "4") == 1.0
    assert reward("Guess \\boxed{4}, no wait: \\boxed{3}", "4") == 0.0
    assert reward("The answer is 4.", "4") == 0.0  # unboxed answers do not count
    assert reward("\\boxed{}", "4") == 0.0


def test_rewards_batch():
    assert rewards.rewards(["\\boxed{1}", "\\boxed{2}", "none"], ["1", "3", "1"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 responses and 1 gold"):
        rewards.rewards(["a", "b"], ["a"])


# --- fuzzing -------------------------------------------------------------------------------------

_pieces = st.sampled_from(
    ["\\boxed", "\\boxed{", "{", "}", "\\", "\\\\", "\\{", "\\}", "$", " ", "\n", "^", "(", ")",
     "\\frac", "1", "23", "-", ".", "x", "=", ",", "!", "\\sqrt", "é", "\x00"]
)
_soup = st.lists(st.one_of(_pieces, st.text(max_size=3)), max_size=80).map("".join)
# The last form always reaches the answer comparison (math-verify) with odd content.
_texts = st.one_of(st.text(max_size=200), _soup, st.builds("{}\\boxed{{{}}}".format, _soup, _soup))


@settings(max_examples=200, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(_texts)
def test_extract_boxed_never_raises(text):
    out = extract_boxed(text)
    assert out is None or (isinstance(out, str) and out == out.strip())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_texts, st.sampled_from(["1", "\\frac{1}{2}", "x+1"]))
def test_reward_never_raises_and_is_quick(text, gold):
    start = time.perf_counter()
    r = reward(text, gold)
    # Bounded by math-verify's timeouts (one per parse and per comparison), far less in practice.
    assert time.perf_counter() - start < 4 * rewards.VERIFY_TIMEOUT_S
    assert r in (0.0, 1.0)
