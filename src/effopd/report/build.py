"""``build_report``: run directories in, one self-contained HTML file out; and the CLI pair
(``add_arguments`` + ``run``) behind ``effopd report RUN_DIR... --out report.html``."""

from __future__ import annotations

import argparse
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from effopd.report import sections as S
from effopd.report.html import esc, note, page, section
from effopd.report.load import load_run
from effopd.report.plots import STYLE
from effopd.utils import atomic_write_text


class ReportError(ValueError):
    """The report's inputs were wrong (a missing run directory, a label count that does not match)."""


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``effopd report``."""
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (metrics.jsonl, config.yaml, analysis/); several are shown side by side")
    parser.add_argument("--out", type=Path, default=None,
                        help="HTML file to write (default: RUN_DIR/report.html for one run, ./report.html for several)")
    parser.add_argument("--label", action="append", default=None, metavar="NAME",
                        help="display name of a run, once per RUN_DIR in order (default: directory names)")


def run(args: argparse.Namespace) -> int:
    """Build the report from parsed ``add_arguments`` flags; prints where it went."""
    out = args.out or (args.run_dirs[0] / "report.html" if len(args.run_dirs) == 1 else Path("report.html"))
    path = build_report(args.run_dirs, out, labels=args.label)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open it in any browser, offline")
    return 0
