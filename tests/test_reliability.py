"""Crashes, signals, write failures and non-finite values lose nothing.

The signal tests run training in a subprocess and send the signal when the run reaches a given
point, seen from outside: metrics.jsonl holding a step, or a marker file written by a hook the
launcher installs at a moment nothing on disk shows (inside an EffOPD search, just before a
checkpoint's manifest). At such a marker the hook holds the process there until the signal
arrives, so the kill lands exactly at that point whatever the machine's speed or load.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from conftest import assert_same_weights, checkpoint_weights, metrics_rows, tiny_overrides, train_run
from effopd import checkpoint as ckpt
from effopd.config import load_config
from effopd.train import NonFiniteError, train

STEPS = 12
#: Upper bound on how long any awaited point may take to come (a cold 12-step run takes seconds).
WAIT_S = 300


def _overrides(tiny_models, **extra) -> list[str]:
    """12 steps, a checkpoint every 3, no periodic evaluation."""
    return tiny_overrides(tiny_models, **{"data.eval_limit": 4, "train.steps": STEPS, "train.eval_every": 0,
                                          "train.save_every": 3, **extra})


# Runs `effopd train` (argv after the first three arguments) with an optional hold point:
#   update N MARKER     -> in the N-th optimizer update this process makes (one per step here), before it applies
#   search STEP MARKER  -> inside the EffOPD search of STEP, with the first candidate applied to the weights
#   write STEP MARKER   -> in the checkpoint of STEP, all files written under .tmp-step-STEP, no manifest yet
#   none 0 -            -> no hold
# At the hold point it creates MARKER and sleeps until the test signals it.
LAUNCHER = r"""
import sys, time
from pathlib import Path
kind, at, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
argv = sys.argv[4:]

def hold():
    marker.touch()
    time.sleep(3600)

if kind == "update":
    import torch
    real_step, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == at:
            hold()
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step
elif kind == "search":
    from effopd.extrapolate import Extrapolator
    real_search = Extrapolator.search

    def search(self, step, score):
        if step != at:
            return real_search(self, step, score)
        calls = []

        def scored():
            calls.append(None)
            if len(calls) == 2:  # the first call scores the start point, the second the first candidate
                hold()
            return score()

        return real_search(self, step, scored)

    Extrapolator.search = search
elif kind == "write":
    from effopd import checkpoint
    real_finish = checkpoint.finish

    def finish(root, step, *args, **kwargs):
        if step == at:
            hold()
        return real_finish(root, step, *args, **kwargs)

    checkpoint.finish = finish
elif kind != "none":
    raise SystemExit(f"unknown hold point {kind}")

from effopd.cli import main
sys.exit(main(argv))
"""


class Trainer:
    """One training subprocess with its output in files (a full pipe cannot stall it)."""

    def __init__(self, run: Path, overrides: list[str], *extra: str, hold: tuple[str, int] | None = None):
        self.run = run
        n = len(list(run.parent.glob(f"{run.name}.log-*")))
        self.log = run.parent / f"{run.name}.log-{n}"
        self.marker = run.parent / f"{run.name}.held-{n}"
        kind, at = hold or ("none", 0)
        cmd = [sys.executable, "-c", LAUNCHER, kind, str(at), str(self.marker),
               "train", "--run-dir", str(run), "--no-progress", *extra, *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count for every run: same float sums
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, what: str, ready) -> None:
        """Poll ``ready()`` until it holds; fail clearly if the run ends first or it never does."""
        deadline = time.monotonic() + WAIT_S
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"training exited (code {self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"training did not reach {what} within {WAIT_S} s:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def wait_until_held(self) -> None:
        self.wait_until(f"its hold point ({self.marker.name})", self.marker.exists)

    def finish(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"training did not finish within {timeout} s:\n{self.output()[-3000:]}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def trainers():
    """Start trainers through this; any still running at the end (a failed test) are killed."""
    started = []

    def start(*args, **kwargs) -> Trainer:
        started.append(Trainer(*args, **kwargs))
        return started[-1]

    yield start
    for t in started:
        t.stop()


def _logged_step(run: Path, step: int):
    """Whether metrics.jsonl holds a complete row for ``step`` (a line being written is not one)."""
    def ready() -> bool:
        f = run / "metrics.jsonl"
        lines = f.read_text().splitlines(keepends=True) if f.exists() else []
        return any(json.loads(line)["step"] == step for line in lines if line.endswith("\n"))
    return ready


def _reference(t: Trainer) -> dict:
    """The final weights of an uninterrupted run, started like the interrupted ones (in a
    subprocess with the same thread count: another count changes float reduction order, hence
    the last bits)."""
    assert t.finish() == 0, t.output()[-3000:]
    return checkpoint_weights(t.run, STEPS)


def _all_complete(run: Path) -> None:
    for p in (run / "checkpoints").glob("step-*"):
        assert ckpt.is_complete(p), f"{p} was renamed into place before it was complete"


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    t = Trainer(tmp_path_factory.mktemp("ref") / "run", _overrides(tiny_models))
    try:
        return _reference(t)
    finally:
        t.stop()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_finishes_the_step_checkpoints_and_says_how_to_resume(sig, tiny_models, tmp_path, trainers,
                                                                          uninterrupted):
    overrides = _overrides(tiny_models)
    run = tmp_path / "run"
    t = trainers(run, overrides)
    t.wait_until("step 2 in metrics.jsonl", _logged_step(run, 2))
    t.kill(sig)
    assert t.finish() == 128 + sig, t.output()[-3000:]
    err = t.output()
    assert f"stopped by {sig.name} after step " in err and "--resume" in err
    stopped_at = int(err.split("after step ")[1].split(";")[0])
    assert 2 <= stopped_at < STEPS  # the step under way when the signal came, finished; not the whole run
    assert ckpt.latest(run / "checkpoints").name == f"step-{stopped_at}"
    assert [r["step"] for r in metrics_rows(run)] == list(range(1, stopped_at + 1))
    t = trainers(run, overrides, "--resume")
    assert t.finish() == 0, t.output()[-3000:]
    assert_same_weights(checkpoint_weights(run, STEPS), uninterrupted)


EFFOPD = {"extrapolate.enabled": True, "extrapolate.score": "teacher_logprob", "extrapolate.schedule": "adaptive",
          "extrapolate.trigger_steps": "[2,3,4,5,6,7,8,9,10,11]", "extrapolate.val_prompts": 16,
          "extrapolate.val_greedy": True, "optim.lr": 0.03, "rollout.batch_size": 8}


@pytest.mark.slow
def test_sigkill_mid_step_mid_search_and_mid_write_then_resume_gives_the_same_weights(tiny_models, tmp_path, trainers):
    """SIGKILL inside an EffOPD search (weights at a candidate), in a step, and in a checkpoint
    write (everything but the manifest on disk), resuming after each: every ``step-N`` left is
    complete, partial ones are ignored, and the last resume reproduces the uninterrupted weights
    and the same searches."""
    overrides = _overrides(tiny_models, **EFFOPD)
    uninterrupted = _reference(trainers(tmp_path / "ref", overrides))
    ref_rows = metrics_rows(tmp_path / "ref")
    assert any((r.get("extrapolate/accepted_c") or 1) > 1 for r in ref_rows), "EffOPD never accepted: test too weak"
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"

    def killed_at(hold, *extra):
        t = trainers(run, overrides, *extra, hold=hold)
        t.wait_until_held()
        t.kill()
        assert t.finish() == -signal.SIGKILL, t.output()[-3000:]
        _all_complete(run)

    # 1. the first search (step 2), before any checkpoint: nothing to resume from, which --resume says
    killed_at(("search", 2))
    assert ckpt.latest(root) is None and [r["step"] for r in metrics_rows(run)] == [1]
    t = trainers(run, overrides, "--resume")
    assert t.finish() == 2 and "holds no complete, readable checkpoint" in t.output(), t.output()[-3000:]
    # 2. step 5 (started again with --overwrite: no checkpoint was left), between its rollout and its update
    killed_at(("update", 5), "--overwrite")
    assert ckpt.latest(root).name == "step-3" and [r["step"] for r in metrics_rows(run)] == [1, 2, 3, 4]
    # 3. writing step-6: its files are under .tmp-step-6, the manifest not yet
    killed_at(("write", 6), "--resume")
    assert (root / ".tmp-step-6" / "model.safetensors").exists() and not (root / ".tmp-step-6" / ckpt.COMPLETE).exists()
    assert not (root / "step-6").exists() and ckpt.latest(root).name == "step-3"
    # 4. the search of step 8 (step-6 written again on the way)
    killed_at(("search", 8), "--resume")
    assert ckpt.latest(root).name == "step-6" and not (root / ".tmp-step-6").exists()

    t = trainers(run, overrides, "--resume")
    assert t.finish() == 0, t.output()[-3000:]
    assert_same_weights(checkpoint_weights(run, STEPS), uninterrupted)
    pick = lambda rows: [(r["step"], r.get("extrapolate/accepted_c"), r.get("extrapolate/scores")) for r in rows]  # noqa: E731
    assert pick(metrics_rows(run)) == pick(ref_rows)
    assert not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_checkpoint_write_failure_is_clear_and_keeps_the_previous(failure, tiny_models, tmp_path, monkeypatch):
    """The second checkpoint's optimizer file hits a full disk: as an OSError, or as the
    SafetensorError that safetensors raises for it (not an OSError)."""
    from safetensors import SafetensorError

    real_save, calls = ckpt.save_state, {"n": 0}

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            if failure == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_state", failing_save)
    run = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointError, match=r"step-6.*No space left.*step-3.*intact.*--resume"):
        train_run(_overrides(tiny_models), run)
    monkeypatch.setattr(ckpt, "save_state", real_save)
    assert [p.name for p in ckpt.complete_checkpoints(run / "checkpoints")] == ["step-3"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    train_run(_overrides(tiny_models), run, resume=True)
    assert (run / "checkpoints" / "step-12").exists()


def _poison_steps(monkeypatch, bad_steps: set[int]) -> None:
    """Make the gradient of the given steps NaN, as an overflow would (at the gradient clipping
    that precedes each update; one update per step here)."""
    real, calls = Accelerator.clip_grad_norm_, {"n": 0}

    def poisoned(self, parameters, *args, **kwargs):
        calls["n"] += 1
        parameters = list(parameters)
        if calls["n"] in bad_steps:
            parameters[0].grad.fill_(float("nan"))
        return real(self, parameters, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", poisoned)


def test_nonfinite_gradient_skips_the_update(tiny_models, tmp_path, monkeypatch):
    _poison_steps(monkeypatch, {2})
    run = tmp_path / "run"
    train_run(_overrides(tiny_models, **{"train.steps": 3, "train.save_every": 1}), run)
    assert_same_weights(checkpoint_weights(run, 1), checkpoint_weights(run, 2))  # step 2 changed nothing
    assert all(torch.isfinite(t).all() for t in checkpoint_weights(run, 3).values())
    assert [r["train/nonfinite_skipped"] for r in metrics_rows(run)] == [0, 1, 1]


def test_too_many_nonfinite_steps_stop_the_run(tiny_models, tmp_path, monkeypatch):
    _poison_steps(monkeypatch, {4, 5, 6})
    run = tmp_path / "run"
    cfg = load_config([], _overrides(tiny_models, **{"train.max_nonfinite": 3}))
    with pytest.raises(NonFiniteError, match=r"3 consecutive.*step 6.*step-3"):
        train(cfg, run, progress=False)
    assert ckpt.latest(run / "checkpoints").name == "step-3"
