"""Singular value decompositions of weight updates and the spectral metrics of DESIGN.md §4–6.

One :func:`svd` call per update matrix ΔW gives everything downstream: exact
(``torch.linalg.svd``) when the matrix is small or when asked, otherwise randomized top-q
(``torch.svd_lowrank`` with oversampling and power iterations). The result records which method
ran and whether ``S`` holds the full spectrum.

Metrics (σ sorted descending, p = σ/Σσ):

- effective rank ``exp(H(p))``, H the Shannon entropy (Roy & Vetterli 2007); k equal singular
  values give k. From a top-q spectrum it is the effective rank of the rank-q approximation.
- stable rank ``‖ΔW‖_F² / σ₁²``.
- energy share of the top-k% singular values ``Σ_{i≤k} σ_i² / ‖ΔW‖_F²``, k = ⌈frac·min(m,n)⌉.
- norm-matched rank-k reconstruction ``(‖ΔW‖_F/‖ΔW_k‖_F)·U_k S_k V_kᵀ`` of the top or bottom k.
- subspace overlap ``‖U_aᵀ U_b‖_F² / r`` (1 for identical r-dim subspaces, 0 for orthogonal
  ones) and ``|cos(u₁, u₁')|``.

Singular vectors are defined up to sign; :func:`sign_align` fixes it (largest-magnitude entry
of each u positive, or a non-negative dot product with a reference) before cosines and
trajectories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from effopd.utils import isolated_rng

#: ``exact=None`` uses exact SVD when min(m, n) is at most this, or when the randomized
#: sketch would cover at least half of min(m, n) anyway.
EXACT_MAX_DIM = 512
#: Randomized SVD: extra sketch columns beyond q, and power iterations.
OVERSAMPLE = 10
NITER = 2


@dataclass
class SVD:
    """``M ≈ U diag(S) Vᵀ`` with U (m, q), S (q,), V (n, q); ``full`` when S is the whole spectrum."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    method: str  # "exact" | "randomized"
    full: bool


def n_components(frac: float, min_dim: int) -> int:
    """k = ⌈frac·min(m,n)⌉, at least 1: the number of singular values in the top/bottom frac."""
    if not 0 < frac <= 1:
        raise ValueError(f"fraction of singular values must be in (0, 1], got {frac}")
    return max(1, math.ceil(frac * min_dim - 1e-9))


def svd(M: torch.Tensor, q: int, *, exact: bool | None = None, oversample: int = OVERSAMPLE, niter: int = NITER,
        seed: int = 0) -> SVD:
    """Top-``q`` singular triplets of ``M`` (all of them when exact).

    ``exact=True`` always uses ``torch.linalg.svd``; ``False`` always the randomized sketch of
    ``q + oversample`` columns with ``niter`` power iterations (seeded, so repeatable); ``None``
    chooses exact for small matrices (see :data:`EXACT_MAX_DIM`)."""
    M = M.float()
    k = min(M.shape)
    q = max(1, min(q, k))
    if exact is None:
        exact = k <= EXACT_MAX_DIM or q + oversample >= k // 2
    if exact:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return SVD(U, S, Vh.mT, "exact", True)
    with isolated_rng(seed):
        U, S, V = torch.svd_lowrank(M, q=min(q + oversample, k), niter=niter)
    return SVD(U[:, :q], S[:q], V[:, :q], "randomized", q == k)


def sign_align(U: torch.Tensor, V: torch.Tensor, ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip the sign of matching columns of U and V (so U S Vᵀ is unchanged).

    Without ``ref`` each column of U gets its largest-magnitude entry positive; with ``ref``
    (same shape as U, or its first columns) each column gets a non-negative dot product with
    the matching column of ``ref``."""
    c = U.shape[1] if ref is None else min(U.shape[1], ref.shape[1])
    if ref is None:
        idx = U.abs().argmax(dim=0)
        signs = torch.sign(U[idx, torch.arange(c)])
    else:
        signs = torch.sign((U[:, :c] * ref[:, :c]).sum(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    U, V = U.clone(), V.clone()
    U[:, :c] *= signs
    V[:, :c] *= signs
    return U, V


def effective_rank(S: torch.Tensor) -> float:
    """exp(H(p)) with p = σ/Σσ; 0 for an all-zero spectrum."""
    S = S.double().clamp_min(0)
    total = S.sum()
    if total <= 0:
        return 0.0
    p = S[S > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(S: torch.Tensor, fro_sq: float) -> float:
    """‖ΔW‖_F² / σ₁²; 0 for a zero matrix. ``S`` needs only its first (largest) value."""
    s1 = float(S[0]) if len(S) else 0.0
    return fro_sq / s1**2 if s1 > 0 else 0.0


def energy_share(S: torch.Tensor, frac: float, fro_sq: float, min_dim: int) -> float | None:
    """Share of ‖ΔW‖_F² in the top ⌈frac·min(m,n)⌉ singular values; None if S is too short."""
    k = n_components(frac, min_dim)
    if k > len(S) or fro_sq <= 0:
        return None
    return float((S[:k].double() ** 2).sum()) / fro_sq


def reconstruct(d: SVD, k: int, target_norm: float, top: bool = True) -> torch.Tensor:
    """Norm-matched rank-k part of the decomposed matrix: ``(target/‖M_k‖_F)·U_k S_k V_kᵀ``.

    ``top`` keeps the k largest singular values, otherwise the k smallest (which needs the full
    spectrum). ‖M_k‖_F = ‖S_k‖₂, so the result has Frobenius norm ``target_norm`` unless M_k = 0,
    in which case it is zero."""
    if not top and not d.full:
        raise ValueError("bottom-k reconstruction needs the full spectrum: compute the SVD with exact=True")
    sl = slice(0, k) if top else slice(len(d.S) - k, len(d.S))
    U, S, V = d.U[:, sl], d.S[sl], d.V[:, sl]
    norm_k = float(S.double().norm())
    scale = target_norm / norm_k if norm_k > 0 else 0.0
    return (U * (S * scale)) @ V.mT


def subspace_overlap(Ua: torch.Tensor, Ub: torch.Tensor, r: int | None = None) -> float:
    """‖U_a,rᵀ U_b,r‖_F² / r for orthonormal columns: 1 if the spans agree, 0 if orthogonal."""
    r = min(Ua.shape[1], Ub.shape[1]) if r is None else r
    overlap = float((Ua[:, :r].double().mT @ Ub[:, :r].double()).square().sum()) / r
    return min(overlap, 1.0)  # float32 vectors are orthonormal only to ~1e-7


def abs_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """|cos(a, b)|, insensitive to the sign ambiguity of singular vectors."""
    a, b = a.double().flatten(), b.double().flatten()
    den = float(a.norm() * b.norm())
    return abs(float(a @ b)) / den if den > 0 else 0.0


def spectrum_metrics(S: torch.Tensor, fro_sq: float, min_dim: int, fracs: tuple[float, ...], full: bool) -> dict:
    """The §4 metrics of one update from its singular values (top-q or full) and ‖ΔW‖_F²
    (all None for a zero update, which has no spectrum to speak of)."""
    if fro_sq <= 0:
        return {"effective_rank": None, "effective_rank_frac": None, "stable_rank": None,
                "energy_top": {str(f): None for f in fracs}, "captured_energy": None}
    er = effective_rank(S)
    return {
        "effective_rank": er,
        "effective_rank_frac": er / min_dim,
        "stable_rank": stable_rank(S, fro_sq),
        "energy_top": {str(f): energy_share(S, f, fro_sq, min_dim) for f in fracs},
        # share of ‖ΔW‖_F² inside the computed spectrum (1 when full; the tail otherwise)
        "captured_energy": 1.0 if full else float((S.double() ** 2).sum()) / fro_sq,
    }
