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
- ``lookahead``: an outer Nesterov-style step (SNOO, arXiv 2510.15830). The direction is a
  momentum of the updates between searches, m <- momentum·m + (θ_t − θ_a), and the candidates
  are θ_t + (c − 1)·m for the paper's c; meant to trigger every few steps
  (``trigger_steps``), it equals ``paper`` at the first search.
- ``rank1``: move only along the top singular direction of each tensor's update
  (σ1·u1·v1ᵀ of θ_t − θ_a, AlphaRL arXiv 2510.00553): θ_t + (c − 1)·σ1·u1·v1ᵀ, c = 3, 5, 7, ...
  The rest of the update is kept as trained, not scaled. Local shards would give each shard's
  own top direction, so it needs unsharded tensors.
- ``expo``: the anchor stays at the initial weights and every candidate scales the *whole*
  update since then, θ_0 + c·(θ_t − θ_0) for c = 1.5, 2, 3, 5, 8, 13 (the first ``max_tries``; ExPO,
  arXiv 2404.16792);
  all candidates are scored and the best kept. Run post hoc on a finished run's checkpoints it
  is the fixed-factor baseline.

Acceptance: ``accept="best"`` compares means (a candidate must beat the best score so far by
``margin`` standard errors of the unpaired scores); ``accept="paired"`` uses that every
candidate is scored on the same prompts with the same sampling seed, and asks the mean of the
per-prompt differences to the best state so far to exceed ``margin`` standard errors of those
differences, which is the smaller, right noise estimate under common random numbers (with
``margin = 0`` both rules are the same).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

#: The candidate schedules (see the module docstring); the first is this class's default. ``effopd
#: train`` and the TRL callback default to ``rank1`` with paired acceptance, the combination the
#: lr-sweep envelope favoured (benchmarks/RESULTS.md).
SCHEDULES = ("paper", "adaptive", "lookahead", "rank1", "expo")
#: Acceptance rules (see the module docstring).
ACCEPT = ("best", "paired")
#: The ``expo`` schedule's factors.
EXPO_FACTORS = (1.5, 2.0, 3.0, 5.0, 8.0, 13.0)

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


#: Above this many rows and columns, :func:`top_component` uses a randomized low-rank SVD.
EXACT_SVD_MAX = 1024


def top_component(delta: torch.Tensor) -> torch.Tensor:
    """σ1·u1·v1ᵀ of a 2-D tensor: by a full SVD when it is small, else by ``torch.svd_lowrank``
    (8 columns, 4 power iterations) under a fixed seed of its own, so it is deterministic and
    leaves the caller's random stream untouched. On a 2048 x 6144 tensor this took 2.2 s against
    40 s for the full SVD (one CPU thread, machine shared with other runs)."""
    if min(delta.shape) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return torch.outer(u[:, 0] * s[0], vh[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(delta, q=8, niter=4)
    return torch.outer(u[:, 0] * s[0], v[:, 0])


@dataclass
class Score:
    """A validation score, its estimated standard error, and (for paired acceptance) the
    per-prompt scores it is the mean of."""

    value: float
    noise: float = 0.0
    per_prompt: list[float] | None = None

    def beats(self, best: "Score", margin: float, paired: bool) -> bool:
        """Whether this score is better than ``best`` by ``margin`` standard errors: of the
        per-prompt differences when ``paired``, else the larger of the two scores' own."""
        if not paired:
            return self.value > best.value + margin * max(best.noise, self.noise)
        if self.per_prompt is None or best.per_prompt is None or len(self.per_prompt) != len(best.per_prompt):
            raise ValueError("accept=paired needs per-prompt scores of equal length from score(); "
                             "build score() with validation.validation_scorer, or use accept=best")
        d = torch.tensor(self.per_prompt, dtype=torch.float64) - torch.tensor(best.per_prompt, dtype=torch.float64)
        se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0
        return float(d.mean()) > margin * se and float(d.mean()) > 0


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
        accept: str = ACCEPT[0],
        momentum: float = 0.5,
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
        if accept not in ACCEPT:
            raise ValueError(f"extrapolate.accept={accept!r} is not a rule: choose one of {', '.join(ACCEPT)}")
        if not 0 <= momentum < 1:
            raise ValueError(f"extrapolate.momentum={momentum} must be in [0, 1)")
        if max_tries < 1:
            raise ValueError(f"extrapolate.max_tries={max_tries} must be >= 1")
        if margin < 0:
            raise ValueError(f"extrapolate.margin={margin} must be >= 0")
        if not params:
            raise ValueError("extrapolate: no parameters selected; check extrapolate.modules")
        self.params = params
        self.schedule, self.max_tries, self.margin = schedule, max_tries, margin
        self.paired, self.momentum = accept == "paired", momentum
        self.trigger_steps = set(trigger_steps) if trigger_steps else None
        self.max_step = max_step
        self.gain, self.min_gain, self.max_gain = init_gain, min_gain, max_gain
        self.storage = torch.device(storage)
        self.total = total or (lambda x: x)
        self.anchor = {n: p.detach().to(self.storage, copy=True) for n, p in params.items()}
        self.velocity: dict[str, torch.Tensor] = {}
        """``lookahead``'s momentum of the updates (empty before its first search)."""
        self.history: list[SearchRecord] = []
        self.total_seconds = 0.0

    # ---- schedule --------------------------------------------------------------------------

    def should_trigger(self, step: int) -> bool:
        if self.max_step is not None and step > self.max_step:
            return False
        return step in self.trigger_steps if self.trigger_steps is not None else pow2_steps(step)

    def candidates(self) -> list[float]:
        if self.schedule == "adaptive":
            return [1.0 + self.gain * 2.0**i for i in range(self.max_tries)]
        if self.schedule == "expo":
            return list(EXPO_FACTORS[: self.max_tries])
        return [3.0 + 2.0 * i for i in range(self.max_tries)]

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
    def _set(self, backup: dict[str, torch.Tensor], c: float, direction: dict[str, torch.Tensor] | None) -> None:
        """params <- :func:`extrapolated` (anchor, backup, c) per tensor, or, with a schedule's own
        ``direction`` D, backup + (c − 1)·D; c = 1 copies backup."""
        for n, p in self.params.items():
            if c == 1 or direction is None:
                p.copy_(extrapolated(self.anchor[n], backup[n], c))
            else:
                p.copy_(backup[n].float().add(direction[n], alpha=c - 1).to(p.dtype))

    @torch.no_grad()
    def _direction(self, backup: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The direction of ``lookahead`` (updated momentum) and ``rank1`` (top singular
        component of the update), float32 on the storage device; None for the others."""
        if self.schedule == "lookahead":
            for n in backup:
                step = backup[n].float() - self.anchor[n].float()
                v = self.velocity.get(n)
                self.velocity[n] = step if v is None else v.mul_(self.momentum).add_(step)
            return self.velocity
        if self.schedule == "rank1":
            out = {}
            for n in backup:
                delta = backup[n].float() - self.anchor[n].float()
                if delta.ndim != 2 or not delta.any():
                    out[n] = torch.zeros_like(delta)
                    continue
                out[n] = top_component(delta)
            return out
        return None

    @torch.no_grad()
    def search(self, step: int, score: Callable[[], Score]) -> SearchRecord:
        """Run one search at ``step``; leaves the parameters at the best state found."""
        t0 = time.time()
        backup = {n: p.detach().to(self.storage, copy=True) for n, p in self.params.items()}
        norm = self.total(sum(float((backup[n].float() - self.anchor[n].float()).pow(2).sum()) for n in backup)) ** 0.5
        direction = self._direction(backup)
        first = best = score()
        rec = SearchRecord(step=step, s0=first.value, noise=first.noise, best=first.value, update_norm=norm)
        best_c, accepted_index, worse_seen = 1.0, None, False
        for i, c in enumerate(self.candidates()):
            self._set(backup, c, direction)
            s = score()
            rec.candidates.append(c)
            rec.scores.append(s.value)
            if s.beats(best, self.margin, self.paired):
                best, rec.best, best_c, accepted_index = s, s.value, c, i
            elif self.schedule == "expo" or (self.schedule == "adaptive" and s.value == rec.best):
                continue  # expo scores every factor; adaptive: a tie is no evidence, try the next scale
            else:
                worse_seen = True
                break
        self._set(backup, best_c, direction)
        rec.accepted_c = best_c
        self._adapt(accepted_index, only_ties=not worse_seen)
        if self.schedule != "expo":  # expo's anchor stays at the initial weights
            for n, p in self.params.items():
                self.anchor[n].copy_(p.detach())
        rec.seconds = time.time() - t0
        self.total_seconds += rec.seconds
        self.history.append(rec)
        return rec

    # ---- state -----------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint must hold (saved as safetensors): the anchor by name, and
        ``lookahead``'s momentum as ``velocity/<name>``."""
        return {**self.anchor, **{f"velocity/{n}": v for n, v in self.velocity.items()}}

    def state_dict(self) -> dict:
        """Everything but :meth:`tensors` (saved separately as safetensors)."""
        return {
            "history": [asdict(r) for r in self.history], "gain": self.gain, "total_seconds": self.total_seconds,
        }

    def load_state_dict(self, state: dict, anchor: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict` and :meth:`tensors` (``anchor``)."""
        missing = set(self.anchor) - set(anchor)
        if missing:
            raise ValueError(f"extrapolation anchor in the checkpoint lacks {sorted(missing)[:3]}")
        for n in self.anchor:
            self.anchor[n].copy_(anchor[n])
        self.velocity = {n: anchor[f"velocity/{n}"].to(self.storage, torch.float32, copy=True)
                         for n in self.anchor if f"velocity/{n}" in anchor}
        self.history = [SearchRecord(**r) for r in state["history"]]
        self.gain, self.total_seconds = state["gain"], state["total_seconds"]
