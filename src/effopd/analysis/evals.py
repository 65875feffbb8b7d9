"""Evaluation-based analyses (DESIGN.md §2, 3, 5, 7): build a model, evaluate it, record metrics.

``eval_fn(model_dir) -> {"accuracy": float, ...}`` is the caller's evaluation (e.g. avg@k on a
held-out set). Built models are written to a temporary directory, evaluated, and deleted before
the next one is built, so disk and memory hold one extra model at a time.

- efficiency (§2): the base and every checkpoint as-is; accuracy against total ‖Δθ‖.
- contribution (§3): per module type, and per window of consecutive layers, apply only that
  group's update to the base, and remove only that group's update from the final checkpoint.
- reconstruction (§5): the final checkpoint with each selected 2-D weight's update replaced by
  its norm-matched top-k% or bottom-k% reconstruction.
- scaling (§7): early checkpoints moved along their update, θ_0 + α(θ_t − θ_0), and
  recovery = (acc_α − acc_0)/(acc_T − acc_0) (None when acc_T = acc_0).
"""

from __future__ import annotations

import math
import numbers
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from effopd.analysis import weights
from effopd.analysis.io import AnalysisError

EvalFn = Callable[[Path], Mapping]


class Evaluator:
    """Runs ``eval_fn`` on checkpoint directories or on built state dicts, with one progress bar."""

    def __init__(self, eval_fn: EvalFn, src_dir: Path, work_dir: Path, total: int, progress: bool = True):
        self.eval_fn, self.src_dir = eval_fn, Path(src_dir)
        self.tmp = Path(tempfile.mkdtemp(prefix=".eval-models-", dir=work_dir))
        self.bar = tqdm(total=total, desc="evaluating models", unit="model", disable=not progress)

    def path(self, model_dir: str | Path, what: str) -> dict:
        self.bar.set_postfix_str(what)
        metrics = self.eval_fn(Path(model_dir))
        self.bar.update()
        return _check_metrics(metrics, what)

    def state(self, state: dict, what: str) -> dict:
        model_dir = weights.save_model_dir(state, self.src_dir, self.tmp / "model")
        del state
        try:
            return self.path(model_dir, what)
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)

    def close(self) -> None:
        self.bar.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _check_metrics(metrics, what: str) -> dict:
    """Keep the JSON-friendly scalar entries; ``accuracy`` must be one of them."""
    if not isinstance(metrics, Mapping) or not isinstance(metrics.get("accuracy"), numbers.Real):
        raise AnalysisError(f"eval_fn must return a dict with a numeric 'accuracy'; for {what} it returned {metrics!r}")
    return {k: (float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v)
            for k, v in metrics.items() if isinstance(v, (numbers.Real, str))}


def recovery(acc: float, acc0: float, accT: float) -> float | None:
    """(acc − acc_0)/(acc_T − acc_0): the share of the final gain reached; None without a gain."""
    return (acc - acc0) / (accT - acc0) if accT != acc0 else None


def layer_windows(layers: Sequence[int], window: int, stride: int) -> list[list[int]]:
    """Windows of ``window`` consecutive layers every ``stride`` layers; the last window is moved
    to end at the last layer so that every layer is covered."""
    layers = sorted(layers)
    window = max(1, min(window, len(layers)))
    starts = list(range(0, len(layers) - window + 1, max(1, stride)))
    if starts[-1] + window < len(layers):
        starts.append(len(layers) - window)
    return [layers[s:s + window] for s in starts]


def efficiency(ev: Evaluator, base: Path, ckpts: Sequence[tuple[int, Path]], magnitude: dict) -> dict:
    base_m = ev.path(base, "base")
    ck_m = [ev.path(p, f"step {s}") for s, p in ckpts]
    points = [{"step": s, "total_norm": magnitude["total_norm"][i], "selected_norm": magnitude["selected_norm"][i],
               "accuracy": ck_m[i]["accuracy"]} for i, (s, _) in enumerate(ckpts)]
    return {"base": base_m, "checkpoints": ck_m, "points": points}


def _apply_and_remove(ev: Evaluator, base: Path, final: Path, select, label: str) -> dict:
    return {mode: ev.state(weights.partial(base, final, select, mode), f"{mode} {label}") for mode in ("apply", "remove")}


def contribution(ev: Evaluator, base: Path, final: Path, types: Sequence[str], windows: Sequence[Sequence[int]]) -> dict:
    return {
        "types": {t: _apply_and_remove(ev, base, final, weights.by_types([t]), t) for t in types},
        "windows": [{"layers": list(w), **_apply_and_remove(ev, base, final, weights.by_layers(w), f"layers {w[0]}-{w[-1]}")}
                    for w in windows],
    }


def reconstruction(ev: Evaluator, base: Path, final: Path, fracs: Sequence[float], types, exact: bool | None) -> list[dict]:
    rows = []
    for f in fracs:
        row = {"frac": f}
        for side in ("top", "bottom"):
            state = weights.lowrank(base, final, f, top=side == "top", types=types, exact=exact)
            row[side] = ev.state(state, f"{side} {f:g}")
        rows.append(row)
    return rows


def scaling(ev: Evaluator, base: Path, early: Sequence[tuple[int, Path]], alphas: Sequence[float],
            base_m: dict, ck_m: dict[int, dict], accT: float) -> list[dict]:
    """One row per (early checkpoint, α); α = 0 and α = 1 reuse the base / checkpoint results."""
    rows = []
    for step, path in early:
        for a in alphas:
            if a == 0:
                m = base_m
            elif a == 1:
                m = ck_m[step]
            else:
                m = ev.state(weights.scaled(base, path, a), f"step {step} x{a:g}")
            rows.append({"step": step, "alpha": a, "metrics": m,
                         "recovery": recovery(m["accuracy"], base_m["accuracy"], accT)})
    return rows


def n_evaluations(n_ckpts: int, n_types: int, n_windows: int, n_fracs: int, n_early: int, alphas: Sequence[float]) -> int:
    return 1 + n_ckpts + 2 * (n_types + n_windows + n_fracs) + n_early * sum(1 for a in alphas if a not in (0, 1))


def default_window(n_layers: int) -> int:
    """A quarter of the layers (at least one)."""
    return max(1, math.ceil(n_layers / 4))
