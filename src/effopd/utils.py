"""Small shared helpers: isolated randomness, atomic file writes and a tolerant median.

Torch-free at import (``isolated_rng`` imports torch when it runs), so that the report, which
writes its HTML through :func:`atomic_write_text`, never pulls torch in.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import secrets
from collections.abc import Iterable
from pathlib import Path


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Run a block with its own seeded torch generator state, restoring the caller's state after.

    Evaluation and validation sample inside this, so adding an evaluation never changes the
    training stream."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---- atomic writes -----------------------------------------------------------------------------


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename into it, a new file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new hidden file next to ``path``, opened for writing. Created with mode 0o666 less the
    umask, as ``open`` would create ``path`` itself (``tempfile.mkstemp`` would make it 0o600)."""
    while True:
        tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a reader, or a crash at any moment, sees either the
    old file or the whole new one: write a temporary file in the same directory, flush and fsync
    it, rename it over ``path``, then fsync the directory. Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8 (newlines written as given)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, *, indent: int | None = 2) -> None:
    """``obj`` as JSON (one trailing newline), written atomically (:func:`atomic_write_bytes`)."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


# ---- statistics --------------------------------------------------------------------------------


def is_number(x) -> bool:
    """A real number (int, float, numpy scalar), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def median(xs: Iterable) -> float | None:
    """The median of the finite numbers in ``xs`` as a float, or None when there are none.

    None, NaN, infinities, booleans and anything that is not a real number are left out, so a
    list read from JSON with missing entries (``null``) gives the median of what is there."""
    vals = sorted(float(x) for x in xs if is_number(x) and math.isfinite(x))
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
