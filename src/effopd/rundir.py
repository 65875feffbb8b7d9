"""The run directory: what a run writes there, and the rules for starting in it.

A non-empty run directory needs ``--resume`` (continue the run in it) or ``--overwrite``
(delete that run's files and start again), ``--overwrite`` never deletes anything a run did not
write, and ``--resume`` may change only the keys that do not alter the trajectory so far.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from effopd.config import Config, from_yaml_text, to_yaml
from effopd.errors import UserError
from effopd.utils import atomic_write_text

# Keys that may change when resuming (they do not alter the trajectory up to the checkpoint).
RESUMABLE_KEYS = {"train.steps", "train.eval_every", "train.save_every", "train.keep_last"}


class RunDirError(UserError, RuntimeError):
    """The run directory holds something that forbids this start (a run, a different config)."""


RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "checkpoints", "eval", "trackers", "analysis", "report.html")
"""What a run writes in its directory: all that ``--overwrite`` ever deletes."""


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints"))


def check_run_dir(cfg: Config, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Never overwrite a run silently: a non-empty run directory needs ``--resume`` (continue it)
    or ``--overwrite`` (delete the run in it), and ``--overwrite`` never touches a directory that
    does not hold a run. Only checks; nothing is written until the inputs loaded."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir} is a file, not a directory; pass a directory (it is created if missing)")
    saved = run_dir / "config.yaml"
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if resume and not holds_run(run_dir):
        what = "does not exist" if not run_dir.exists() else "holds no run (no config.yaml, metrics.jsonl or checkpoints/)"
        raise RunDirError(f"--resume: run directory {run_dir} {what}; check the path, or drop --resume to start a new run")
    if occupied and overwrite and not holds_run(run_dir):
        foreign = sorted(p.name for p in run_dir.iterdir())[:3]
        raise RunDirError(
            f"--overwrite: {run_dir} is not empty and holds no run (e.g. {foreign}); --overwrite deletes only a run's "
            "files, never other files. Pass a new or empty directory"
        )
    if occupied and not (resume or overwrite):
        raise RunDirError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it or "
            "--overwrite to delete it and start again"
            if holds_run(run_dir) else
            f"run directory {run_dir} is not empty and holds no run; pass a new or empty directory"
        )
    if resume and saved.exists():
        old = from_yaml_text(saved.read_text())
        diff = _diff(old, cfg) - RESUMABLE_KEYS
        if diff:
            raise RunDirError(
                f"--resume: the config differs from {saved} in {sorted(diff)}; only "
                f"{sorted(RESUMABLE_KEYS)} may change on resume. Use a new run directory instead"
            )


def init_run_dir(cfg: Config, run_dir: Path, overwrite: bool) -> None:
    """Create the run directory (with ``overwrite``, first delete the run's own entries,
    ``RUN_ENTRIES``, and nothing else) and save the resolved config."""
    if overwrite and run_dir.exists():
        for name in RUN_ENTRIES:
            p = run_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))


def _diff(a: Config, b: Config) -> set[str]:
    from omegaconf import OmegaConf

    fa, fb = (flatten(OmegaConf.to_container(OmegaConf.structured(x))) for x in (a, b))
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
