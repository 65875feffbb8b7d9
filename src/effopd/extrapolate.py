"""EffOPD: extrapolate the weights along the current update direction, keep only what helps.

At trigger steps (1, 2, 4, 8, ... by default) the controller takes the selected parameters
θ_t, the anchor θ_a (the student init at first), and the direction d = θ_t − θ_a, and tries
candidates θ_a + c·d for a sequence of scales c > 1. A candidate is accepted only if its
validation score beats the best so far by more than ``margin`` times the score's estimated
noise; the search stops at the first candidate that does not, and the best state is restored
exactly (θ_t bitwise when nothing was accepted). The anchor then becomes the accepted state.

It is engine-agnostic: it sees a dict of named tensors (local shards are fine, every operation
is elementwise), keeps the anchor and one rollback copy (on CPU by default), and calls a
``score()`` callable. It never touches the optimizer or the learning-rate schedule.

Candidate schedules:

- ``paper``: c = 3, 5, 7, 9, 11, ... (``max_tries`` of them): what the reference implementation's
  factor sequence 2, 2/3, 2/5, ... amounts to.
- ``adaptive``: c_i = 1 + g·2^i, i = 0..max_tries-1, where the gain g adapts across searches:
  after an accept at c_j the next search starts from g·2^j (it keeps the scale that worked);
  after the first candidate scored *worse* than θ_t, g halves (down to ``min_gain``), so it can
  probe scales between 1 and 3 where the large paper steps overshoot. A candidate that only
  *ties* the best score is not accepted but does not end an adaptive search either: early in
  training a small step often changes no validation answer, and stopping there (then shrinking
  the gain) would lock the search into scales too small to matter. If nothing but ties was
  seen, g doubles (up to ``max_gain``). The ``paper`` schedule keeps the strict rule: stop at
  the first non-improvement.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

#: The candidate schedules (see the module docstring); the first is the default.
SCHEDULES = ("paper", "adaptive")

#: The anchor's file in a checkpoint folder (safetensors, the selected tensors by name).
ANCHOR_FILE = "extrapolate_anchor.safetensors"


def anchor_file(sharded: bool, rank: int) -> str:
    """The anchor's file name: one per process (its shards) when the model is sharded."""
    return f"extrapolate_anchor-rank{rank}.safetensors" if sharded else ANCHOR_FILE


def extrapolated(anchor: torch.Tensor, current: torch.Tensor, c: float) -> torch.Tensor:
    """anchor + c·(current − anchor), elementwise, computed in float32 and cast to ``current``'s
    dtype: the one formula behind EffOPD's candidates and the analysis's weight scaling.

    ``c = 1`` returns ``current`` itself and ``c = 0`` ``anchor`` (cast to ``current``'s dtype),
    so both limits are exact. For float32 tensors the result is bitwise ``a + c * (b - a)``: the
    same IEEE subtraction, multiplication and addition, here done in place on the fresh
    difference to save two full-size temporaries. Both tensors must be on one device."""
    if c == 1:
        return current
    if c == 0:
        return anchor.to(current.dtype)
    a = anchor.float()
    return (current.float() - a).mul_(c).add_(a).to(current.dtype)


@dataclass
class Score:
    """A validation score and its estimated standard error."""

    value: float
    noise: float = 0.0


@dataclass
class SearchRecord:
    step: int
    s0: float
    noise: float
    candidates: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    accepted_c: float = 1.0
    best: float = 0.0
    seconds: float = 0.0
    update_norm: float = 0.0
    """‖θ_t − θ_anchor‖ over the selected parameters (summed over shards when sharded)."""

    def metrics(self) -> dict:
        """The search as ``extrapolate/*`` entries of metrics.jsonl (the trainer adds
        ``extrapolate/total_seconds``, the controller's running total)."""
        return {
            "extrapolate/s0": self.s0, "extrapolate/best": self.best, "extrapolate/accepted_c": self.accepted_c,
            "extrapolate/candidates": self.candidates, "extrapolate/scores": self.scores, "extrapolate/noise": self.noise,
            "extrapolate/update_norm": self.update_norm, "extrapolate/seconds": self.seconds,
        }


def pow2_steps(step: int) -> bool:
    return step > 0 and step & (step - 1) == 0


class Extrapolator:
    """The EffOPD controller. ``params`` maps names to the live (selected) parameter tensors."""

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        *,
        schedule: str = SCHEDULES[0],
        max_tries: int = 5,
        margin: float = 0.0,
        trigger_steps: list[int] | None = None,
        max_step: int | None = None,
        init_gain: float = 0.5,
        min_gain: float = 0.125,
        max_gain: float = 64.0,
        storage: str | torch.device = "cpu",
        total: Callable[[float], float] | None = None,
    ):
        """``params`` may be this process's shards of sharded parameters (FSDP2): everything here
        is elementwise, so each process keeps the anchor and rollback copy of its own shards only,
        and ``total`` (the sum over processes) makes the logged update norm global."""
        if schedule not in SCHEDULES:
            raise ValueError(f"extrapolate.schedule={schedule!r} is not a schedule: choose one of {', '.join(SCHEDULES)}")
        if max_tries < 1:
            raise ValueError(f"extrapolate.max_tries={max_tries} must be >= 1")
        if margin < 0:
            raise ValueError(f"extrapolate.margin={margin} must be >= 0")
        if not params:
            raise ValueError("extrapolate: no parameters selected; check extrapolate.modules")
        self.params = params
        self.schedule, self.max_tries, self.margin = schedule, max_tries, margin
        self.trigger_steps = set(trigger_steps) if trigger_steps else None
        self.max_step = max_step
        self.gain, self.min_gain, self.max_gain = init_gain, min_gain, max_gain
        self.storage = torch.device(storage)
        self.total = total or (lambda x: x)
        self.anchor = {n: p.detach().to(self.storage, copy=True) for n, p in params.items()}
        self.history: list[SearchRecord] = []
        self.total_seconds = 0.0

    # ---- schedule --------------------------------------------------------------------------

    def should_trigger(self, step: int) -> bool:
        if self.max_step is not None and step > self.max_step:
            return False
        return step in self.trigger_steps if self.trigger_steps is not None else pow2_steps(step)

    def candidates(self) -> list[float]:
        if self.schedule == "paper":
            return [3.0 + 2.0 * i for i in range(self.max_tries)]
        return [1.0 + self.gain * 2.0**i for i in range(self.max_tries)]

    def _adapt(self, accepted_index: int | None, only_ties: bool = False) -> None:
        if self.schedule != "adaptive":
            return
        if accepted_index is not None:
            self.gain = self.gain * 2.0**accepted_index
        elif only_ties:
            self.gain = self.gain * 2.0
        else:
            self.gain = self.gain / 2.0
        self.gain = min(max(self.gain, self.min_gain), self.max_gain)

    # ---- weights ---------------------------------------------------------------------------

    @torch.no_grad()
    def _set(self, backup: dict[str, torch.Tensor], c: float) -> None:
        """params <- :func:`extrapolated` (anchor, backup, c), per tensor; c = 1 copies backup."""
        for n, p in self.params.items():
            p.copy_(extrapolated(self.anchor[n], backup[n], c))

    @torch.no_grad()
    def search(self, step: int, score: Callable[[], Score]) -> SearchRecord:
        """Run one search at ``step``; leaves the parameters at the best state found."""
        t0 = time.time()
        backup = {n: p.detach().to(self.storage, copy=True) for n, p in self.params.items()}
        norm = self.total(sum(float((backup[n].float() - self.anchor[n].float()).pow(2).sum()) for n in backup)) ** 0.5
        first = score()
        rec = SearchRecord(step=step, s0=first.value, noise=first.noise, best=first.value, update_norm=norm)
        best_c, accepted_index, worse_seen = 1.0, None, False
        for i, c in enumerate(self.candidates()):
            self._set(backup, c)
            s = score()
            rec.candidates.append(c)
            rec.scores.append(s.value)
            if s.value > rec.best + self.margin * max(first.noise, s.noise):
                rec.best, best_c, accepted_index = s.value, c, i
            elif self.schedule == "adaptive" and s.value == rec.best:
                continue  # a tie: no evidence either way, try the next scale
            else:
                worse_seen = True
                break
        self._set(backup, best_c)
        rec.accepted_c = best_c
        self._adapt(accepted_index, only_ties=not worse_seen)
        for n, p in self.params.items():
            self.anchor[n].copy_(p.detach())
        rec.seconds = time.time() - t0
        self.total_seconds += rec.seconds
        self.history.append(rec)
        return rec

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything but the anchor tensors (saved separately as safetensors)."""
        return {
            "history": [asdict(r) for r in self.history], "gain": self.gain, "total_seconds": self.total_seconds,
        }

    def load_state_dict(self, state: dict, anchor: dict[str, torch.Tensor]) -> None:
        missing = set(self.anchor) - set(anchor)
        if missing:
            raise ValueError(f"extrapolation anchor in the checkpoint lacks {sorted(missing)[:3]}")
        for n in self.anchor:
            self.anchor[n].copy_(anchor[n])
        self.history = [SearchRecord(**r) for r in state["history"]]
        self.gain, self.total_seconds = state["gain"], state["total_seconds"]
