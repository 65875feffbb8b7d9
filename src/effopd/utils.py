"""Small shared helpers: isolated randomness and atomic file writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Run a block with its own seeded torch generator state, restoring the caller's state after.

    Evaluation and validation sample inside this, so adding an evaluation never changes the
    training stream."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
