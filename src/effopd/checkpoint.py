"""Atomic checkpoints and exact resume.

``checkpoints/step-N/`` holds a ``from_pretrained``-loadable model and tokenizer, the trainer
state and one RNG file per process, in formats that cannot run code when read (no pickle):

- ``trainer_state.json``: step, scheduler, data order, EffOPD history, the optimizer's
  hyper-parameters (``param_groups``) and its non-tensor per-parameter values;
- ``optimizer.safetensors``: the optimizer's per-parameter tensors (``state.<i>.<name>``);
- ``rng-rank<r>.safetensors``: that process's torch (and CUDA) generator states as tensors, the
  numpy key as a tensor, and the python/numpy scalars as JSON in the file's metadata.

It is written under a temporary name; every file is fsync'd, then the ``COMPLETE`` manifest
(each file's size) is written and fsync'd, and only then is the folder renamed into place and
the parent fsync'd. A crash or a power loss at any moment leaves either the previous checkpoint
or the new one, never a half-written ``step-N``.

:func:`step_checkpoints` is the one rule for reading a ``checkpoints/`` folder, used by resume
and by the analysis alike: it lists the complete ``step-N`` directories only; one without a
valid manifest is reported (a warning) and ignored.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from effopd.errors import UserError
from effopd.utils import fsync_dir, write_json

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")
_OLD_RE = re.compile(r"^\.old-step-(\d+)$")


class CheckpointError(UserError, RuntimeError):
    pass


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def save_rng(tmp: Path, rank: int) -> None:
    """This process's python, numpy, torch and CUDA generator states, as tensors + JSON metadata."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python": json.dumps([version, list(keys), gauss]), "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(Path(tmp) / _rng_file(rank)), metadata=meta)


def load_rng(path: Path, rank: int) -> None:
    f = Path(path) / _rng_file(rank)
    if not f.exists():
        raise CheckpointError(
            f"{f} is missing: the checkpoint was written by a run with fewer processes; "
            "resume with the same number of processes"
        )
    with safe_open(str(f), framework="pt") as sf:
        meta = sf.metadata()
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    version, keys, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(keys), gauss))
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


SHARDED_DIR = "sharded"
"""The model and optimizer shards of an FSDP2 run (torch distributed checkpoint), instead of
``optimizer.safetensors``."""


def save_state(tmp: Path, state: dict, optimizer_state: dict | None) -> None:
    """``state`` (JSON-able: step, scheduler, sampler, EffOPD history) and an optimizer
    ``state_dict()``: tensors to ``optimizer.safetensors``, everything else to ``trainer_state.json``.
    ``optimizer_state=None``: the optimizer is in ``sharded/`` (written by every process)."""
    if optimizer_state is None:
        write_json(Path(tmp) / STATE_FILE, {**state, "optimizer": SHARDED_DIR})
        return
    tensors, scalars = {}, {}
    for idx, per_param in optimizer_state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(tensors, str(Path(tmp) / OPTIMIZER_FILE))
    opt = {"param_groups": optimizer_state["param_groups"], "scalars": scalars}
    write_json(Path(tmp) / STATE_FILE, {**state, "optimizer": opt})


def load_state(path: Path) -> dict:
    """The trainer state of checkpoint ``path``, with ``optimizer`` rebuilt as a ``state_dict``.
    Reads JSON and safetensors only; a pickled state (``trainer_state.pt``) is refused, unread."""
    path = Path(path)
    if not (path / STATE_FILE).exists() and (path / LEGACY_STATE_FILE).exists():
        raise CheckpointError(
            f"{path / LEGACY_STATE_FILE} is a pickled trainer state, which effopd does not load (unpickling a file "
            f"can run any code it holds). Resume from a checkpoint that has {STATE_FILE}, or start a new run from "
            f"these weights with model.student={path}"
        )
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / STATE_FILE} cannot be read ({type(err).__name__}: {err})") from err
    if state.get("optimizer") == SHARDED_DIR:
        if not (path / SHARDED_DIR / ".metadata").exists():
            raise CheckpointError(f"{path / SHARDED_DIR} holds no sharded state (.metadata is missing)")
        return state
    try:
        tensors = load_file(str(path / OPTIMIZER_FILE))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path / OPTIMIZER_FILE} cannot be read ({type(err).__name__}: {err})") from err
    opt = state.pop("optimizer")
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        per_param.setdefault(int(idx), {})[name] = value
    for idx, values in opt["scalars"].items():
        per_param.setdefault(int(idx), {}).update(values)
    state["optimizer"] = {"state": per_param, "param_groups": opt["param_groups"]}
    return state


def verify(path: Path, world_size: int) -> None:
    """Raise ``CheckpointError`` naming the file unless every state file of checkpoint ``path``
    (trainer state, optimizer, RNG of each of ``world_size`` processes, model weights) reads."""
    path = Path(path)
    load_state(path)
    for f in [_rng_file(r) for r in range(world_size)] + sorted(p.name for p in path.glob("*.safetensors")):
        try:
            with safe_open(str(path / f), framework="pt") as sf:
                sf.keys()
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{path / f} cannot be read ({type(err).__name__}: {err})") from err


def tmp_dir(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f".tmp-step-{step}"


def begin(ckpt_root: Path, step: int) -> Path:
    """Fresh temporary directory for the checkpoint of ``step`` (main process only)."""
    tmp = tmp_dir(ckpt_root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish(ckpt_root: Path, step: int, world_size: int, keep_last: int | None = None) -> Path:
    """Verify the temporary directory, write the manifest, rename it to ``step-N`` and prune.
    Older checkpoints are deleted only after the new one is in place."""
    tmp = tmp_dir(ckpt_root, step)
    missing = [_rng_file(r) for r in range(world_size) if not (tmp / _rng_file(r)).exists()]
    optimizer = SHARDED_DIR if (tmp / SHARDED_DIR).is_dir() else OPTIMIZER_FILE
    missing += [f for f in (STATE_FILE, optimizer, "config.json") if not (tmp / f).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {tmp} is missing {missing}; it was not completed and the previous one is kept")
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:  # on disk before the manifest that vouches for it
                os.fsync(f.fileno())
            files[str(p.relative_to(tmp))] = p.stat().st_size
    write_json(tmp / COMPLETE, {"step": step, "world_size": world_size, "files": files}, indent=None)
    final = Path(ckpt_root) / f"step-{step}"
    if final.exists():  # re-saving a step after resume: move the old one aside first
        old = Path(ckpt_root) / f".old-step-{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(Path(ckpt_root))
    if keep_last:
        for stale in complete_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(stale)
    return final


def is_complete(path: Path) -> bool:
    manifest = Path(path) / COMPLETE
    if not manifest.exists():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    if isinstance(files, list):  # manifests without sizes
        return all((Path(path) / f).exists() for f in files)
    return all((Path(path) / f).is_file() and (Path(path) / f).stat().st_size == size for f, size in files.items())


def step_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """``[(N, path)]`` of the complete ``step-N`` directories under ``ckpt_root``, sorted by N
    (empty when the folder does not exist).

    Temporary (``.tmp-step-N``) and superseded (``.old-step-N``) folders are not checkpoints and
    are skipped silently; a ``step-N`` directory without a valid ``COMPLETE`` manifest (a save
    that never finished, a copy made by hand, a file deleted afterwards) is reported with a
    warning and left out."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        if is_complete(p):
            found.append((int(m.group(1)), p))
        else:
            warnings.warn(f"ignoring incomplete checkpoint {p}: it has no valid {COMPLETE} manifest (a save that did "
                          f"not finish, or a file removed afterwards); delete it, or pass it explicitly as STEP=PATH "
                          "to analyse it anyway", stacklevel=2)
    return sorted(found)


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """The paths of :func:`step_checkpoints`, in step order."""
    return [p for _, p in step_checkpoints(ckpt_root)]


def latest(ckpt_root: Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def resumable(ckpt_root: Path, world_size: int) -> Path | None:
    """The newest complete checkpoint whose state reads (:func:`verify`); a newer one that does
    not is reported with a warning naming the file, and the one before it is tried."""
    for path in reversed(complete_checkpoints(ckpt_root)):
        try:
            verify(path, world_size)
            return path
        except CheckpointError as err:
            warnings.warn(f"not resuming from {path.name}: {err}; trying the checkpoint before it", stacklevel=2)
    return None


def recover(ckpt_root: Path) -> None:
    """Tidy what a crash during a save can leave: a ``.tmp-step-N`` folder is deleted; a
    ``.old-step-N`` (a checkpoint being replaced by a re-save of the same step) is put back as
    ``step-N`` when that is missing and it is complete, and deleted otherwise."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".tmp-step-"):
            shutil.rmtree(p, ignore_errors=True)
        elif (m := _OLD_RE.match(p.name)) is not None:
            final = root / f"step-{m.group(1)}"
            if not final.exists() and is_complete(p):
                warnings.warn(f"restoring {final.name} from {p.name} (a save of that step was interrupted)", stacklevel=2)
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)
    fsync_dir(root)
