"""Crashes, signals, write failures and non-finite values lose nothing."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effopd import checkpoint as ckpt
from effopd import train as train_mod
from effopd.config import load_config
from effopd.train import NonFiniteError, train


def _overrides(tiny_models, **extra) -> list[str]:
    base = {
        "model.student": tiny_models["student"], "model.teacher": tiny_models["teacher"],
        "rollout.batch_size": 4, "rollout.max_new_tokens": 10, "data.eval_limit": 4, "eval.max_new_tokens": 10,
        "train.steps": 12, "train.eval_every": 0, "train.save_every": 3, "optim.lr": 1e-2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _final(run: Path, step: int) -> dict:
    return load_file(run / "checkpoints" / f"step-{step}" / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _spawn(run: Path, overrides: list[str], *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "effopd.cli", "train", "--run-dir", str(run), "--no-progress", *extra, *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("training did not reach the expected step in time")


def _reference(run: Path, overrides: list[str]) -> dict:
    """The uninterrupted run, in a subprocess with the same thread count as the interrupted ones
    (a different count changes float reduction order, hence the last bits)."""
    proc = _spawn(run, overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return _final(run, 12)


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("ref") / "run", _overrides(tiny_models))


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(tiny_models, tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = _spawn(run, _overrides(tiny_models))
    _wait_for_steps(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err
    stopped_at = int(err.split("after step ")[1].split(";")[0])
    assert ckpt.latest(run / "checkpoints").name == f"step-{stopped_at}"
    assert stopped_at < 12
    proc = _spawn(run, _overrides(tiny_models), "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _same(_final(run, 12), uninterrupted)


EFFOPD = {"extrapolate.enabled": True, "extrapolate.score": "teacher_logprob", "extrapolate.schedule": "adaptive",
          "extrapolate.trigger_steps": "[2,3,4,5,6,7,8,9,10,11]", "extrapolate.val_prompts": 16,
          "extrapolate.val_greedy": True, "optim.lr": 0.03, "rollout.batch_size": 8}


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_same_weights(tiny_models, tmp_path):
    """Killed at random moments (mid-step, mid-EffOPD-search, mid-checkpoint-write): the newest
    complete checkpoint is intact, partial ones are ignored, and resuming reproduces the
    uninterrupted weights."""
    overrides = _overrides(tiny_models, **EFFOPD)
    t0 = time.time()
    uninterrupted = _reference(tmp_path / "ref", overrides)
    duration = time.time() - t0  # kill times are fractions of it, so the test crashes on any machine speed
    rows = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert any((r.get("extrapolate/accepted_c") or 1) > 1 for r in rows), "EffOPD never accepted: test too weak"
    rng = random.Random(0)
    run = tmp_path / "run"
    kills = 0
    for attempt in range(6):
        proc = _spawn(run, overrides, *(["--resume"] if attempt else []))
        try:
            proc.wait(timeout=rng.uniform(0.4, 0.9) * duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            for p in (run / "checkpoints").glob("step-*") if (run / "checkpoints").exists() else []:
                assert ckpt.is_complete(p), f"{p} was renamed into place before it was complete"
            continue
        assert proc.returncode == 0, proc.stderr.read()[-2000:]
        break
    else:
        proc = _spawn(run, overrides, "--resume")
        assert proc.wait(timeout=300) == 0
    assert kills >= 1, "never killed: the test did not exercise a crash"
    assert _same(_final(run, 12), uninterrupted)


def test_checkpoint_write_failure_is_clear_and_keeps_the_previous(tiny_models, tmp_path, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, f, *a, **k):
        if str(f).endswith(ckpt.STATE_FILE):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    run = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointError, match=r"step-6.*No space left.*step-3.*intact.*--resume"):
        train(load_config([], _overrides(tiny_models)), run, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ckpt.complete_checkpoints(run / "checkpoints")] == ["step-3"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    train(load_config([], _overrides(tiny_models)), run, resume=True, progress=False)
    assert (run / "checkpoints" / "step-12").exists()


def _poison_steps(monkeypatch, bad_steps: set[int]) -> None:
    """Make the gradient of the given steps NaN, as an overflow would."""
    real, calls = train_mod.policy_step, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] in bad_steps:
            models = args[2]  # policy_step(cfg, accelerator, models, batch)
            next(models.student.parameters()).grad.fill_(float("nan"))
        return out

    monkeypatch.setattr(train_mod, "policy_step", poisoned)


def test_nonfinite_gradient_skips_the_update(tiny_models, tmp_path, monkeypatch):
    _poison_steps(monkeypatch, {2})
    run = tmp_path / "run"
    train(load_config([], _overrides(tiny_models, **{"train.steps": 3, "train.save_every": 1})), run, progress=False)
    w1, w2 = _final(run, 1), _final(run, 2)
    assert _same(w1, w2)  # step 2 changed nothing
    assert all(torch.isfinite(t).all() for t in _final(run, 3).values())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/nonfinite_skipped"] for r in rows] == [0, 1, 1]


def test_too_many_nonfinite_steps_stop_the_run(tiny_models, tmp_path, monkeypatch):
    _poison_steps(monkeypatch, {4, 5, 6})
    run = tmp_path / "run"
    cfg = load_config([], _overrides(tiny_models, **{"train.max_nonfinite": 3}))
    with pytest.raises(NonFiniteError, match=r"3 consecutive.*step 6.*step-3"):
        train(cfg, run, progress=False)
    assert ckpt.latest(run / "checkpoints").name == "step-3"
