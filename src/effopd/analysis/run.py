"""``analyze()``: every parameter-dynamics analysis of a run, written as JSON + tensors.

Analyses 1, 4, 6, 8, 9 (:mod:`.dynamics`) always run; 2, 3, 5, 7 (:mod:`.evals`) run when an
``eval_fn`` is given, and the JSON says so when they did not. The HTML report reads only the two
files written here.

``OUT/analysis.json`` (schema ``"effopd.analysis/1"``: :data:`effopd.report.load.SCHEMA`, which
also names the two files, torch-free). Lists marked [ckpt] have one entry per checkpoint, in the
order of ``steps``; the last checkpoint is "final" (T). Missing values (e.g. a metric of a zero
update) are ``null``::

    schema, base (path), checkpoints [{step, path}], steps [int]
    settings {rank, exact_svd (true|false|null=auto), exact_max_dim, oversample, niter, fracs,
              alphas, lock_threshold, types (selected module types), scale_steps, window,
              window_stride, device}
    groups {types (present), layers, selected_types, selected (names of analysed 2-D weights)}
    modules {name: {layer, type, shape, dtype, w0_norm, spectral (bool),
                    svd_method ("exact"|"randomized"), svd_q (singular values kept)}}  # last two if spectral
    magnitude                                                      # §1
      total_norm [ckpt]        sqrt(Σ ‖ΔW‖_F²) over every tensor
      selected_norm [ckpt]     the same over the selected 2-D weights
      per_module {name: {norm [ckpt], rel [ckpt] (‖ΔW‖_F/‖W_0‖_F), share [ckpt] (‖ΔW‖_F²/total²)}}
      by_type {type: {norm, rel, share}}   by_layer {"<layer>": {norm, rel, share}}
      heatmap {layers [L], types [K], norm/rel/share [ckpt][L][K]}   (null: layer lacks type)
    spectrum                                                       # §4
      per_module {name: {effective_rank [ckpt], effective_rank_frac [ckpt] (÷ min(m,n)),
                         stable_rank [ckpt], energy_top {"<frac>": [ckpt]},
                         captured_energy [ckpt] (share of ‖ΔW‖_F² in the computed spectrum)}}
      summary {effective_rank, effective_rank_frac, stable_rank [ckpt], energy_top {"<frac>": [ckpt]}}
    alignment {reference_step, rank, threshold,                    # §6
               per_module {name: {overlap [ckpt], u1_cos [ckpt], lock_in_step (int|null)}},
               summary {mean_overlap [ckpt], mean_u1_cos [ckpt], locked_share [ckpt]
                        (share of modules locked in by that step), median_lock_in_step}}
    trajectory {name: {variance_explained [≤3]}}                   # §8
    embedding_shift {name: {mean, min, q01, q05, q25, median, rows_skipped [ckpt], rows}}  # §9
    eval: {ran: false, reason}  or                                 # §2, 3, 5, 7
      {ran: true,
       settings {data, n, limit, prompt_template, prompt_field, answer_field, max_new_tokens,
                 batch_size, device, dtype, greedy}      (only when eval_fn has them: make_eval_fn's)
       base {accuracy, ...}, checkpoints [ckpt] {accuracy, ...},   (metrics = eval_fn's scalars)
       efficiency [{step, total_norm, selected_norm, accuracy}],
       contribution {types {type: {apply: metrics, remove: metrics}},
                     windows [{layers [int], apply: metrics, remove: metrics}]},
       reconstruction [{frac, top: metrics, bottom: metrics}],
       scaling [{step, alpha, metrics, recovery}]}

``OUT/tensors.safetensors`` (float32; module names as in the JSON)::

    singular_values/<name>   (n_ckpt, svd_q)   singular values of ΔW, descending
    u1/<name>                (n_ckpt, m)       top left singular vector, sign-aligned to the final one
    trajectory_pca/<name>    (n_ckpt, ≤3)      PCA coordinates of the u1 trajectory
    embedding_cos/<name>     (n_ckpt, rows)    per-row cos(W_0, W_t); NaN for zero rows
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save

from effopd.analysis import evals, spectral
from effopd.analysis.dynamics import compute_dynamics
from effopd.analysis.io import AnalysisError, CheckpointReader
from effopd.module_groups import DEFAULT_TYPES, TYPES
from effopd.report.load import ANALYSIS_JSON as JSON_FILE
from effopd.report.load import ANALYSIS_TENSORS as TENSORS_FILE
from effopd.report.load import SCHEMA
from effopd.utils import atomic_write_bytes, write_json

DEFAULT_ALPHAS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0)
DEFAULT_FRACS = (0.01, 0.05, 0.1)


def analyze(
    base: str | Path,
    checkpoints: Sequence[tuple[int, str | Path]],
    out_dir: str | Path,
    *,
    rank: int = 8,
    exact_svd: bool | None = None,
    eval_fn: evals.EvalFn | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    fracs: Sequence[float] = DEFAULT_FRACS,
    scale_checkpoints: int = 2,
    window: int | None = None,
    window_stride: int | None = None,
    types: Iterable[str] = DEFAULT_TYPES,
    lock_threshold: float = 0.9,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Analyse the checkpoints of one run against its base and write ``out_dir/analysis.json``
    and ``out_dir/tensors.safetensors``; returns the JSON record.

    Args:
        base: model directory of θ_0 (the student init).
        checkpoints: ``[(step, model_dir)]``; sorted by step, the last is the final model.
        out_dir: output directory; an existing ``analysis.json`` is replaced only with ``overwrite``.
        rank: r of the top-r subspaces compared in the alignment analysis.
        exact_svd: True = exact SVD everywhere, False = randomized everywhere, None = exact for
            small matrices only (``spectral.EXACT_MAX_DIM``).
        eval_fn: ``model_dir -> {"accuracy": ..., ...}``; without it analyses 2, 3, 5, 7 are skipped
            (and recorded as skipped).
        alphas: weight-scaling factors α for the early checkpoints (0 = base, 1 = checkpoint).
        fracs: fractions k% of singular values for energy shares and reconstructions.
        scale_checkpoints: how many of the earliest checkpoints the weight scaling uses.
        window, window_stride: layer-window width and stride for the functional contribution
            (default: a quarter of the layers, non-overlapping).
        types: module types analysed spectrally and reconstructed (default attention + MLP).
        lock_threshold: subspace overlap at which a module counts as locked in.
        device: where the SVDs run ("cpu", "cuda").
    """
    out_dir = Path(out_dir)
    if (out_dir / JSON_FILE).exists() and not overwrite:
        raise AnalysisError(f"{out_dir / JSON_FILE} already exists; choose another output directory or pass --overwrite")
    ckpts = sorted((int(s), Path(p)) for s, p in checkpoints)
    types = sorted(set(types))
    _validate(ckpts, rank, fracs, alphas, types, scale_checkpoints)
    base_r = CheckpointReader(base)
    readers = [CheckpointReader(p) for _, p in ckpts]
    steps = [s for s, _ in ckpts]

    results, tensors = compute_dynamics(base_r, readers, steps, rank=rank, exact=exact_svd, fracs=tuple(fracs),
                                        types=types, lock_threshold=lock_threshold, device=device, progress=progress)
    layers = results["groups"]["layers"]
    window = window or evals.default_window(max(1, len(layers)))
    window_stride = window_stride or window
    early = ckpts[:min(scale_checkpoints, max(1, len(ckpts) - 1))]  # never the final one, unless alone
    record = {
        "schema": SCHEMA,
        "base": str(base),
        "checkpoints": [{"step": s, "path": str(p)} for s, p in ckpts],
        "steps": steps,
        "settings": {"rank": rank, "exact_svd": exact_svd, "exact_max_dim": spectral.EXACT_MAX_DIM,
                     "oversample": spectral.OVERSAMPLE, "niter": spectral.NITER, "fracs": list(fracs),
                     "alphas": list(alphas), "lock_threshold": lock_threshold, "types": types,
                     "scale_steps": [s for s, _ in early], "window": window, "window_stride": window_stride,
                     "device": str(device)},
        **results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if eval_fn is None:
        record["eval"] = {"ran": False, "reason": "no eval_fn given (evaluation switched off)"}
    else:
        present = [t for t in types if t in results["groups"]["types"]]
        windows = evals.layer_windows(layers, window, window_stride) if layers else []
        record["eval"] = _run_evals(eval_fn, Path(base), ckpts, early, results["magnitude"], present, windows,
                                    alphas, fracs, exact_svd, out_dir, progress)
        settings = getattr(eval_fn, "settings", None)  # make_eval_fn's: prompt set, template, lengths, device
        if isinstance(settings, dict):
            record["eval"]["settings"] = dict(settings)
    record = _jsonable(record)
    try:
        _save_tensors(tensors, out_dir / TENSORS_FILE)
        write_json(out_dir / JSON_FILE, record)  # written last: its presence means the analysis finished
    except OSError:
        (out_dir / TENSORS_FILE).unlink(missing_ok=True)  # no half of an analysis left behind
        raise
    return record


def _validate(ckpts, rank, fracs, alphas, types, scale_checkpoints) -> None:
    if not ckpts:
        raise AnalysisError("no checkpoints to analyse")
    steps = [s for s, _ in ckpts]
    if len(set(steps)) != len(steps):
        raise AnalysisError(f"checkpoint steps must be distinct, got {steps}")
    if rank < 1:
        raise AnalysisError(f"rank must be at least 1, got {rank}")
    if not fracs or any(not 0 < f <= 1 for f in fracs):
        raise AnalysisError(f"fracs must be fractions in (0, 1], got {list(fracs)}")
    if any(not math.isfinite(a) for a in alphas):
        raise AnalysisError(f"alphas must be finite numbers, got {list(alphas)}")
    bad = set(types) - set(TYPES)
    if bad:
        raise AnalysisError(f"unknown module type(s) {sorted(bad)}; known types: {list(TYPES)}")
    if scale_checkpoints < 1:
        raise AnalysisError(f"scale_checkpoints must be at least 1, got {scale_checkpoints}")


def _run_evals(eval_fn, base, ckpts, early, magnitude, types, windows, alphas, fracs, exact, out_dir, progress) -> dict:
    final = ckpts[-1][1]
    total = evals.n_evaluations(len(ckpts), len(types), len(windows), len(fracs), len(early), alphas)
    ev = evals.Evaluator(eval_fn, final, out_dir, total, progress)
    try:
        eff = evals.efficiency(ev, base, ckpts, magnitude)
        ck_m = {s: m for (s, _), m in zip(ckpts, eff["checkpoints"])}
        return {
            "ran": True,
            "base": eff["base"],
            "checkpoints": eff["checkpoints"],
            "efficiency": eff["points"],
            "contribution": evals.contribution(ev, base, final, types, windows),
            "reconstruction": evals.reconstruction(ev, base, final, fracs, types, exact),
            "scaling": evals.scaling(ev, base, early, alphas, eff["base"], ck_m, ck_m[ckpts[-1][0]]["accuracy"]),
        }
    finally:
        ev.close()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write_bytes(path, save({k: v.float().contiguous() for k, v in tensors.items()}))


def _jsonable(x):
    """Plain JSON: tuples to lists, NaN/inf to null."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
