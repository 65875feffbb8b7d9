"""Synthetic runs with a known answer, for tests and benchmarks of the analyses.

:func:`write_base` saves a randomly initialised model of any ``transformers`` config.
:func:`write_run` writes ``step-N`` checkpoints (with ``COMPLETE`` manifests, like a training
run) in which every selected 2-D weight moves along one fixed low-rank direction::

    W_t = W_0 + (t/T)·D + noise·ε_t,   D = Σ_{i<rank} s_i a_i b_iᵀ,  ‖D‖_F = scale·‖W_0‖_F

with orthonormal a_i, b_i, s_i = 1, 1/2, 1/3, … (so the top singular directions are distinct),
and fresh Gaussian ε_t of unit RMS per entry times ``noise``·‖D‖_F/√(mn). Embedding rows of
the first ``embed_rows`` tokens move as well, so the embedding-shift analysis sees a change.
The update is low-rank and its subspace is fixed from the first checkpoint on: effective rank
≈ ``rank``, lock-in at the first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from effopd.analysis.io import CheckpointReader
from effopd.checkpoint import COMPLETE
from effopd.module_groups import DEFAULT_TYPES, module_group
from effopd.utils import write_json


def write_base(config, out_dir: str | Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Randomly initialised ``AutoModelForCausalLM`` of ``config`` saved to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return Path(out_dir)


def _direction(shape: tuple[int, int], rank: int, norm: float, gen: torch.Generator) -> torch.Tensor:
    m, n = shape
    r = min(rank, m, n)
    a, _ = torch.linalg.qr(torch.randn(m, r, generator=gen))
    b, _ = torch.linalg.qr(torch.randn(n, r, generator=gen))
    s = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
    D = (a * s) @ b.T
    return D * (norm / float(D.norm()))


def write_run(base_dir: str | Path, ckpt_root: str | Path, steps: Sequence[int], *, rank: int = 2,
              scale: float = 0.05, noise: float = 0.02, embed_rows: int = 4, types=DEFAULT_TYPES,
              seed: int = 0) -> list[tuple[int, Path]]:
    """Write ``ckpt_root/step-N`` for each step (see the module docstring); returns [(step, dir)]."""
    base = CheckpointReader(base_dir)
    gen = torch.Generator().manual_seed(seed)
    T = max(steps)
    directions = {}
    for name in base.names:
        g, shape = module_group(name), base.shape(name)
        if len(shape) == 2 and name.endswith(".weight") and (g.type in types or g.type == "embed"):
            w0 = base.get(name).float()
            if g.type == "embed":
                D = torch.zeros(shape)
                k = min(embed_rows, shape[0])
                D[:k] = torch.randn(k, shape[1], generator=gen) * (scale * float(w0.std()))
            else:
                D = _direction(shape, rank, scale * float(w0.norm()), gen)
            directions[name] = D
    out = []
    for step in steps:
        d = Path(ckpt_root) / f"step-{step}"
        d.mkdir(parents=True, exist_ok=True)
        state = {}
        for name in base.names:
            w = base.get(name)
            if name in directions:
                D = directions[name]
                eps = torch.randn(D.shape, generator=gen) * noise * float(D.norm()) / D.numel() ** 0.5
                w = (w.float() + step / T * D + eps).to(w.dtype)
            state[name] = w.contiguous()
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        for f in Path(base_dir).glob("*.json"):
            if f.name != "model.safetensors.index.json":
                (d / f.name).write_bytes(f.read_bytes())
        files = sorted(p.name for p in d.iterdir() if p.is_file() and p.name != COMPLETE)
        write_json(d / COMPLETE, {"step": step, "world_size": 1, "files": files}, indent=None)
        out.append((step, d))
    return out
