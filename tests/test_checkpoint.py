import json

import pytest

from effopd import checkpoint as ckpt


def _fake_checkpoint(root, step, world=1):
    tmp = ckpt.begin(root, step)
    (tmp / "config.json").write_text("{}")
    (tmp / ckpt.STATE_FILE).write_bytes(b"state")
    for r in range(world):
        ckpt.save_rng(tmp, r)
    return ckpt.finish(root, step, world)


def test_finish_renames_and_writes_manifest(tmp_path):
    path = _fake_checkpoint(tmp_path, 3)
    assert path.name == "step-3" and not (tmp_path / ".tmp-step-3").exists()
    manifest = json.loads((path / ckpt.COMPLETE).read_text())
    assert manifest["step"] == 3 and "config.json" in manifest["files"]
    assert ckpt.latest(tmp_path) == path


def test_incomplete_checkpoints_are_ignored(tmp_path):
    good = _fake_checkpoint(tmp_path, 1)
    (tmp_path / "step-2").mkdir()  # e.g. copied by hand without a manifest
    (tmp_path / "step-2" / "config.json").write_text("{}")
    bad = _fake_checkpoint(tmp_path, 3)
    (bad / "config.json").unlink()  # a file listed in the manifest went missing
    with pytest.warns(UserWarning, match="incomplete"):
        assert ckpt.latest(tmp_path) == good


def test_missing_rank_file_refuses_to_complete(tmp_path):
    tmp = ckpt.begin(tmp_path, 5)
    (tmp / "config.json").write_text("{}")
    (tmp / ckpt.STATE_FILE).write_bytes(b"x")
    ckpt.save_rng(tmp, 0)
    with pytest.raises(ckpt.CheckpointError, match="rng-rank1"):
        ckpt.finish(tmp_path, 5, world_size=2)
    assert ckpt.latest(tmp_path) is None


def test_keep_last_prunes_only_after_new_is_complete(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    tmp = ckpt.begin(tmp_path, 4)
    (tmp / "config.json").write_text("{}")
    (tmp / ckpt.STATE_FILE).write_bytes(b"x")
    ckpt.save_rng(tmp, 0)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.finish(tmp_path, 4, world_size=2, keep_last=1)  # fails: nothing may be deleted
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-1", "step-2", "step-3"]
    ckpt.save_rng(tmp, 1)
    ckpt.finish(tmp_path, 4, world_size=2, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-3", "step-4"]


def test_resaving_a_step_replaces_it(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    path = _fake_checkpoint(tmp_path, 2)
    assert ckpt.is_complete(path) and not (tmp_path / ".old-step-2").exists()


def test_resume_and_analysis_list_the_same_checkpoints(tmp_path):
    """One complete and one incomplete step-N checkpoint: resume (checkpoint.complete_checkpoints)
    and the analysis (analysis.io.list_checkpoints) both see the complete one only."""
    from effopd.analysis.io import list_checkpoints

    complete = _fake_checkpoint(tmp_path, 4)
    incomplete = _fake_checkpoint(tmp_path, 8)
    (incomplete / ckpt.STATE_FILE).unlink()  # listed in the manifest, gone from disk
    with pytest.warns(UserWarning, match="step-8"):
        resume_view = ckpt.complete_checkpoints(tmp_path)
    with pytest.warns(UserWarning, match="step-8"):
        analysis_view = list_checkpoints(tmp_path)
    assert resume_view == [complete]
    assert analysis_view == [(4, complete)]
    with pytest.warns(UserWarning, match="step-8"):
        assert ckpt.step_checkpoints(tmp_path) == analysis_view


def test_manifest_is_written_atomically_next_to_nothing_else(tmp_path):
    path = _fake_checkpoint(tmp_path, 1)
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(json.loads((path / ckpt.COMPLETE).read_text())["files"] + [ckpt.COMPLETE])
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
