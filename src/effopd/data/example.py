"""The unit every prompt set is made of."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One prompt with its verifiable answer.

    ``solution`` is an optional worked solution (used by SFT baselines and by the embedded task's
    student/teacher pre-training); ``source`` says where the example came from (``file:line``),
    so errors about it can point back to the input.
    """

    prompt: str
    answer: str
    solution: str | None = None
    source: str = ""
    teacher: str | None = None
    """The teacher that scores this prompt (a key of ``model.teachers``); None: the only teacher."""
