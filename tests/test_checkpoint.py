import json
import pickle
import random

import numpy as np
import pytest
import torch

from effopd import checkpoint as ckpt

from conftest import PicklePayload


def _optimizer(steps: int = 2):
    p = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
    q = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p, q], lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for i in range(steps):
        p.grad, q.grad = torch.full_like(p, 0.3 + i), torch.full_like(q, -0.1 * i)
        opt.step()
    return (p, q), opt


def _write_state(tmp, step=1):
    (tmp / "config.json").write_text("{}")
    _, opt = _optimizer()
    ckpt.save_state(tmp, {"step": step, "scheduler": {"last_epoch": step}, "sampler": {"epoch": 0, "cursor": 4}},
                    opt.state_dict())


def _fake_checkpoint(root, step, world=1):
    tmp = ckpt.begin(root, step)
    _write_state(tmp, step)
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
    _write_state(tmp)
    ckpt.save_rng(tmp, 0)
    with pytest.raises(ckpt.CheckpointError, match="rng-rank1"):
        ckpt.finish(tmp_path, 5, world_size=2)
    assert ckpt.latest(tmp_path) is None


def test_keep_last_prunes_only_after_new_is_complete(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    tmp = ckpt.begin(tmp_path, 4)
    _write_state(tmp)
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
    assert names == sorted([*json.loads((path / ckpt.COMPLETE).read_text())["files"], ckpt.COMPLETE])
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


# ---- state that cannot run code, verified on resume ----------------------------------------


def test_optimizer_state_round_trips_and_the_next_step_is_identical(tmp_path):
    (p, q), opt = _optimizer()
    ckpt.save_state(tmp_path, {"step": 2}, opt.state_dict())
    state = ckpt.load_state(tmp_path)
    assert state["step"] == 2
    (p2, q2), opt2 = _optimizer(steps=0)
    with torch.no_grad():
        p2.copy_(p), q2.copy_(q)
    opt2.load_state_dict(state["optimizer"])
    for params, o in (((p, q), opt), ((p2, q2), opt2)):
        params[0].grad, params[1].grad = torch.full_like(p, 0.7), torch.full_like(q, 0.2)
        o.step()
    assert torch.equal(p, p2) and torch.equal(q, q2)


def test_rng_round_trips(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    ckpt.save_rng(tmp_path, 0)
    first = (random.random(), float(np.random.randn()), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.load_rng(tmp_path, 0)
    again = (random.random(), float(np.random.randn()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_a_pickled_trainer_state_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    path = _fake_checkpoint(tmp_path / "ck", 1)
    (path / ckpt.STATE_FILE).unlink()
    (path / ckpt.LEGACY_STATE_FILE).write_bytes(pickle.dumps({"step": 1, "x": PicklePayload(marker)}))
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.pt.*pickle"):
        ckpt.load_state(path)
    assert not marker.exists()


def test_a_checkpoint_with_a_wrong_size_is_incomplete(tmp_path):
    path = _fake_checkpoint(tmp_path, 1)
    with open(path / ckpt.OPTIMIZER_FILE, "ab") as f:
        f.write(b"x")
    assert not ckpt.is_complete(path)


def test_resumable_skips_an_unreadable_newest_checkpoint(tmp_path):
    good = _fake_checkpoint(tmp_path, 1)
    bad = _fake_checkpoint(tmp_path, 2)
    (bad / ckpt.STATE_FILE).write_text('{"step": 2, "optim')  # torn, and the manifest rewritten to match
    manifest = json.loads((bad / ckpt.COMPLETE).read_text())
    manifest["files"][ckpt.STATE_FILE] = (bad / ckpt.STATE_FILE).stat().st_size
    (bad / ckpt.COMPLETE).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"step-2.*trainer_state\.json"):
        assert ckpt.resumable(tmp_path, 1) == good


def test_recover_cleans_temporaries_and_restores_an_interrupted_resave(tmp_path):
    path = _fake_checkpoint(tmp_path, 2)
    path.rename(tmp_path / ".old-step-2")  # a crash between the two renames of a re-save
    ckpt.begin(tmp_path, 3)  # a save that never finished
    with pytest.warns(UserWarning, match="restoring step-2"):
        ckpt.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"] and ckpt.is_complete(tmp_path / "step-2")
