"""``build_report``: run directories in, one self-contained HTML file out."""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from effopd.report import sections as S
from effopd.report.html import esc, note, page, section
from effopd.report.load import ReportError, load_run
from effopd.report.plots import STYLE
from effopd.utils import atomic_write_text


def build_report(run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None) -> Path:
    """Write one self-contained HTML report of ``run_dirs`` (side by side) to ``out``.

    Args:
        run_dirs: run directories (each with metrics.jsonl, config.yaml and optionally
            analysis/ from ``effopd analyze``), in column order.
        out: the HTML file to write (replaced atomically).
        labels: one display name per run (default: the directory names).

    A section whose data a run lacks shows a note instead of a plot. Returns ``out``.
    """
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise ReportError("give at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ReportError(f"got {len(labels)} label(s) for {len(run_dirs)} run directories; give one --label per run or none")
    try:
        runs = [load_run(p, None if labels is None else labels[i]) for i, p in enumerate(run_dirs)]
    except FileNotFoundError as e:
        raise ReportError(str(e)) from None
    with matplotlib.rc_context(STYLE):
        bodies = [section(sid, title, _render(getattr(S, fn), runs, title)) for sid, title, fn in S.SECTIONS]
    names = ", ".join(r.label for r in runs)
    header = (f"<h1>effopd report: {esc(names)}</h1><p>Generated {esc(time.strftime('%Y-%m-%d %H:%M'))} from "
              + ", ".join(f"<code>{esc(r.path)}</code>" for r in runs) + ".</p>")
    out = Path(out)
    atomic_write_text(out, page(f"effopd report: {names}", header, [(sid, t) for sid, t, _ in S.SECTIONS], bodies))
    return out


def _render(fn, runs, title: str) -> str:
    """One section's body; an unexpected failure becomes a note on the page, never a crash."""
    try:
        return fn(runs)
    except Exception as e:
        warnings.warn(f"report section {title!r} failed: {traceback.format_exc()}", RuntimeWarning, stacklevel=2)
        return note(f"This section could not be rendered ({type(e).__name__}: {e}).")
