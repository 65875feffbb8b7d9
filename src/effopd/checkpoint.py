"""Atomic checkpoints and exact resume.

``checkpoints/step-N/`` holds a ``from_pretrained``-loadable model and tokenizer, the trainer
state (optimizer, scheduler, data order, step, controller state) and one RNG file per process.
It is written under a temporary name, completed by a ``COMPLETE`` manifest written last, and
only then renamed into place, so a crash at any moment leaves either the previous checkpoint or
the new one, never a half-written ``step-N``. A directory without the manifest is reported and
ignored.
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    with open(tmp / COMPLETE, "w") as f:
        json.dump({"step": step, "world_size": world_size, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    final = Path(ckpt_root) / f"step-{step}"
    if final.exists():  # re-saving a step after resume: move the old one aside first
        old = Path(ckpt_root) / f".old-step-{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(Path(ckpt_root))
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


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete ``step-N`` directories in step order; incomplete ones are reported and ignored."""
    root = Path(ckpt_root)
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        if is_complete(p):
            found.append((int(m.group(1)), p))
        else:
            warnings.warn(f"ignoring incomplete checkpoint {p} (no valid {COMPLETE} manifest)", stacklevel=2)
    return [p for _, p in sorted(found)]


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
