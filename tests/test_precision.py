"""Precision and scale settings of the trainer: float32 master weights under bf16 frozen models and
bf16 autocast, gradient checkpointing, trackers, and one temperature convention for every method."""

from __future__ import annotations

import pytest
import torch

from effopd.config import ConfigError, load_config
from effopd.methods import METHODS
from effopd.models import load_model, load_tokenizer
from effopd.train import load_models

from conftest import checkpoint_weights, metrics_rows, tiny_overrides, train_run


def _changed_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).float().mean().item()


def _trained_2d(init: dict, after: dict) -> dict[str, float]:
    """Changed fraction of every 2-D weight but the embeddings (a response touches only a few rows)."""
    return {n: _changed_fraction(init[n].float(), after[n].float()) for n in after
            if after[n].ndim == 2 and "embed" not in n and "lm_head" not in n}


def test_bf16_frozen_models_and_a_tiny_lr_still_move_every_trained_weight(tiny_models, tmp_path):
    """At lr 1e-6 an AdamW step moves each weight by ~1e-6, far below bf16's resolution at 0.02
    (2^-7 * 0.02 ~ 1.6e-4): a bf16 student would keep almost every element. The student keeps float32
    master weights, so most elements of every trained matrix change."""
    run = tmp_path / "run"
    train_run(tiny_overrides(tiny_models, **{"model.dtype": "bfloat16", "optim.lr": 1e-6, "train.steps": 1,
                                             "train.eval_every": 0}), run)
    init = load_model(tiny_models["student"], "student").state_dict()
    after = checkpoint_weights(run, 1)
    assert all(t.dtype == torch.float32 for t in after.values())
    fractions = _trained_2d(init, after)
    assert fractions and min(fractions.values()) > 0.5, fractions


def test_frozen_models_take_model_dtype_and_the_student_stays_float32(tiny_models):
    cfg = load_config([], tiny_overrides(tiny_models, **{"model.dtype": "bfloat16", "loss.method": "gopd"}))
    models = load_models(cfg, "cpu")
    assert next(models.student.parameters()).dtype == torch.float32
    assert next(models.teacher.parameters()).dtype == torch.bfloat16
    assert next(models.base.parameters()).dtype == torch.bfloat16


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set: start
    and leave this test with none, so it neither inherits nor leaks bf16."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_trains_float32_master_weights(tiny_models, tmp_path, fresh_accelerator_state):
    run = tmp_path / "run"
    train_run(tiny_overrides(tiny_models, **{"train.mixed_precision": "bf16", "train.steps": 1, "train.eval_every": 0,
                                             "train.device": "cpu"}), run)
    rows = metrics_rows(run)
    assert torch.isfinite(torch.tensor(rows[-1]["train/loss"]))
    after = checkpoint_weights(run, 1)
    assert all(t.dtype == torch.float32 for t in after.values())
    init = load_model(tiny_models["student"], "student").state_dict()
    assert min(_trained_2d(init, after).values()) > 0.5


def test_gradient_checkpointing_gives_the_same_update(tiny_models, tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    base = {"train.steps": 1, "train.eval_every": 0}
    train_run(tiny_overrides(tiny_models, **base), plain)
    train_run(tiny_overrides(tiny_models, **base, **{"train.gradient_checkpointing": True}), ckpt)
    a, b = checkpoint_weights(plain, 1), checkpoint_weights(ckpt, 1)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_tensorboard_receives_every_step(tiny_models, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train_run(tiny_overrides(tiny_models, **{"train.report_to": "[tensorboard]"}), run)
    scalars = {}
    for d in {p.parent for p in (run / "trackers").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(d))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            scalars[d] = acc
    assert len(scalars) == 1, sorted(scalars)  # one run's curves (the config goes beside them as hparams)
    acc = scalars.popitem()[1]
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2]
    assert [e.value for e in losses] == pytest.approx([r["train/loss"] for r in metrics_rows(run)[1:]], rel=1e-6)
    assert "eval/accuracy" in acc.Tags()["scalars"]


@pytest.mark.parametrize("bad, key", [
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["train.report_to=[tensorbord]"], "train.report_to"),
    (["model.dtype=float64"], "model.dtype"),
    (["rollout.generation_batch_size=0"], "rollout.generation_batch_size"),
    (["train.logit_chunk=0"], "train.logit_chunk"),
])
def test_bad_precision_settings_are_named(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], bad)


# ---- one temperature convention ------------------------------------------------------------


def _reference_logprobs(model, rollout, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each response token, from one full forward pass (the slow way)."""
    ids = torch.cat([rollout.prompt_ids_BP, rollout.response_ids_BT], 1)
    mask = torch.cat([rollout.prompt_mask_BP, rollout.response_mask_BT], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    T, P = rollout.response_ids_BT.shape[1], rollout.prompt_ids_BP.shape[1]
    lp = torch.log_softmax(logits[:, P - 1 : P - 1 + T] / temperature, -1)
    return lp.gather(-1, rollout.response_ids_BT[..., None]).squeeze(-1) * rollout.response_mask_BT


def test_opd_and_gkd_temper_the_teacher_like_the_student(tiny_models):
    """At rollout.temperature = 0.7 the OPD advantage is log softmax(t/0.7) - log softmax(s/0.7) of
    each sampled token, and GKD's teacher distribution at the same token is that same softmax(t/0.7)."""
    from effopd.methods import Batch, Models, _opd
    from effopd.rollout import generate
    from effopd.scoring import response_logits, token_logprobs

    cfg = load_config([], tiny_overrides(tiny_models, **{"rollout.temperature": 0.7}))
    tok = load_tokenizer(tiny_models["student"])
    models = Models(load_model(tiny_models["student"], "student"), load_model(tiny_models["teacher"], "teacher"), None, tok)
    torch.manual_seed(0)
    ro = generate(models.student, tok, ["12+34=", "5-3+8="], max_new_tokens=8, temperature=0.7)
    batch = Batch(ro, ["46", "10"])
    METHODS["opd"].prepare(cfg, models, batch)

    teacher_ref = _reference_logprobs(models.teacher, ro, 0.7)
    student_ref = _reference_logprobs(models.student, ro, 0.7)
    torch.testing.assert_close(batch.signals["teacher_logp_BT"], teacher_ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        student_lp = token_logprobs(models.student, ro, temperature=0.7)
        adv = _opd(batch, student_lp, ro.response_mask_BT, cfg)
    torch.testing.assert_close(adv, (teacher_ref - student_ref) * ro.response_mask_BT, atol=1e-5, rtol=0)
    # GKD compares full distributions; its teacher side at the sampled token is the same number
    with torch.no_grad():
        gkd_teacher = torch.log_softmax(response_logits(models.teacher, ro, 0.7), -1)
    gkd_at_token = gkd_teacher.gather(-1, ro.response_ids_BT[..., None]).squeeze(-1) * ro.response_mask_BT
    torch.testing.assert_close(gkd_at_token, teacher_ref, atol=1e-5, rtol=0)
