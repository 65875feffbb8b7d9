"""Models built from a base θ_0 and a checkpoint θ_t for the evaluation-based analyses.

Each builder streams the two checkpoints tensor by tensor and returns one state dict (one model
in memory) with the checkpoint's tensor names and dtypes; :func:`save_model_dir` writes it as a
``from_pretrained``-loadable directory.

- :func:`scaled` — θ_0 + α(θ_t − θ_0) (DESIGN.md §7), with EffOPD's own formula
  (:func:`effopd.extrapolate.extrapolated`). α = 0 returns the base tensors and α = 1 the
  checkpoint tensors themselves, so both limits are bitwise exact.
- :func:`partial` — the update of the selected tensors only: ``"apply"`` puts it on the base,
  ``"remove"`` takes it out of the checkpoint (§3). Selected tensors are copied whole from the
  other side, so applying everything gives the checkpoint and nothing gives the base, bitwise.
- :func:`lowrank` — W_0 + norm-matched top-k% or bottom-k% reconstruction of ΔW for each 2-D
  weight of the selected types; every other tensor from the checkpoint (§5).

Arithmetic is in float32; results are cast back to the checkpoint's dtype.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from effopd.analysis import spectral
from effopd.analysis.io import INDEX, LM_HEAD, SINGLE, AnalysisError, CheckpointReader, common_names
from effopd.extrapolate import extrapolated
from effopd.module_groups import DEFAULT_TYPES, module_group

Source = str | Path | CheckpointReader
Selector = Callable[[str], bool] | Collection[str]
# Files copied next to the weights: config, generation config, tokenizer, chat template.
_MODEL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def _open(src: Source) -> CheckpointReader:
    return src if isinstance(src, CheckpointReader) else CheckpointReader(src)


def _selector(select: Selector) -> Callable[[str], bool]:
    if callable(select):
        return select
    chosen = frozenset(select)
    return lambda name: name in chosen


def by_types(types: Iterable[str]) -> Callable[[str], bool]:
    """Select tensors whose module type (``module_group(name).type``) is in ``types``."""
    types = frozenset(types)
    return lambda name: module_group(name).type in types


def by_layers(layers: Iterable[int]) -> Callable[[str], bool]:
    """Select every tensor of the given transformer layers (attention, MLP and norms)."""
    layers = frozenset(layers)
    return lambda name: module_group(name).layer in layers


def _base_tensor(base: CheckpointReader, name: str, ckpt: CheckpointReader) -> torch.Tensor:
    """The base's tensor ``name``; for an ``lm_head.weight`` the base ties to its embedding,
    that embedding."""
    if name in base:
        return base.get(name)
    if name == LM_HEAD:
        for n in base.names:
            if module_group(n).type == "embed" and base.shape(n) == ckpt.shape(name):
                return base.get(n)  # a fresh tensor on each call: never shares memory with the embedding
    raise AnalysisError(f"tensor {name!r} of {ckpt.path} is not in base {base.path}")


def _pairs(base: Source, ckpt: Source):
    """Yield (name, base tensor, checkpoint tensor) for every tensor of the checkpoint."""
    base, ckpt = _open(base), _open(ckpt)
    common_names(base, ckpt)  # raises on mismatched names or shapes
    for name in ckpt.names:
        yield name, (lambda n=name: _base_tensor(base, n, ckpt)), ckpt.get(name)


def scaled(base: Source, ckpt: Source, alpha: float, types: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """θ_0 + α(θ_t − θ_0) on every tensor, or only on tensors of ``types`` (others: θ_t), by
    :func:`effopd.extrapolate.extrapolated`: the arithmetic of EffOPD's candidates."""
    chosen = None if types is None else by_types(types)
    out = {}
    for name, get_w0, wt in _pairs(base, ckpt):
        if alpha == 1 or (chosen is not None and not chosen(name)):
            out[name] = wt
        else:
            out[name] = extrapolated(get_w0(), wt, alpha)
    return out


def partial(base: Source, ckpt: Source, select: Selector, mode: str = "apply") -> dict[str, torch.Tensor]:
    """Apply only the selected tensors' update to the base (``"apply"``), or remove only their
    update from the checkpoint (``"remove"``). ``select`` is a predicate on tensor names (see
    :func:`by_types`, :func:`by_layers`) or a collection of names."""
    if mode not in ("apply", "remove"):
        raise ValueError(f"mode must be 'apply' or 'remove', got {mode!r}")
    chosen = _selector(select)
    out = {}
    for name, get_w0, wt in _pairs(base, ckpt):
        take_ckpt = chosen(name) == (mode == "apply")
        out[name] = wt if take_ckpt else get_w0()
    return out


def lowrank(base: Source, ckpt: Source, frac: float, top: bool = True, types: Iterable[str] = DEFAULT_TYPES,
            exact: bool | None = None) -> dict[str, torch.Tensor]:
    """W_0 + (‖ΔW‖_F/‖ΔW_k‖_F)·U_k S_k V_kᵀ for each 2-D weight of ``types``, k = ⌈frac·min(m,n)⌉
    largest (``top``) or smallest singular values; all other tensors from the checkpoint.
    The bottom-k variant always uses the exact SVD."""
    chosen = by_types(types)
    out = {}
    for name, get_w0, wt in _pairs(base, ckpt):
        if wt.ndim != 2 or not name.endswith(".weight") or not chosen(name):
            out[name] = wt
            continue
        w0 = get_w0().float()
        d = wt.float() - w0
        k = spectral.n_components(frac, min(d.shape))
        dec = spectral.svd(d, k, exact=exact if top else True)
        out[name] = (w0 + spectral.reconstruct(dec, k, float(d.norm()), top=top)).to(wt.dtype)
    return out


def save_model_dir(state: dict[str, torch.Tensor], src_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``state`` as ``out_dir/model.safetensors`` next to the config, generation config and
    tokenizer files of ``src_dir`` (a checkpoint of the same model), for ``from_pretrained``."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not (src_dir / "config.json").exists():
        raise AnalysisError(f"{src_dir} has no config.json to copy next to the built weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        if f.is_file() and f.name.endswith(_MODEL_FILE_SUFFIXES) and f.name != INDEX:
            shutil.copy2(f, out_dir / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / SINGLE), metadata={"format": "pt"})
    return out_dir
