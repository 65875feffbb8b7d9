"""``metrics.jsonl``: the trainer's append-only log (:class:`MetricsLog`) and its one reader
(:func:`read_metrics`).

One JSON object per line, each with ``step``. A run killed while appending can leave its last
line cut off, so the reader skips lines that are not JSON objects and says how many it skipped.
Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

from effopd.utils import atomic_write_text, is_number


class MetricsLog:
    """Append-only metrics.jsonl, one object per step; truncated back to a checkpoint on resume."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """Keep the rows of steps <= ``step`` (those the checkpoint being resumed has seen), in
        their order; a damaged line (a row cut off by a crash) is dropped."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(path: str | Path) -> tuple[list[dict], str | None]:
    """The rows of a metrics.jsonl, sorted by ``step`` (stable: rows of one step keep their
    order), and a note for the reader, or None when every line was read.

    Blank lines are skipped. A line that is not a JSON object (a line cut off by a crash, a
    stray value) is skipped and counted in the note. A missing file, or one with no readable
    row, gives no rows and a note saying so; nothing here raises on a damaged file."""
    path = Path(path)
    if not path.exists():
        return [], f"{path} not found: training sections are empty"
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. the last line of a run killed mid-write
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    rows.sort(key=lambda r: r.get("step", 0) if is_number(r.get("step")) else 0)
    note = f"{path}: skipped {bad} unreadable line(s)" if bad else None
    if not rows:
        note = f"{path} holds no metrics"
    return rows, note
