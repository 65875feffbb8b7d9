"""Verifiable rewards: pull the final answer out of a response and check it against the gold one.

A response's answer is the content of its last ``\\boxed{...}`` (brace-matched). Two answers are
compared in three steps, cheapest first (DESIGN.md, "Evaluation and rewards"):

1. exact string match after stripping surrounding whitespace;
2. for plain integers/decimals on both sides (``066``, ``-3.0``, ``.5``), exact numeric equality;
3. otherwise ``math-verify`` (sympy-based), so ``\\frac{1}{2}``, ``\\frac12`` and ``0.5`` agree.

Numbers compare exactly, on both paths: ``0.5000001`` is not ``0.5`` whether the other side is
written ``0.5`` or ``\\frac12``, and integers of any size are told apart. Step 2 compares two
``Decimal`` values, which is exact. math-verify compares integers and fractions exactly but
rounds both sides to ``float_rounding`` decimal places whenever one side is a decimal number
(its default, 6, makes ``\\frac12`` equal ``0.5000001``, ``\\frac13`` equal ``0.333333`` and
``\\sqrt{2}`` equal ``1.414214``); we pass ``float_rounding=FLOAT_ROUNDING`` = 50, which is
exact for any answer with at most 50 decimal places. (Its parsed decimals carry their own
written digits, 15 significant ones or more, so rounding at 50 places adds no binary noise:
``0.7`` still equals ``\\frac{7}{10}``.) Exact rather than 6-place rounding because only
exactness can be one rule for both paths: math-verify compares an integer with a decimal
exactly whatever ``float_rounding`` is (``\\frac{6}{2}`` != ``3.0000001``), so rounding
plain numbers to 6 places would make ``3`` vs ``3.0000001`` and ``\\frac{6}{2}`` vs
``3.0000001`` disagree. A decimal approximation of a fraction or a root is therefore wrong
(``0.333333`` for ``\\frac13``), as a reference answer written as a fraction asks for.

The reward of a response is 1.0 if its answer is equivalent to the gold answer, else 0.0. Nothing
in this module raises on odd model output: a response without a usable answer scores 0.

math-verify and threads. math-verify bounds every parse and comparison with ``signal.alarm``,
which only works in the main thread (elsewhere it raises). In the main thread we keep its time
limit (``VERIFY_TIMEOUT_S``); in any other thread we switch the limit off, which means a
pathological answer (``\\boxed{10^{10^{10}}}``, ``\\boxed{9!!!!}``) can run for a very long
time there. Score in the main thread, or in worker processes, when the answers are untrusted.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Iterator
from decimal import Decimal

from math_verify import parse, verify
from math_verify.errors import TimeoutException

# Decimal places math-verify rounds both sides to when one of them is a decimal number: far
# beyond any written answer, so that its comparison is exact like the plain-number path's.
FLOAT_ROUNDING = 50
# Seconds math-verify may spend on each parse and each comparison (it takes whole seconds).
VERIFY_TIMEOUT_S = 3
# Longer predicted answers are not sent to math-verify: no real final answer is this long, and
# its parser is superlinear in nesting depth (1,000 open parentheses take over 5 s).
MAX_ANSWER_CHARS = 300

_BOXED = "\\boxed"
# A backslash escapes the next character (so "\{" and "\}" are not braces); anything else that
# matters for brace matching is a brace.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_SPACES = re.compile(r"\s*")
_UNBRACED_ARG = re.compile(r"[^\s${}]+")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _closing_brace(text: str, open_idx: int) -> int | None:
    """Index of the brace closing the one at ``open_idx``, or None if it is never closed."""
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, open_idx):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def _braces_balanced(text: str) -> bool:
    depth = 0
    for m in _BRACE_TOKEN.finditer(text):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed`` in ``text``, stripped of surrounding whitespace.

    ``\\boxed{...}`` is brace-matched (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; escaped
    braces ``\\{ \\}`` do not count). The unbraced form ``\\boxed 42`` gives the run of
    characters up to the next whitespace, ``$`` or brace; ``\\boxed{}`` gives ``""``. Returns
    None when there is no box, or when the last box is unterminated or has no argument (a
    truncated response has no final answer, even if an earlier box was complete).
    ``\\boxedfoo`` is a different macro and is skipped. Runs in time linear in ``len(text)``.
    """
    end = len(text)
    while True:
        start = text.rfind(_BOXED, 0, end)
        if start < 0:
            return None
        arg = start + len(_BOXED)
        if arg < len(text) and text[arg].isascii() and text[arg].isalpha():
            end = start
            continue
        break
    arg = _SPACES.match(text, arg).end()
    if arg < len(text) and text[arg] == "{":
        close = _closing_brace(text, arg)
        return None if close is None else text[arg + 1 : close].strip()
    m = _UNBRACED_ARG.match(text, arg)
    return m.group() if m else None


def _as_number(s: str) -> Decimal | None:
    # Decimal, not float or Fraction: exact, and no digit limit on long integer strings.
    return Decimal(s) if _PLAIN_NUMBER.fullmatch(s) else None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _keep_callers_timer() -> Iterator[None]:
    """Restore the caller's ITIMER_REAL around math-verify.

    math-verify ends each call with ``signal.alarm(0)``, which also cancels any timer the caller
    had armed (pytest-timeout's, for one); re-arm it with the time it has left.
    """
    if not (_in_main_thread() and hasattr(signal, "setitimer")):
        yield
        return
    remaining, interval = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    try:
        yield
    finally:
        if remaining > 0:
            left = remaining - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), interval)


def _math_verify_equal(pred: str, gold: str) -> bool:
    timeout = VERIFY_TIMEOUT_S if _in_main_thread() else None
    try:
        with _keep_callers_timer():
            # Wrapped in \boxed{} so math-verify reads the whole string as one answer.
            gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
            pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
            if not gold_parsed or not pred_parsed:
                return False
            # verify is asymmetric: gold first.
            return bool(
                verify(
                    gold_parsed, pred_parsed, float_rounding=FLOAT_ROUNDING, timeout_seconds=timeout
                )
            )
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return False


def is_parseable(answer: str) -> bool:
    """Whether a reference answer can be verified at all: a plain number, or something
    math-verify parses (with balanced braces and at most ``MAX_ANSWER_CHARS``)."""
    answer = answer.strip()
    if _as_number(answer) is not None:
        return True
    if not answer or len(answer) > MAX_ANSWER_CHARS or not _braces_balanced(answer):
        return False
    timeout = VERIFY_TIMEOUT_S if _in_main_thread() else None
    try:
        with _keep_callers_timer():
            return bool(parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout))
    except (Exception, TimeoutException):
        return False


def is_equivalent(pred: str | None, gold: str) -> bool:
    """Whether the predicted answer ``pred`` means the same as ``gold``.

    None or an empty answer is never equivalent. Numbers compare exactly on both paths (see
    the module docstring): plain numbers on both sides as ``Decimal`` values without sympy
    (``066`` = ``66``, ``-3`` = ``-3.0``, ``0.5`` != ``0.5000001``), and math-verify with
    ``float_rounding=FLOAT_ROUNDING`` (50 decimal places), so ``\\frac{1}{2}`` = ``0.5`` but
    ``\\frac12`` != ``0.5000001`` and ``\\frac13`` != ``0.333333``. Other answers go to
    math-verify unless ``pred`` is longer than ``MAX_ANSWER_CHARS`` or has unbalanced braces
    (then False). Any failure inside math-verify counts as not equivalent.
    """
    if pred is None:
        return False
    if not isinstance(pred, str) or not isinstance(gold, str):
        raise TypeError(
            f"is_equivalent compares strings; got pred of type {type(pred).__name__} and gold of "
            f"type {type(gold).__name__}. Convert answers to str when loading the data."
        )
    pred, gold = pred.strip(), gold.strip()
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    pred_num, gold_num = _as_number(pred), _as_number(gold)
    if pred_num is not None and gold_num is not None:
        return pred_num == gold_num
    if len(pred) > MAX_ANSWER_CHARS or not _braces_balanced(pred):
        return False
    return _math_verify_equal(pred, gold)


def reward(response: str, gold: str) -> float:
    """1.0 if the last boxed answer of ``response`` is equivalent to ``gold``, else 0.0."""
    return 1.0 if is_equivalent(extract_boxed(response), gold) else 0.0


def rewards(responses: list[str], golds: list[str]) -> list[float]:
    """``reward`` of each response against the gold answer at the same position."""
    if len(responses) != len(golds):
        raise ValueError(
            f"rewards needs one gold answer per response; got {len(responses)} responses and "
            f"{len(golds)} gold answers."
        )
    return [reward(r, g) for r, g in zip(responses, golds)]
