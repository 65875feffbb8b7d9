"""The run directory and resume under bad inputs: --overwrite deletes only a run, --resume needs
something to resume, a damaged newest checkpoint falls back to the one before it, and a crafted
pickle in a checkpoint never runs."""

from __future__ import annotations

import json
import pickle

import pytest

from effopd import checkpoint as ckpt
from effopd import cli
from effopd.config import load_config
from effopd.train import RunDirError, train

from conftest import PicklePayload, assert_same_weights, checkpoint_weights, metrics_rows, tiny_overrides, train_run


def _args(tiny_models, run, *extra, **overrides):
    return ["train", "--run-dir", str(run), "--no-progress", *extra, *tiny_overrides(tiny_models, **overrides)]


def test_overwrite_refuses_a_directory_that_holds_no_run(tiny_models, tmp_path, capsys):
    d = tmp_path / "thesis"
    (d / "src").mkdir(parents=True)
    (d / "thesis.tex").write_text("chapter 1")
    (d / "src" / "code.py").write_text("print(1)")
    assert cli.main(_args(tiny_models, d, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "holds no run" in err and str(d) in err
    assert (d / "thesis.tex").read_text() == "chapter 1" and (d / "src" / "code.py").read_text() == "print(1)"


def test_overwrite_deletes_the_run_and_keeps_other_files(tiny_models, tmp_path):
    run = tmp_path / "run"
    train_run(tiny_overrides(tiny_models, **{"train.steps": 1}), run)
    (run / "notes.md").write_text("keep me")
    assert cli.main(_args(tiny_models, run, "--overwrite", **{"train.steps": 1, "train.eval_every": 0})) == 0
    assert (run / "notes.md").read_text() == "keep me"
    # the old run evaluated at steps 0 and 1; the new one (eval_every=0) only at its end
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step-1.jsonl"]
    assert [r["step"] for r in metrics_rows(run)] == [1]


@pytest.mark.parametrize("setup", ["missing", "empty", "no checkpoint"])
def test_resume_without_a_checkpoint_is_an_error(setup, tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    if setup == "empty":
        run.mkdir()
    elif setup == "no checkpoint":
        run.mkdir()
        (run / "config.yaml").write_text("{}")
        (run / "metrics.jsonl").write_text('{"step": 0}\n')
    assert cli.main(_args(tiny_models, run, "--resume")) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and str(run) in err
    assert setup != "missing" or not run.exists()


def test_a_torn_newest_checkpoint_falls_back_and_resumes_exactly(tiny_models, tmp_path):
    """Steps 1-4 uninterrupted, against a run whose newest checkpoint (step 4) is torn: resume
    warns, falls back to step 2, re-runs steps 3-4 and ends bitwise equal."""
    o = tiny_overrides(tiny_models, **{"train.steps": 4, "train.save_every": 2, "train.eval_every": 2})
    train_run(o, tmp_path / "a")
    run = tmp_path / "b"
    cfg = load_config([], tiny_overrides(tiny_models, **{"train.steps": 4, "train.save_every": 2, "train.eval_every": 2}))
    train(cfg, run, progress=False)
    newest = run / "checkpoints" / "step-4"
    (newest / ckpt.OPTIMIZER_FILE).write_bytes(b"\x00" * 16)  # truncated by a crash ...
    manifest = json.loads((newest / ckpt.COMPLETE).read_text())  # ... after the manifest was written
    manifest["files"][ckpt.OPTIMIZER_FILE] = 16
    (newest / ckpt.COMPLETE).write_text(json.dumps(manifest))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # and a torn last line
    with pytest.warns(UserWarning, match=r"step-4.*optimizer\.safetensors"):
        train(cfg, run, resume=True, progress=False)
    assert_same_weights(checkpoint_weights(tmp_path / "a", 4), checkpoint_weights(run, 4))
    assert [r["step"] for r in metrics_rows(run)] == [r["step"] for r in metrics_rows(tmp_path / "a")]


def test_a_crafted_pickle_in_a_checkpoint_never_runs(tiny_models, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    train_run(tiny_overrides(tiny_models, **{"train.steps": 1}), run)
    ck = run / "checkpoints" / "step-1"
    (ck / ckpt.STATE_FILE).unlink()
    (ck / ckpt.LEGACY_STATE_FILE).write_bytes(pickle.dumps({"step": 1, "optimizer": PicklePayload(marker)}))
    manifest = json.loads((ck / ckpt.COMPLETE).read_text())
    manifest["files"] = {f: (ck / f).stat().st_size for f in [*manifest["files"], ckpt.LEGACY_STATE_FILE]
                         if (ck / f).exists()}
    (ck / ckpt.COMPLETE).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"trainer_state\.pt"):
        assert cli.main(_args(tiny_models, run, "--resume", **{"train.steps": 1})) == 2
    assert "no complete, readable checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_resume_refuses_a_file_as_run_dir(tiny_models, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        train(load_config([], tiny_overrides(tiny_models)), f, progress=False)
