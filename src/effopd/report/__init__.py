"""Self-contained HTML report of one or more runs: ``effopd report RUN_DIR... --out report.html``.

The report reads only what a run wrote (``metrics.jsonl``, ``config.yaml``, and
``analysis/analysis.json`` + ``analysis/tensors.safetensors`` from ``effopd analyze``) and writes
one HTML file with every plot embedded as a PNG data URI: no scripts, no network.

    load.py      read a run directory into a ``Run`` (missing files become notes); ReportError
    verdict.py   the three verdict questions, their rules and thresholds
    plots.py     one matplotlib figure per plot
    html.py      escaping, tables, figures, the page and its inline CSS
    sections.py  the sections in page order (SECTIONS)
    build.py     build_report()
    cli.py       add_arguments() and run() for ``effopd report``
"""

from effopd.report.cli import add_arguments, run
from effopd.report.load import ReportError

__all__ = ["ReportError", "SECTION_IDS", "add_arguments", "build_report", "run"]


def __getattr__(name: str):
    # build_report and SECTION_IDS pull in matplotlib: import them on first use, so that
    # building the CLI parser (add_arguments) stays instant.
    if name == "build_report":
        from effopd.report.build import build_report

        return build_report
    if name == "SECTION_IDS":
        from effopd.report.sections import SECTION_IDS

        return SECTION_IDS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
