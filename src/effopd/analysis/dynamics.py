"""Evaluation-free parameter-dynamics analyses (DESIGN.md §1, 4, 6, 8, 9), streamed tensor by tensor.

For each tensor name the base tensor W_0 is loaded once, then each checkpoint's W_t in turn, so
memory holds two matrices (W_0 and ΔW, plus SVD workspace) and, per analysed matrix, its top-r
singular vectors at each checkpoint — never two models. Tensors that are not decomposed (the
embedding, lm_head, norms, biases) are read in blocks of rows (:data:`BLOCK` elements): a
151,936 × 896 embedding is 545 MB in float32, so a few whole copies of it would be most of the
analysis' peak memory. Per tensor and checkpoint, with ΔW = W_t − W_0:

1. magnitude: ‖ΔW‖_F, ‖ΔW‖_F/‖W_0‖_F, and share = ‖ΔW‖_F²/Σ‖ΔW‖_F² over all tensors (squared
   norms add up, so shares sum to 1); aggregated per module type, per layer, and as a
   layer × type heatmap (a cell pools the weight and bias of its group).
4. spectrum (2-D weights of the selected types): see :mod:`.spectral`.
6. alignment with the final checkpoint T: top-r subspace overlap and |cos(u₁(t), u₁(T))|. The
   *lock-in step* of a module is the first checkpoint step s such that the overlap is ≥ the
   threshold (0.9) at s and at every later checkpoint; the final checkpoint overlaps itself
   fully, so a module that only aligns at T has lock-in step T ("never earlier").
8. trajectory: u₁(t) sign-aligned to u₁(T); PCA of the points u₁(t₁), …, u₁(T) (exact SVD of the
   centred n × m matrix, n = number of checkpoints); variance explained per component.
9. embedding shift (2-D ``embed``/``lm_head`` tensors): cosine similarity of each row (one
   token's, or one position's, vector) between W_0 and W_t, summarised by mean, min and
   quantiles; rows that are zero on either side are left out and counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from effopd.analysis import spectral
from effopd.analysis.io import AnalysisError, CheckpointReader, common_names
from effopd.module_groups import DEFAULT_TYPES, TYPES, Group, UnknownParameterError, groups, select
from effopd.utils import median

QUANTILES = {"q01": 0.01, "q05": 0.05, "q25": 0.25, "median": 0.5}
#: Elements per block of rows for streamed tensors and row cosines (4 MB in float32: small
#: next to the matrices that are decomposed whole, large enough that reads stay sequential).
BLOCK = 2**20


def check_checkpoints(base: CheckpointReader, ckpts: Sequence[CheckpointReader]) -> tuple[list[str], dict[str, Group]]:
    """Names common to the base and every checkpoint (all must match), and their groups."""
    names = list(base.names)
    for ck in ckpts:
        shared = set(common_names(base, ck))
        names = [n for n in names if n in shared]
    try:
        return names, groups(names)
    except UnknownParameterError as e:
        raise AnalysisError(f"checkpoint {base.path}: {e}") from None


def row_blocks(shape: Sequence[int], block: int | None = None) -> list[slice | None]:
    """Slices of consecutive rows holding about ``block`` (default :data:`BLOCK`) elements each,
    at least one row; ``[None]`` (the whole tensor) for a 0-d one."""
    if not shape:
        return [None]
    step = max(1, (block or BLOCK) // max(1, math.prod(shape[1:])))
    return [slice(i, i + step) for i in range(0, max(shape[0], 1), step)]


def update_norms(base: CheckpointReader, ckpt: CheckpointReader) -> dict[str, float]:
    """‖W_t − W_0‖_F (float64) for every shared tensor, streamed a block of rows at a time."""
    out = {}
    for n in common_names(base, ckpt):
        blocks = row_blocks(base.shape(n))
        out[n] = math.sqrt(sum(float((ckpt.get(n, r).double() - base.get(n, r).double()).norm()) ** 2 for r in blocks))
    return out


def lock_in_step(steps: Sequence[int], overlaps: Sequence[float | None], threshold: float = 0.9) -> int | None:
    """First step from which the overlap stays ≥ ``threshold`` to the end (None if it ends below)."""
    first = None
    for i in range(len(steps) - 1, -1, -1):
        if overlaps[i] is None or overlaps[i] < threshold:
            break
        first = steps[i]
    return first


def trajectory_pca(X: torch.Tensor, n_components: int = 3) -> tuple[torch.Tensor, list[float]]:
    """PCA of the rows of X (points over time): coordinates (n, c) and variance explained."""
    Xc = X.double() - X.double().mean(0, keepdim=True)
    U, S, _ = torch.linalg.svd(Xc, full_matrices=False)
    c = min(n_components, len(S))
    total = float((S**2).sum())
    var = [float(s**2) / total if total > 0 else 0.0 for s in S[:c]]
    return (U[:, :c] * S[:c]).float(), var


def row_cosines(W0: torch.Tensor, Wt: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Per-row cos(W_0[i], W_t[i]); NaN for rows that are zero on either side. Computed for
    ``block`` elements' worth of rows at a time, so the product W_0 ⊙ W_t is never full-size;
    each row's value does not depend on the blocking."""
    out = []
    for rows in row_blocks(W0.shape, block):
        a, b = W0[rows], Wt[rows]
        den = a.norm(dim=1) * b.norm(dim=1)
        cos = (a * b).sum(1) / den
        out.append(torch.where(den > 0, cos, torch.full_like(cos, float("nan"))))
    return torch.cat(out)


def cos_summary(cos: torch.Tensor) -> dict[str, float | int | None]:
    """Mean, min and quantiles of the defined (non-NaN) row cosines, and how many were undefined."""
    ok = cos[~cos.isnan()].double()
    skipped = int(cos.numel() - ok.numel())
    if ok.numel() == 0:
        return {"mean": None, "min": None, **{k: None for k in QUANTILES}, "rows_skipped": skipped}
    q = torch.quantile(ok, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {"mean": float(ok.mean()), "min": float(ok.min()), **{k: float(v) for k, v in zip(QUANTILES, q)},
            "rows_skipped": skipped}


def _pool(items: list[tuple[list[float], float]], total_sq: list[float]) -> dict:
    """Pool tensors [(per-checkpoint ‖ΔW‖_F, ‖W_0‖_F)] into one group's norm, rel and share."""
    w0 = math.sqrt(sum(w**2 for _, w in items))
    norm = [math.sqrt(sum(n[i] ** 2 for n, _ in items)) for i in range(len(total_sq))]
    return {
        "norm": norm,
        "rel": [x / w0 if w0 > 0 else None for x in norm],
        "share": [x**2 / t if t > 0 else None for x, t in zip(norm, total_sq)],
    }


def magnitude_tables(per_module: dict[str, dict], grp: dict[str, Group], w0_norms: dict[str, float], n: int) -> dict:
    """Totals, per-type and per-layer pools, and the layer × type heatmap of analysis 1."""
    total_sq = [sum(m["norm"][i] ** 2 for m in per_module.values()) for i in range(n)]
    items = {name: (m["norm"], w0_norms[name]) for name, m in per_module.items()}
    types = [t for t in TYPES if any(g.type == t for g in grp.values())]
    by_type = {t: _pool([items[k] for k in items if grp[k].type == t], total_sq) for t in types}
    layers = sorted({g.layer for g in grp.values() if g.layer is not None})
    by_layer = {str(l): _pool([items[k] for k in items if grp[k].layer == l], total_sq) for l in layers}
    heat_types = [t for t in types if any(g.type == t and g.layer is not None for g in grp.values())]
    cells = {(l, t): _pool(members, total_sq) for l in layers for t in heat_types
             if (members := [items[k] for k in items if grp[k] == (l, t)])}

    def table(key: str) -> list:  # [checkpoint][layer][type], None where a layer lacks the type
        return [[[cells[(l, t)][key][i] if (l, t) in cells else None for t in heat_types] for l in layers] for i in range(n)]

    return {
        "total_norm": [math.sqrt(x) for x in total_sq],
        "by_type": by_type,
        "by_layer": by_layer,
        "heatmap": {"layers": layers, "types": heat_types, **{k: table(k) for k in ("norm", "rel", "share")}},
    }


def _transpose(rows: list[dict]) -> dict:
    """[{k: v}] per checkpoint -> {k: [v, ...]} (one level of nested dicts too)."""
    out = {}
    for k, v in rows[0].items():
        out[k] = {kk: [r[k][kk] for r in rows] for kk in v} if isinstance(v, dict) else [r[k] for r in rows]
    return out


def compute_dynamics(
    base: CheckpointReader,
    ckpts: Sequence[CheckpointReader],
    steps: Sequence[int],
    *,
    rank: int = 8,
    exact: bool | None = None,
    fracs: Sequence[float] = (0.01, 0.05, 0.1),
    types=DEFAULT_TYPES,
    lock_threshold: float = 0.9,
    oversample: int = spectral.OVERSAMPLE,
    niter: int = spectral.NITER,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Analyses 1, 4, 6, 8, 9 over checkpoints ``ckpts`` (labelled ``steps``, last = final).

    Returns the JSON-ready results (see :mod:`effopd.analysis.run` for the schema) and the
    arrays for ``tensors.safetensors``."""
    if len(ckpts) != len(steps) or not ckpts:
        raise AnalysisError(f"need at least one checkpoint and one step per checkpoint (got {len(ckpts)} and {len(steps)})")
    names, grp = check_checkpoints(base, ckpts)
    spectral_names = {n for n in select(names, types) if len(base.shape(n)) == 2}
    token_names = {n for n in names if grp[n].type in ("embed", "lm_head") and len(base.shape(n)) == 2}
    n_ck = len(ckpts)
    modules, per_module, w0_norms = {}, {}, {}
    spectrum, alignment, trajectory, shift = {}, {}, {}, {}
    tensors: dict[str, torch.Tensor] = {}

    for name in tqdm(names, desc="analysing tensors", unit="tensor", disable=not progress):
        shape = list(base.shape(name))
        min_dim = min(shape) if len(shape) == 2 else None
        q = max(rank, spectral.n_components(max(fracs), min_dim)) if name in spectral_names else 0
        w0_sq, fro_sq, Us, Ss, methods = 0.0, [0.0] * n_ck, [], [], set()
        # preallocated and filled in place: small tensors kept from block to block would fragment the
        # memory freed by each block, so that the next block could not reuse it and the heap would grow
        cos = torch.empty(n_ck, shape[0]) if name in token_names else None
        # The SVD needs the whole ΔW; every other tensor is read a block of rows at a time. Squared
        # norms of the blocks add up (and one block gives back exactly the whole tensor's norm).
        for block in [None] if name in spectral_names else row_blocks(shape):
            w0 = base.get(name, block).to(device, torch.float32)
            w0_sq += float(w0.norm()) ** 2
            for i, ck in enumerate(ckpts):
                wt = ck.get(name, block).to(device, torch.float32)  # a fresh tensor: ours to overwrite
                if name in token_names:
                    cos[i, block or slice(None)] = row_cosines(w0, wt)
                d = wt.sub_(w0)  # ΔW in place of W_t: one matrix per checkpoint, not two
                fro = float(d.norm())
                if not math.isfinite(fro):
                    bad = "the base" if not torch.isfinite(w0).all() else f"checkpoint {ck.path}"
                    raise AnalysisError(f"tensor {name!r} of {bad} holds NaN or inf values, so its update cannot be "
                                        "analysed; the run diverged there: analyse the checkpoints before it")
                fro_sq[i] += fro**2
                if name in spectral_names:
                    dec = spectral.svd(d, q, exact=exact, oversample=oversample, niter=niter)
                    methods.add(dec.method)
                    Ss.append(dec.S.cpu())
                    metrics = spectral.spectrum_metrics(dec.S, fro**2, min_dim, tuple(fracs), dec.full)
                    spectrum.setdefault(name, []).append(metrics)
                    U, _ = spectral.sign_align(dec.U[:, :rank], dec.V[:, :rank])
                    Us.append(U.cpu() if fro > 0 else None)
                    del dec
                del wt, d
            del w0
        w0_norms[name], norms = math.sqrt(w0_sq), [math.sqrt(x) for x in fro_sq]
        modules[name] = {"layer": grp[name].layer, "type": grp[name].type, "shape": shape, "dtype": base.dtype(name),
                         "w0_norm": w0_norms[name], "spectral": name in spectral_names}
        per_module[name] = {"norm": norms, "rel": [x / w0_norms[name] if w0_norms[name] > 0 else None for x in norms]}
        if name in token_names:
            shift[name] = {**_transpose([cos_summary(c) for c in cos]), "rows": shape[0]}
            tensors[f"embedding_cos/{name}"] = cos
        if name in spectral_names:
            modules[name].update(svd_method=methods.pop() if len(methods) == 1 else sorted(methods), svd_q=len(Ss[0]))
            spectrum[name] = _transpose(spectrum[name])
            tensors[f"singular_values/{name}"] = torch.stack(Ss)
            alignment[name], traj = align_to_final(Us, steps, min(rank, min_dim), lock_threshold)
            if traj is not None:
                tensors[f"u1/{name}"], tensors[f"trajectory_pca/{name}"], trajectory[name] = traj

    total_sq = [sum(per_module[n]["norm"][i] ** 2 for n in names) for i in range(n_ck)]
    for m in per_module.values():
        m["share"] = [x**2 / t if t > 0 else None for x, t in zip(m["norm"], total_sq)]
    magnitude = {**magnitude_tables(per_module, grp, w0_norms, n_ck), "per_module": per_module}
    selected = [n for n in names if n in spectral_names]  # in name order: a set's order varies between runs
    magnitude["selected_norm"] = [math.sqrt(sum(per_module[n]["norm"][i] ** 2 for n in selected)) for i in range(n_ck)]
    return {
        "modules": modules,
        "groups": {"types": [t for t in TYPES if any(g.type == t for g in grp.values())],
                   "layers": sorted({g.layer for g in grp.values() if g.layer is not None}),
                   "selected_types": sorted(set(types)), "selected": selected},
        "magnitude": magnitude,
        "spectrum": {"per_module": spectrum, "summary": _spectrum_summary(spectrum, n_ck)},
        "alignment": {"reference_step": steps[-1], "rank": rank, "threshold": lock_threshold,
                      "per_module": alignment, "summary": _alignment_summary(alignment, steps)},
        "trajectory": trajectory,
        "embedding_shift": shift,
    }, tensors


def align_to_final(Us: list[torch.Tensor | None], steps: Sequence[int], r: int, threshold: float):
    """Analyses 6 and 8 for one module from its top-r left singular vectors at each checkpoint
    (None where the update is zero; the last entry is the final checkpoint).

    Returns the alignment entry {overlap, u1_cos, lock_in_step} and, when the final update is
    non-zero, (u₁ trajectory (n, m), PCA coordinates (n, c), {variance_explained})."""
    ref = Us[-1]
    overlap = [spectral.subspace_overlap(U, ref, r) if U is not None and ref is not None else None for U in Us]
    u1cos = [spectral.abs_cosine(U[:, 0], ref[:, 0]) if U is not None and ref is not None else None for U in Us]
    entry = {"overlap": overlap, "u1_cos": u1cos, "lock_in_step": lock_in_step(steps, overlap, threshold)}
    if ref is None:
        return entry, None
    u1 = torch.stack([_aligned_u1(U, ref) for U in Us])
    ok = ~u1.isnan().any(1)  # checkpoints with a zero update have no u₁
    pts, var = trajectory_pca(u1[ok])
    coords = torch.full((len(Us), pts.shape[1]), float("nan"))
    coords[ok] = pts
    return entry, (u1, coords, {"variance_explained": var})


def _aligned_u1(U: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    """u₁ of one checkpoint with the sign that agrees with the final u₁ (NaN for a zero update)."""
    if U is None:
        return torch.full_like(ref[:, 0], float("nan"))
    u = U[:, 0]
    return -u if float(u @ ref[:, 0]) < 0 else u


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _spectrum_summary(spectrum: dict, n: int) -> dict:
    """Per checkpoint, the mean over analysed modules of each scalar spectrum metric."""
    keys = ("effective_rank", "effective_rank_frac", "stable_rank")
    out = {k: [_mean([m[k][i] for m in spectrum.values()]) for i in range(n)] for k in keys}
    if spectrum:
        fr = next(iter(spectrum.values()))["energy_top"]
        out["energy_top"] = {f: [_mean([m["energy_top"][f][i] for m in spectrum.values()]) for i in range(n)] for f in fr}
    return out


def _alignment_summary(alignment: dict, steps: Sequence[int]) -> dict:
    """Mean overlap / u₁ cosine per checkpoint, and the share of modules locked in by each step."""
    n = len(steps)
    locks = [a["lock_in_step"] for a in alignment.values()]
    return {
        "mean_overlap": [_mean([a["overlap"][i] for a in alignment.values()]) for i in range(n)],
        "mean_u1_cos": [_mean([a["u1_cos"][i] for a in alignment.values()]) for i in range(n)],
        "locked_share": [sum(1 for s in locks if s is not None and s <= step) / len(locks) if locks else None
                         for step in steps],
        "median_lock_in_step": median(locks),
    }
