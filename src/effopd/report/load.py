"""Read what a run directory holds for the report, and nothing else.

    RUN_DIR/metrics.jsonl                      one JSON object per logged step
    RUN_DIR/config.yaml                        the resolved config (shown, and read for a few keys)
    RUN_DIR/analysis/analysis.json             written by ``effopd.analysis.analyze`` (schema there)
    RUN_DIR/analysis/tensors.safetensors       its arrays (singular values, PCA coordinates, ...)

Every file may be missing or damaged; :class:`Run` then carries a note saying what is missing
and how to produce it, and the sections that need the file show that note instead of a plot.

The analysis's file names and schema tag are defined here, torch-free, and
:mod:`effopd.analysis.run` writes with them. Also the home of :class:`ReportError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from effopd.errors import UserError
from effopd.metrics import read_metrics
from effopd.utils import is_number

if TYPE_CHECKING:
    import numpy as np

ANALYSIS_DIR = "analysis"
ANALYSIS_JSON = "analysis.json"
ANALYSIS_TENSORS = "tensors.safetensors"
SCHEMA = "effopd.analysis/1"
"""The ``schema`` tag of ``analysis.json``: the version of its layout."""


class ReportError(UserError, ValueError):
    """The report's inputs were wrong (a missing run directory, a label count that does not match)."""


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path
    label: str
    metrics: list[dict] = field(default_factory=list)
    metrics_note: str | None = None
    config_text: str | None = None
    config: dict = field(default_factory=dict)
    analysis: dict | None = None
    analysis_note: str | None = None
    tensors_path: Path | None = None

    def cfg(self, dotted: str, default=None):
        """A value of config.yaml by dotted key (``extrapolate.enabled``), or ``default``."""
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a numeric metric over the rows that log it (finite values only)."""
        steps, values = [], []
        for row in self.metrics:
            v = row.get(key)
            if is_number(v) and math.isfinite(v) and is_number(row.get("step")):
                steps.append(int(row["step"]))
                values.append(float(v))
        return steps, values

    def searches(self) -> list[dict]:
        """The EffOPD search records: one dict per logged search, keys without ``extrapolate/``."""
        out = []
        for row in self.metrics:
            rec = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("extrapolate/")}
            if rec:
                out.append({"step": row.get("step"), **rec})
        return out

    def tensor(self, key: str) -> np.ndarray | None:
        """One array of tensors.safetensors (``singular_values/<module>``), or None if absent."""
        if self.tensors_path is None:
            return None
        from safetensors import safe_open

        with safe_open(str(self.tensors_path), framework="numpy") as f:
            return f.get_tensor(key) if key in f.keys() else None


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read a run directory (or an ``effopd analyze --out`` folder: its analysis alone); missing or
    unreadable files become notes, not errors. A path that is not a directory at all is an error
    (most likely a typo on the command line)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist (expected metrics.jsonl, config.yaml, analysis/ inside)")
    run = Run(path=path, label=label or path.resolve().name)
    run.metrics, run.metrics_note = read_metrics(path / "metrics.jsonl")
    state = trainer_state_file(path)
    if not (path / "metrics.jsonl").exists() and state is not None:
        run.metrics, run.metrics_note = read_trainer_state(state)
    run.config_text, run.config = _read_config(path / "config.yaml")
    # an `effopd analyze --out` folder given directly holds analysis.json itself
    adir = path if (path / ANALYSIS_JSON).exists() and not (path / ANALYSIS_DIR / ANALYSIS_JSON).exists() else path / ANALYSIS_DIR
    run.analysis, run.analysis_note, run.tensors_path = _read_analysis(adir)
    return run


TRAINER_KEYS = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm", "reward": "train/reward",
                "completions/mean_length": "train/response_length", "kl": "train/kl"}
"""transformers/TRL ``log_history`` keys under the names effopd logs; ``eval_X`` becomes
``eval/X``, ``extrapolate/*`` (what ``EffOPDCallback`` logs) stays as it is, and any other key
becomes ``trl/<key>``."""


def trainer_state_file(path: Path) -> Path | None:
    """The ``trainer_state.json`` of a transformers/TRL ``Trainer`` output directory: its own
    (``trainer.save_state()``), else the newest ``checkpoint-N`` folder's; None if neither."""
    if (path / "trainer_state.json").exists():
        return path / "trainer_state.json"
    steps = [(int(p.name.split("-", 1)[1]), p) for p in path.glob("checkpoint-*")
             if p.name.split("-", 1)[1].isdigit() and (p / "trainer_state.json").exists()]
    return max(steps)[1] / "trainer_state.json" if steps else None


def read_trainer_state(path: Path) -> tuple[list[dict], str | None]:
    """A Trainer's ``log_history`` as metrics rows (one per step, entries of a step merged),
    with a note that says where they came from."""
    try:
        history = json.loads(path.read_text()).get("log_history", [])
    except (OSError, ValueError, AttributeError) as err:
        return [], f"{path} could not be read ({err}); no training curves"
    rows: dict[int, dict] = {}
    for entry in history:
        if not isinstance(entry, dict) or not is_number(entry.get("step")):
            continue
        row = rows.setdefault(int(entry["step"]), {"step": int(entry["step"])})
        for key, value in entry.items():
            if key in ("step", "epoch"):
                continue
            name = TRAINER_KEYS.get(key) or (f"eval/{key[5:]}" if key.startswith("eval_") else
                                             key if key.startswith("extrapolate/") else f"trl/{key}")
            row[name] = value
    note = f"training curves from {path} (a transformers/TRL Trainer run: its log_history, {len(rows)} steps)"
    return [rows[k] for k in sorted(rows)], note


def _read_config(path: Path) -> tuple[str | None, dict]:
    if not path.exists():
        return None, {}
    text = path.read_text(errors="replace")
    try:
        import yaml

        cfg = yaml.safe_load(text)
    except Exception:  # a damaged config is still shown as text
        cfg = None
    return text, cfg if isinstance(cfg, dict) else {}


def analyze_hint(run_dir: Path) -> str:
    """The command that writes the analysis the report reads."""
    return (f"effopd analyze --base STUDENT_INIT --checkpoints {run_dir / 'checkpoints'} "
            f"--out {run_dir / ANALYSIS_DIR} (STUDENT_INIT: the student's initial weights, config model.student)")


def _read_analysis(adir: Path) -> tuple[dict | None, str | None, Path | None]:
    jpath = adir / ANALYSIS_JSON
    if not jpath.exists():
        return None, f"Analysis not run ({jpath} not found). Run it with: {analyze_hint(adir.parent)}", None
    try:
        record = json.loads(jpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return None, f"{jpath} could not be read ({e}); rerun the analysis: {analyze_hint(adir.parent)}", None
    if not isinstance(record, dict):
        return None, f"{jpath} is not an analysis record; rerun the analysis: {analyze_hint(adir.parent)}", None
    note = None
    if record.get("schema") != SCHEMA:
        note = f"{jpath} has schema {record.get('schema')!r}; this report reads {SCHEMA!r} and may miss parts of it"
    tpath = adir / ANALYSIS_TENSORS
    if not tpath.exists():
        tpath = None
        note = (note + "; " if note else "") + f"{adir / ANALYSIS_TENSORS} not found: spectra, trajectories and embedding histograms are left out"
    return record, note, tpath
