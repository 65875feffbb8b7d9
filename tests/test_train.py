"""End-to-end trainer tests on tiny random models (CPU, seconds each)."""

from __future__ import annotations


import pytest
import torch

from effopd import cli
from effopd import train as train_mod
from effopd.config import load_config
from effopd.train import RunDirError, train

from conftest import assert_same_weights, checkpoint_weights, metrics_rows, tiny_overrides


def _crash_in_step(monkeypatch, step: int, run) -> None:
    """Run ``run()`` with the update of ``step`` raising, as a crash mid-run would."""
    real, calls = train_mod.optimize, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "optimize", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run()
    monkeypatch.setattr(train_mod, "optimize", real)


def test_cli_two_step_smoke(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--run-dir", str(run), "--no-progress", *tiny_overrides(tiny_models)]) == 0
    assert (run / "config.yaml").exists()
    lines = metrics_rows(run)
    assert [x["step"] for x in lines] == [0, 1, 2]
    for key in ("train/loss", "train/reverse_kl", "train/reward", "train/grad_norm", "time/rollout", "time/score", "time/update", "eval/accuracy"):
        assert key in lines[1], key
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step-0.jsonl", "step-1.jsonl", "step-2.jsonl"]
    ck = run / "checkpoints" / "step-2"
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "optimizer.safetensors", "rng-rank0.safetensors", "COMPLETE"} <= {p.name for p in ck.iterdir()}
    # the checkpoint is a plain HF model, and training moved it away from the init
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ck)
    init = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    moved = sum((p - q).abs().sum().item() for p, q in zip(model.parameters(), init.parameters()))
    assert moved > 0
    assert "eval/accuracy" in capsys.readouterr().out


def test_existing_run_dir_is_refused(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--no-progress", *tiny_overrides(tiny_models, **{"train.steps": 1})]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(run) in err
    assert cli.main(args + ["--overwrite"]) == 0


def test_resume_changing_the_trajectory_is_refused(tiny_models, tmp_path):
    run = tmp_path / "run"
    train(load_config([], tiny_overrides(tiny_models, **{"train.steps": 1})), run, progress=False)
    with pytest.raises(RunDirError, match="optim.lr"):
        train(load_config([], tiny_overrides(tiny_models, **{"optim.lr": 0.5})), run, resume=True, progress=False)


def test_resume_equals_uninterrupted(tiny_models, tmp_path, monkeypatch):
    """4 uninterrupted steps == 2 steps, a crash in step 3, and --resume to step 4 (bitwise)."""
    cfg = load_config([], tiny_overrides(tiny_models, **{"train.steps": 4, "train.save_every": 2, "train.eval_every": 2}))
    train(cfg, tmp_path / "a", progress=False)

    _crash_in_step(monkeypatch, 3, lambda: train(cfg, tmp_path / "b", progress=False))
    assert not (tmp_path / "b" / "checkpoints" / "step-4").exists()
    train(cfg, tmp_path / "b", resume=True, progress=False)

    assert_same_weights(checkpoint_weights(tmp_path / "a", 4), checkpoint_weights(tmp_path / "b", 4))
    a = metrics_rows(tmp_path / "a")
    b = metrics_rows(tmp_path / "b")
    assert [x["step"] for x in b] == [x["step"] for x in a]
    assert [x.get("train/loss") for x in b] == [x.get("train/loss") for x in a]


def test_evaluation_does_not_change_training(tiny_models, tmp_path):
    with_eval = load_config([], tiny_overrides(tiny_models, **{"train.steps": 3, "train.eval_every": 1}))
    without = load_config([], tiny_overrides(tiny_models, **{"train.steps": 3, "train.eval_every": 0}))
    train(with_eval, tmp_path / "a", progress=False)
    train(without, tmp_path / "b", progress=False)
    assert_same_weights(checkpoint_weights(tmp_path / "a", 3), checkpoint_weights(tmp_path / "b", 3))


def test_gopd_lambda_one_equals_opd(tiny_models, tmp_path):
    train(load_config([], tiny_overrides(tiny_models)), tmp_path / "opd", progress=False)
    train(load_config([], tiny_overrides(tiny_models, **{"loss.method": "gopd", "loss.lam": 1.0})), tmp_path / "gopd", progress=False)
    a, b = checkpoint_weights(tmp_path / "opd", 2), checkpoint_weights(tmp_path / "gopd", 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_micro_batches_equal_one_batch(tiny_models, tmp_path):
    train(load_config([], tiny_overrides(tiny_models, **{"train.steps": 1})), tmp_path / "a", progress=False)
    train(load_config([], tiny_overrides(tiny_models, **{"train.steps": 1, "train.micro_batch_size": 3})), tmp_path / "b", progress=False)
    a, b = checkpoint_weights(tmp_path / "a", 1), checkpoint_weights(tmp_path / "b", 1)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


# ---- EffOPD wired into the loop ------------------------------------------------------------


def test_effopd_that_never_accepts_is_bitwise_plain_opd(tiny_models, tmp_path):
    """Random tiny models never solve a problem, so every reward score ties s0 and no candidate
    is accepted: the run must then equal plain OPD bitwise (validation never touches training)."""
    plain = load_config([], tiny_overrides(tiny_models, **{"train.steps": 4, "train.eval_every": 0}))
    eff = load_config([], tiny_overrides(tiny_models, **{"train.steps": 4, "train.eval_every": 0, "extrapolate.enabled": True,
                                                    "extrapolate.val_prompts": 6}))
    train(plain, tmp_path / "plain", progress=False)
    train(eff, tmp_path / "eff", progress=False)
    assert_same_weights(checkpoint_weights(tmp_path / "plain", 4), checkpoint_weights(tmp_path / "eff", 4))
    rows = metrics_rows(tmp_path / "eff")
    searched = [r["step"] for r in rows if "extrapolate/accepted_c" in r]
    assert searched == [1, 2, 4]
    assert all(r["extrapolate/accepted_c"] == 1.0 and r["extrapolate/candidates"] == [3.0] for r in rows if r["step"] in searched)


def test_effopd_selection_leaves_embeddings_and_norms(tiny_models):
    from effopd.models import load_model
    from effopd.module_groups import module_group
    from effopd.train import make_extrapolator

    cfg = load_config([], tiny_overrides(tiny_models, **{"extrapolate.enabled": True}))
    model = load_model(tiny_models["student"], "student")
    ex = make_extrapolator(cfg, model)
    types = {module_group(n).type for n in ex.params}
    assert types == {"q", "k", "v", "o", "gate", "up", "down"}
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in ex.params)


@pytest.mark.parametrize("schedule", ["adaptive", "lookahead"])
def test_resume_mid_effopd_equals_uninterrupted(tiny_models, tmp_path, monkeypatch, schedule):
    """A continuous score (teacher logprob) accepts candidates; resuming restores the anchor,
    the history, the adaptive gain and the lookahead momentum exactly."""
    cfg = load_config([], tiny_overrides(tiny_models, **{
        "train.steps": 4, "train.save_every": 2, "train.eval_every": 0, "extrapolate.enabled": True,
        "extrapolate.score": "teacher_logprob", "extrapolate.schedule": schedule, "extrapolate.trigger_steps": "[2,3,4]",
        "extrapolate.val_prompts": 16, "extrapolate.val_greedy": True, "optim.lr": 0.05, "rollout.batch_size": 8,
    }))
    train(cfg, tmp_path / "a", progress=False)
    _crash_in_step(monkeypatch, 3, lambda: train(cfg, tmp_path / "b", progress=False))
    assert (tmp_path / "b" / "checkpoints" / "step-2").exists() and not (tmp_path / "b" / "checkpoints" / "step-4").exists()
    train(cfg, tmp_path / "b", resume=True, progress=False)
    assert_same_weights(checkpoint_weights(tmp_path / "a", 4), checkpoint_weights(tmp_path / "b", 4))
    rows = {k: metrics_rows(tmp_path / k) for k in "ab"}
    pick = lambda rs: [(r["step"], r.get("extrapolate/accepted_c"), r.get("extrapolate/scores")) for r in rs]  # noqa: E731
    assert pick(rows["a"]) == pick(rows["b"])
    if schedule == "adaptive":
        assert any((r.get("extrapolate/accepted_c") or 1.0) > 1.0 for r in rows["a"]), "no candidate accepted: test too weak"
    else:  # the momentum of steps 2's search is in the checkpoint and shapes step 4's candidates
        from safetensors.torch import load_file

        from effopd.extrapolate import ANCHOR_FILE
        saved = load_file(tmp_path / "b" / "checkpoints" / "step-2" / ANCHOR_FILE)
        assert any(k.startswith("velocity/") for k in saved) and any(k.startswith("model.") for k in saved)


def test_a_failed_start_leaves_no_run_dir(tiny_models, tmp_path):
    from effopd.models import ModelLoadError

    run = tmp_path / "run"
    with pytest.raises(ModelLoadError):
        train(load_config([], tiny_overrides(tiny_models, **{"model.teacher": str(tmp_path / "missing")})), run, progress=False)
    assert not run.exists()  # so the corrected command is not refused as "already holds a run"


def test_the_default_effopd_rule_trains(tiny_models, tmp_path):
    """extrapolate.enabled=true with the shipped rule (rank1, paired, margin 1): searches at steps
    1 and 2 with the paper's factors, logged, and the anchor is checkpointed."""
    from effopd.config import ExtrapolateConfig

    d = ExtrapolateConfig()
    cfg = load_config([], tiny_overrides(tiny_models, **{
        "train.steps": 2, "train.eval_every": 0, "extrapolate.enabled": True, "extrapolate.val_prompts": 6,
        "extrapolate.schedule": d.schedule, "extrapolate.accept": d.accept, "extrapolate.margin": d.margin}))
    train(cfg, tmp_path / "run", progress=False)
    rows = [r for r in metrics_rows(tmp_path / "run") if "extrapolate/accepted_c" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["extrapolate/candidates"][0] == 3.0 and r["extrapolate/accepted_c"] in [1.0, *r["extrapolate/candidates"]]
               for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "extrapolate_anchor.safetensors").exists()


def test_the_reward_of_opd_samples_is_only_checked_when_logged(tiny_models, tmp_path, monkeypatch):
    """train.log_reward=false: an OPD step checks no answer and logs no train/reward; the
    default logs it."""
    from effopd import methods

    train(load_config([], tiny_overrides(tiny_models, **{"train.steps": 1})), tmp_path / "on", progress=False)
    assert "train/reward" in metrics_rows(tmp_path / "on")[-1]

    def no_check(*args):
        raise AssertionError("the answer checker ran")

    monkeypatch.setattr(methods, "reward", no_check)
    train(load_config([], tiny_overrides(tiny_models, **{"train.steps": 1, "train.log_reward": False, "train.eval_every": 0})),
          tmp_path / "off", progress=False)
    assert not any("train/reward" in r for r in metrics_rows(tmp_path / "off"))


def test_a_packed_run_trains_like_the_padded_one(tiny_models, tmp_path):
    """Three OPD steps with the CPU default (packed scoring and update) and with padded,
    length-bucketed batches: the same samples every step (the weights agree closely enough
    that sampling does not diverge) and final weights within a relative 1e-5 of each other."""
    common = {"train.steps": 3, "train.eval_every": 0, "train.save_every": 3, "rollout.batch_size": 16, "train.device": "cpu"}
    train(load_config([], tiny_overrides(tiny_models, **common)), tmp_path / "packed", progress=False)
    train(load_config([], tiny_overrides(tiny_models, **common, **{"train.pack": False, "train.update_buckets": 2})),
          tmp_path / "padded", progress=False)
    rows = [[r["train/response_length"] for r in metrics_rows(tmp_path / d) if "train/loss" in r] for d in ("packed", "padded")]
    assert rows[0] == rows[1]
    a, b = checkpoint_weights(tmp_path / "packed", 3), checkpoint_weights(tmp_path / "padded", 3)
    for k in a:
        assert float((a[k] - b[k]).norm()) <= 1e-5 * float(a[k].norm()), k
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two different computations, not one run twice
