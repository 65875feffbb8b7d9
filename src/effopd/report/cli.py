"""``effopd report RUN_DIR... [--out report.html] [--label NAME ...]``: the flags and the handler.

Light on purpose (argparse, and the loader for :class:`ReportError`): the CLI builds its parser
without importing matplotlib; :func:`run` imports the report builder when the command runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from effopd.report.load import ReportError

__all__ = ["ReportError", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``effopd report``."""
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (metrics.jsonl, config.yaml, analysis/) or transformers/TRL Trainer output "
                        "directories (trainer_state.json); several are shown side by side")
    parser.add_argument("--out", type=Path, default=None,
                        help="HTML file to write (default: RUN_DIR/report.html for one run, ./report.html for several)")
    parser.add_argument("--label", action="extend", nargs="+", default=None, metavar="NAME",
                        help="display names of the runs, one per RUN_DIR in order (`--label a b` or `--label a --label b`; "
                        "default: directory names)")


def run(args: argparse.Namespace) -> int:
    """Build the report from parsed :func:`add_arguments` flags; prints where it went."""
    from effopd.report.build import build_report

    out = args.out or (args.run_dirs[0] / "report.html" if len(args.run_dirs) == 1 else Path("report.html"))
    path = build_report(args.run_dirs, out, labels=args.label)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); it opens offline in any browser")
    return 0
