import signal
import threading
import time
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effopd import rewards
from effopd.rewards import extract_boxed, is_equivalent, reward


class MathVerifySpy:
    """Stands in for math-verify's ``parse`` and ``verify`` inside effopd.rewards: records
    every call with its keyword arguments, then calls the real function."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.parses: list[tuple[str, dict]] = []
        self.verifies: list[dict] = []
        real_parse, real_verify = rewards.parse, rewards.verify

        def parse(text, *args, **kwargs):
            self.parses.append((text, kwargs))
            return real_parse(text, *args, **kwargs)

        def verify(gold, pred, *args, **kwargs):
            self.verifies.append(kwargs)
            return real_verify(gold, pred, *args, **kwargs)

        mp.setattr(rewards, "parse", parse)
        mp.setattr(rewards, "verify", verify)

    @property
    def calls(self) -> int:
        return len(self.parses) + len(self.verifies)


@pytest.fixture
def math_verify_spy(monkeypatch):
    return MathVerifySpy(monkeypatch)


def braces_balanced(text: str) -> bool:
    """Independent check: every unescaped brace closed in order (a backslash escapes one char)."""
    depth, i = 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return False
        i += 1
    return depth == 0


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


class ScanCountingStr(str):
    """A str that counts the characters its ``rfind`` calls look at (from ``end`` back to
    the match, or to ``start`` when there is none)."""

    scanned = 0

    def rfind(self, sub, start=0, end=None):
        end = len(self) if end is None else end
        found = super().rfind(sub, start, end)
        self.scanned += end - (found if found >= 0 else start)
        return found


class ScanCountingPattern:
    """Wraps a compiled regex and counts the characters its ``finditer`` scans (from ``pos``
    to the end of the last match taken, or to the end of the text when run to exhaustion)."""

    def __init__(self, pattern):
        self.pattern, self.scanned, self.calls = pattern, 0, 0

    def finditer(self, text, pos=0):
        self.calls += 1
        reached = pos
        try:
            for m in self.pattern.finditer(text, pos):
                reached = m.end()
                yield m
            reached = len(text)
        finally:
            self.scanned += reached - pos


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 20_000,  # many unterminated boxes
        "\\boxed{" + "{" * 50_000 + "}" * 49_999,  # deep nesting, never closed
        "\\boxedx" * 20_000,  # many lookalike macros to skip
        "\\boxed{1}" + "\\boxed{" * 20_000,  # a complete box under many unterminated ones
    ],
)
def test_extract_boxed_is_linear_on_adversarial_input(monkeypatch, text):
    # The work, counted in characters examined, is at most one backward pass (finding the last
    # box) plus one forward pass (matching its braces). Retrying earlier boxes, or rescanning
    # to the end of the text for each one, would count on the order of len(text)**2 instead.
    braces = ScanCountingPattern(rewards._BRACE_TOKEN)
    monkeypatch.setattr(rewards, "_BRACE_TOKEN", braces)
    counted = ScanCountingStr(text)
    assert extract_boxed(counted) is None
    assert counted.scanned > 0  # the counting really sees extract_boxed's search
    assert braces.calls <= 1
    assert counted.scanned + braces.scanned <= 2 * len(text) + len("\\boxed{")


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
        ("0.7", "\\frac{7}{10}"),  # exact comparison does not see 0.7's binary rounding error
        ("123456788", "\\frac{246913576}{2}"),  # 246913576 / 2 = 123456788
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
        ("0.333333", "\\frac{1}{3}"),  # not 1/3, though math-verify's default rounding says so
        ("abc", "3"),
        ("\\frac{1}{2", "0.5"),  # unbalanced: not silently repaired
        ("}{", "1"),
        ("\\\\\\{{{", "1"),
    ],
)
def test_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold)


# The same verdict whether a number meets a plain number (exact Decimal comparison) or goes to
# math-verify (for a fraction on one side); the flag says which path the pair takes.
@pytest.mark.parametrize(
    "pred, gold, expected, via_math_verify",
    [
        ("0.5000001", "0.5", False, False),
        ("\\frac12", "0.5000001", False, True),  # math-verify's default float_rounding=6 says equal
        ("0.5000001", "\\frac{1}{2}", False, True),
        ("0.5001", "0.5", False, False),
        ("\\frac12", "0.5001", False, True),
        ("0.5001", "\\frac{1}{2}", False, True),
        ("\\frac{1}{2}", "0.5", True, True),
        ("0.50", "0.5", True, False),
        ("123456789", "123456788", False, False),
        ("123456789", "\\frac{246913576}{2}", False, True),  # = 123456788
        # 20 digits: float64 cannot tell these apart (its spacing there is 2048)
        ("12345678901234567891", "12345678901234567890", False, False),
        ("12345678901234567891", "\\frac{24691357802469135780}{2}", False, True),
        ("12345678901234567890", "\\frac{24691357802469135780}{2}", True, True),
        ("066", "66", True, False),
        ("066", "\\frac{132}{2}", True, True),
    ],
)
def test_numeric_answers_compare_exactly_on_both_paths(math_verify_spy, pred, gold, expected, via_math_verify):
    assert is_equivalent(pred, gold) is expected
    assert (math_verify_spy.calls > 0) is via_math_verify
    for kwargs in math_verify_spy.verifies:
        assert kwargs["float_rounding"] == rewards.FLOAT_ROUNDING


@pytest.mark.parametrize("pred", ["0.5000001", "0.4999999", "0.5001", "0.50000000000000000001", "0.5", ".50"])
def test_a_number_gets_one_verdict_against_0_5_and_against_a_half(pred):
    # "0.5" sends the pair down the plain-number path, "\\frac12" down math-verify's.
    # Expected: exact decimal equality (float() would call 0.5 + 1e-20 equal to 0.5).
    assert is_equivalent(pred, "0.5") == is_equivalent(pred, "\\frac12") == (Decimal(pred) == Decimal("0.5"))


@pytest.mark.parametrize(
    "pred",
    [
        "(" * 1000,  # math-verify needs its full timeout to give up on this
        "1+" * 200 + "1",  # means 201, but is longer than MAX_ANSWER_CHARS
        "\\frac{1}{2",  # unbalanced
        "}{",
        "\\frac{1}{2}}",
    ],
)
def test_overlong_or_unbalanced_answer_never_reaches_math_verify(math_verify_spy, pred):
    assert len(pred) > rewards.MAX_ANSWER_CHARS or not braces_balanced(pred)
    assert not is_equivalent(pred, "201" if pred.startswith("1+") else "0.5")
    assert math_verify_spy.calls == 0
    # The spy does see an answer that is short and balanced.
    assert is_equivalent("\\frac{1}{2}", "0.5")
    assert len(math_verify_spy.parses) == 2 and len(math_verify_spy.verifies) == 1


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
    t.join()  # pytest-timeout ends the test should it hang
    assert results == {"frac": True, "wrong": False}


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_callers_timer_survives_math_verify():
    old = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert is_equivalent("\\frac{1}{2}", "0.5")  # goes through math-verify's alarm
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        elapsed = time.monotonic() - start
        # math-verify's closing alarm(0) would leave 0 s. Re-armed, the timer holds 100 s less
        # the time that has passed, however long that was (0.1 s for timer granularity).
        assert 0.0 < remaining <= 100.0
        assert remaining >= 100.0 - elapsed - 0.1
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


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_texts)
def test_extract_boxed_never_raises(text):
    out = extract_boxed(text)
    assert out is None or (isinstance(out, str) and out == out.strip())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_texts, st.sampled_from(["1", "\\frac{1}{2}", "x+1"]))
def test_reward_never_raises_and_every_math_verify_call_is_time_limited(text, gold):
    with pytest.MonkeyPatch.context() as mp:
        spy = MathVerifySpy(mp)
        r = reward(text, gold)
    assert r in (0.0, 1.0)
    # Bounded time: at most two parses and one comparison, each under math-verify's time limit.
    assert len(spy.parses) <= 2 and len(spy.verifies) <= 1
    assert all(kw["parsing_timeout"] == rewards.VERIFY_TIMEOUT_S for _, kw in spy.parses)
    assert all(kw["timeout_seconds"] == rewards.VERIFY_TIMEOUT_S for kw in spy.verifies)
    answer = extract_boxed(text)
    if answer is not None and (len(answer) > rewards.MAX_ANSWER_CHARS or not braces_balanced(answer)):
        assert spy.calls == 0
