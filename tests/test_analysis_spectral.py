"""Spectral metrics against hand-worked values and brute-force references on small matrices."""

import math

import pytest
import torch

from effopd.analysis import spectral


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny matrices: extra threads only add synchronisation overhead


def matrix_with_spectrum(S, m, n, seed=0):
    """An m x n matrix with singular values S (random orthonormal singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(S), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(S), generator=g, dtype=torch.float64))
    return (U * torch.tensor(S, dtype=torch.float64)) @ V.T


def test_effective_rank_of_known_spectra():
    # k equal singular values: p is uniform over k, H = log k, exp(H) = k
    for k in (1, 3, 7):
        assert spectral.effective_rank(torch.tensor([2.0] * k + [0.0] * 3)) == pytest.approx(k)
    assert spectral.effective_rank(torch.zeros(4)) == 0.0
    S = torch.tensor([5.0, 3.0, 1.0, 0.5])
    p = [s / 9.5 for s in (5.0, 3.0, 1.0, 0.5)]
    assert spectral.effective_rank(S) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    # from the SVD of an actual matrix of rank 3 with equal singular values
    d = spectral.svd(matrix_with_spectrum([1.0, 1.0, 1.0], 12, 9).float(), 9, exact=True)
    assert spectral.effective_rank(d.S) == pytest.approx(3.0, rel=1e-4)


def test_stable_rank_and_energy_share_by_hand():
    S = torch.tensor([4.0, 3.0, 0.0, 0.0])  # ||M||_F^2 = 16 + 9 = 25
    assert spectral.stable_rank(S, 25.0) == pytest.approx(25 / 16)
    assert spectral.stable_rank(torch.zeros(3), 0.0) == 0.0
    # min(m, n) = 4: top 25% is one value (16/25), top 50% two values (25/25)
    assert spectral.energy_share(S, 0.25, 25.0, 4) == pytest.approx(0.64)
    assert spectral.energy_share(S, 0.5, 25.0, 4) == pytest.approx(1.0)
    assert spectral.energy_share(S[:1], 0.5, 25.0, 4) is None  # needs two values, has one
    assert spectral.n_components(0.01, 16) == 1 and spectral.n_components(0.25, 16) == 4
    assert spectral.n_components(0.1, 30) == 3  # 0.1 * 30 is exactly 3, not ceil(3.0000000004)


def test_subspace_overlap_and_cosine():
    Q, _ = torch.linalg.qr(torch.randn(10, 6, dtype=torch.float64))
    A, B = Q[:, :3], Q[:, 3:]
    R, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    assert spectral.subspace_overlap(A, A) == pytest.approx(1.0)
    assert spectral.subspace_overlap(A, A @ R) == pytest.approx(1.0)  # another basis of the same span
    assert spectral.subspace_overlap(A, B) == pytest.approx(0.0, abs=1e-12)
    # share one of two directions: ||U_a^T U_b||_F^2 = 1, divided by r = 2
    assert spectral.subspace_overlap(Q[:, [0, 1]], Q[:, [0, 2]]) == pytest.approx(0.5)
    u = torch.randn(10)
    assert spectral.abs_cosine(u, -2 * u) == pytest.approx(1.0)
    assert spectral.abs_cosine(A[:, 0], B[:, 0]) == pytest.approx(0.0, abs=1e-7)


def test_randomized_matches_exact_on_low_rank_plus_noise():
    g = torch.Generator().manual_seed(1)
    M = matrix_with_spectrum([10, 8, 6, 5, 4, 3, 2.5, 2], 200, 120).float()
    M += 0.01 * torch.randn(200, 120, generator=g)
    exact = spectral.svd(M, 8, exact=True)
    rand = spectral.svd(M, 8, exact=False)
    assert (exact.method, rand.method) == ("exact", "randomized")
    assert exact.full and not rand.full and len(rand.S) == 8
    torch.testing.assert_close(rand.S, exact.S[:8], rtol=1e-3, atol=0)
    assert spectral.subspace_overlap(rand.U, exact.U[:, :8]) > 0.999
    # repeatable: the sketch is seeded
    torch.testing.assert_close(spectral.svd(M, 8, exact=False).S, rand.S, rtol=0, atol=0)


def test_auto_choice_by_size(monkeypatch):
    monkeypatch.setattr(spectral, "EXACT_MAX_DIM", 16)
    assert spectral.svd(torch.randn(20, 12), 2).method == "exact"  # small
    assert spectral.svd(torch.randn(80, 60), 2).method == "randomized"  # large, small q
    assert spectral.svd(torch.randn(80, 60), 30).method == "exact"  # q + oversample >= half of 60


def test_sign_alignment():
    M = torch.randn(9, 7)
    d = spectral.svd(M, 7, exact=True)
    U, V = spectral.sign_align(-d.U, -d.V)
    idx = U.abs().argmax(0)
    assert (U[idx, torch.arange(7)] > 0).all()
    torch.testing.assert_close((U * d.S) @ V.T, M, atol=1e-5, rtol=1e-5)  # still a decomposition of M
    ref = d.U * torch.tensor([1.0, -1, 1, -1, 1, -1, 1])
    U2, _ = spectral.sign_align(d.U, d.V, ref)
    assert ((U2 * ref).sum(0) > 0).all()


def test_norm_matched_reconstruction():
    M = torch.randn(12, 8)
    d = spectral.svd(M, 8, exact=True)
    for k in (1, 3):
        for top in (True, False):
            R = spectral.reconstruct(d, k, float(M.norm()), top=top)
            assert float(R.norm()) == pytest.approx(float(M.norm()), rel=1e-5)
            assert torch.linalg.matrix_rank(R) == k
    # top-1 is the best rank-1 direction, only rescaled
    R1 = spectral.reconstruct(d, 1, float(d.S[0]))
    torch.testing.assert_close(R1, d.S[0] * torch.outer(d.U[:, 0], d.V[:, 0]))
    # all components at the matrix's own norm give the matrix back
    torch.testing.assert_close(spectral.reconstruct(d, 8, float(M.norm())), M, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exact=True"):
        spectral.reconstruct(spectral.svd(torch.randn(40, 30), 2, exact=False), 2, 1.0, top=False)


def test_spectrum_metrics_of_a_rank_two_update():
    M = matrix_with_spectrum([2.0, 1.0], 16, 12).float()
    d = spectral.svd(M, 12, exact=True)
    m = spectral.spectrum_metrics(d.S, float(M.norm()) ** 2, 12, (0.1, 0.2), d.full)
    p = (2 / 3, 1 / 3)
    assert m["effective_rank"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-4)
    assert m["effective_rank_frac"] == pytest.approx(m["effective_rank"] / 12)
    assert m["stable_rank"] == pytest.approx(5 / 4, rel=1e-4)
    assert m["energy_top"]["0.1"] == pytest.approx(1.0, rel=1e-4)  # k = ceil(1.2) = 2
    assert m["captured_energy"] == 1.0
