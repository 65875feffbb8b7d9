"""Self-contained HTML report of one or more runs: ``effopd report RUN_DIR... --out report.html``.

The report reads only what a run wrote (``metrics.jsonl``, ``config.yaml``, and
``analysis/analysis.json`` + ``analysis/tensors.safetensors`` from ``effopd analyze``) and writes
one HTML file with every plot embedded as a PNG data URI: no scripts, no network.

    load.py      read a run directory into a ``Run`` (missing files become notes)
    verdict.py   the three verdict questions, their rules and thresholds
    plots.py     one matplotlib figure per plot
    html.py      escaping, tables, figures, the page and its inline CSS
    sections.py  the sections in page order (SECTIONS)
    build.py     build_report(), and add_arguments()/run() for the CLI
"""

from effopd.report.build import ReportError, add_arguments, build_report, run
from effopd.report.sections import SECTION_IDS
from effopd.report.verdict import verdict

__all__ = ["ReportError", "SECTION_IDS", "add_arguments", "build_report", "run", "verdict"]
