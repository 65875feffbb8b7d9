"""The embedded verifiable reasoning task: multi-step integer arithmetic.

A problem is a chain of additions and subtractions evaluated left to right, e.g. the prompt
``47+25-38=``. Its worked solution writes one step per operation and ends in a boxed answer::

    47+25=72;72-38=34;\\boxed{34}

The bare form skips the steps: ``\\boxed{34}``. Intermediate values never go negative (a
subtraction that would is drawn as an addition), so the vocabulary is digits, ``+ - = ;`` and
the box. Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from effopd.data.example import Example


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty knobs: operation count is drawn uniformly from [min_ops, max_ops]; every
    operand has exactly ``digits`` digits."""

    min_ops: int = 2
    max_ops: int = 3
    digits: int = 2

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(
                f"TaskSpec: need 1 <= min_ops <= max_ops, got min_ops={self.min_ops}, "
                f"max_ops={self.max_ops}; set min_ops to at least 1 and not above max_ops"
            )
        if not 1 <= self.digits <= 6:
            raise ValueError(f"TaskSpec: digits must be in 1..6, got {self.digits}")


def boxed(value: int | str) -> str:
    return "\\boxed{" + str(value) + "}"


def make_problem(rng: random.Random, spec: TaskSpec) -> Example:
    """Draw one problem; ``solution`` holds the worked form."""
    lo, hi = (0 if spec.digits == 1 else 10 ** (spec.digits - 1)), 10**spec.digits - 1
    value = rng.randint(lo, hi)
    prompt, steps = str(value), []
    for _ in range(rng.randint(spec.min_ops, spec.max_ops)):
        operand = rng.randint(lo, hi)
        op = rng.choice("+-") if operand <= value else "+"
        new = value + operand if op == "+" else value - operand
        steps.append(f"{value}{op}{operand}={new};")
        prompt += f"{op}{operand}"
        value = new
    return Example(prompt=prompt + "=", answer=str(value), solution="".join(steps) + boxed(value))


def bare_solution(example: Example) -> str:
    """The answer-only completion of a problem (what an eliciting pre-training corpus mostly holds)."""
    return boxed(example.answer)


def generate_split(n: int, spec: TaskSpec, seed: int, exclude: set[str] = frozenset()) -> list[Example]:
    """``n`` distinct problems whose prompts are not in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(
                f"could not draw {n} distinct problems for {spec}; the space is too small: "
                "increase digits or max_ops, or ask for fewer problems"
            )
        ex = make_problem(rng, spec)
        if ex.prompt in seen:
            continue
        seen.add(ex.prompt)
        out.append(Example(ex.prompt, ex.answer, ex.solution, source=f"embedded[seed={seed}][{len(out)}]"))
    return out


def make_splits(
    spec: TaskSpec, seed: int, n_train: int = 20000, n_val: int = 256, n_test: int = 1000
) -> dict[str, list[Example]]:
    """Disjoint train/val/test splits of the target distribution (test first, so that its
    content does not depend on the train size)."""
    test = generate_split(n_test, spec, seed * 1000 + 3)
    val = generate_split(n_val, spec, seed * 1000 + 2, exclude={e.prompt for e in test})
    train = generate_split(n_train, spec, seed * 1000 + 1, exclude={e.prompt for e in test + val})
    return {"train": train, "val": val, "test": test}
