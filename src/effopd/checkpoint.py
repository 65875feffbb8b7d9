"""Atomic checkpoints and exact resume.

``checkpoints/step-N/`` holds a ``from_pretrained``-loadable model and tokenizer, the trainer
state (optimizer, scheduler, data order, step, controller state) and one RNG file per process.
It is written under a temporary name, completed by a ``COMPLETE`` manifest written last, and
only then renamed into place, so a crash at any moment leaves either the previous checkpoint or
the new one, never a half-written ``step-N``.

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

from effopd.errors import UserError
from effopd.utils import fsync_dir, write_json

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError, RuntimeError):
    pass


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tmp_dir(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f".tmp-step-{step}"


def begin(ckpt_root: Path, step: int) -> Path:
    """Fresh temporary directory for the checkpoint of ``step`` (main process only)."""
    tmp = tmp_dir(ckpt_root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")


def finish(ckpt_root: Path, step: int, world_size: int, keep_last: int | None = None) -> Path:
    """Verify the temporary directory, write the manifest, rename it to ``step-N`` and prune.
    Older checkpoints are deleted only after the new one is in place."""
    tmp = tmp_dir(ckpt_root, step)
    missing = [f"rng-rank{r}.pt" for r in range(world_size) if not (tmp / f"rng-rank{r}.pt").exists()]
    missing += [f for f in (STATE_FILE, "config.json") if not (tmp / f).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {tmp} is missing {missing}; it was not completed and the previous one is kept")
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
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
    return all((Path(path) / f).exists() for f in files)


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


def load_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, weights_only=False)


def load_rng(path: Path, rank: int) -> None:
    f = Path(path) / f"rng-rank{rank}.pt"
    if not f.exists():
        raise CheckpointError(
            f"{f} is missing: the checkpoint was written by a run with fewer processes; "
            "resume with the same number of processes"
        )
    set_rng_state(torch.load(f, weights_only=False))
