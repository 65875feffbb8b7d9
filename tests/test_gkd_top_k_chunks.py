"""Top-k GKD (``losses.generalized_jsd`` with ``top_k``) computed position chunk by position chunk:
the same loss, gradient and metrics whatever the chunking, and no full softmax of the vocabulary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from effopd.losses import generalized_jsd

SRC = str(Path(__file__).resolve().parents[1] / "src")


def logits(seed: int, B: int = 2, T: int = 7, V: int = 50, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g) * scale
    te = torch.randn(B, T, V, generator=g) * scale
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, 2:] = 0
    return s, te, mask


def bucket_reference(s, te, mask, k: int, beta: float) -> torch.Tensor:
    """Token-mean generalized JSD over the teacher's top-k tokens and the rest, from float64 full
    softmaxes (the definition, computed the slow way)."""
    p, q = torch.softmax(te.double(), -1), torch.softmax(s.double(), -1)
    idx = te.topk(k, -1).indices

    def buckets(x):
        return torch.cat([x.gather(-1, idx), x.scatter(-1, idx, 0.0).sum(-1, keepdim=True)], -1)

    P, Q = buckets(p), buckets(q)
    M = beta * P + (1 - beta) * Q
    jsd = beta * (P * (P / M).log()).sum(-1) + (1 - beta) * (Q * (Q / M).log()).sum(-1)
    m = mask.double()
    return (jsd * m).sum() / m.sum()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 4])
def test_chunked_top_k_equals_one_chunk_and_the_definition(k, beta):
    s, te, mask = logits(k)
    results = {}
    for chunk in (1, 3, 7, 100):  # 3 does not divide T = 7; 100 > T
        x = s.clone().requires_grad_()
        loss, m = generalized_jsd(x, te, mask, beta=beta, top_k=k, chunk_positions=chunk)
        loss.backward()
        results[chunk] = (loss.detach(), x.grad, m)
    ref_loss, ref_grad, ref_m = results[100]
    if 0.0 < beta < 1.0:
        assert ref_loss.item() == pytest.approx(bucket_reference(s, te, mask, k, beta).item(), rel=1e-5)
    for loss, grad, m in results.values():
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-6)
        assert m["teacher_mass"] == pytest.approx(ref_m["teacher_mass"], rel=1e-6)
    assert ref_grad[mask == 0].abs().max() == 0 and ref_grad.abs().sum() > 0
    # the default chunking (by element count) gives the same loss
    assert generalized_jsd(s, te, mask, beta=beta, top_k=k)[0].item() == pytest.approx(ref_loss.item(), rel=1e-6)


def test_top_k_builds_no_full_softmax(monkeypatch):
    """The top-k path takes the teacher's top-k from its raw logits and a logsumexp: no softmax
    or log_softmax over the vocabulary is ever called, for the teacher or the student."""
    s, te, mask = logits(9)
    seen = []
    for name in ("softmax", "log_softmax"):
        original = getattr(torch, name)

        def spy(x, *args, _original=original, _name=name, **kwargs):
            seen.append((_name, tuple(x.shape)))
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    x = s.clone().requires_grad_()
    loss, _ = generalized_jsd(x, te, mask, beta=0.5, top_k=3, chunk_positions=2)
    loss.backward()
    assert not [c for c in seen if c[1][-1] == s.shape[-1]], seen
    seen.clear()
    generalized_jsd(s, te, mask, beta=0.5)  # the full-vocabulary mode does (the spy works)
    assert any(c[1][-1] == s.shape[-1] for c in seen)


def test_bad_chunk_positions_is_rejected_with_the_input_named():
    s, te, mask = logits(1)
    with pytest.raises(ValueError, match="chunk_positions must be a positive integer"):
        generalized_jsd(s, te, mask, top_k=2, chunk_positions=0)


GKD_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from effopd.losses import generalized_jsd

    B, T, V, chunk = (int(x) for x in sys.argv[1:5])
    torch.set_num_threads(1)

    def rss():
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

    def run(T):
        s = torch.randn(B, T, V, requires_grad=True)
        te = torch.randn(B, T, V)
        mask = torch.ones(B, T, dtype=torch.long)
        generalized_jsd(s, te, mask, beta=0.5, top_k=8, chunk_positions=chunk)[0].backward()
        return s, te

    run(4)  # warm-up at a small T
    s = torch.randn(B, T, V, requires_grad=True)  # the inputs exist before the measurement starts
    te = torch.randn(B, T, V)
    mask = torch.ones(B, T, dtype=torch.long)
    base, _ = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    generalized_jsd(s, te, mask, beta=0.5, top_k=8, chunk_positions=chunk)[0].backward()
    _, hwm = rss()
    print(json.dumps({"growth": hwm - base}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read the peak RSS")
def test_top_k_peak_memory_is_the_student_gradient_plus_chunks():
    """B = 2, T = 256, V = 50,000: each (B, T, V) float32 tensor is B*T*V*4 = 102.4 MB. Beyond
    the given logits, the backward must produce the student's gradient (one such tensor), and
    autograd holds the chunks' gradients (together another one) while it assembles it; the
    chunks' own temporaries (8 positions: B*8*V*4 = 3.2 MB each) add a few MB. Float32,
    normalised or masked copies of the full logits (the unchunked top-k computation held about
    five full tensors at its peak) would push the growth past 2.5 full tensors."""
    B, T, V, chunk = 2, 256, 50_000, 8
    full = B * T * V * 4
    # MALLOC_MMAP_THRESHOLD_: every allocation above 64 KiB is its own mmap, unmapped when freed,
    # so RSS follows the live tensors (see tests/test_scoring_memory.py).
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", GKD_MEMORY_SCRIPT, str(B), str(T), str(V), str(chunk)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    print(f"top-k GKD peak RSS growth {growth / 1e6:.1f} MB; one (B, T, V) float32 tensor {full / 1e6:.1f} MB")
    assert full < growth < 2.5 * full
