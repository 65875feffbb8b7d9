"""Sampling the next batch during the update (``rollout.off_policy_steps=1``, ``effopd.ahead``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import assert_same_weights, checkpoint_weights, metrics_rows, tiny_overrides, train_run
from effopd.ahead import SampleAhead
from effopd.config import ConfigError, load_config
from effopd.rollout import generate
from effopd.scoring import score
from effopd.utils import isolated_rng

PROMPTS = ["1+2=", "10+20+30-5=", "3=", "45-12+7=", "99-1=", "2+2+2+2+2="]


def test_the_batch_sampled_ahead_comes_from_the_weights_before_the_update(tiny_student):
    """The student's weights change while the worker samples (as the optimizer changes them in
    place): the sampler's logprobs are still those of the weights at start(), to 1e-4, and not
    those of the changed weights."""
    tok, model = tiny_student
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ahead = SampleAhead(model, contextlib.nullcontext)
    with isolated_rng(0):
        ahead.start(lambda m: generate(m, tok, PROMPTS, max_new_tokens=12, keep_logprobs=True))
        with torch.no_grad():  # "the update"
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        ro = ahead.take()
    assert not ahead.pending and ro.response_mask_BT.sum() > len(PROMPTS)
    moved = score(model, ro)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    torch.testing.assert_close(ro.logp_BT, score(model, ro), rtol=0, atol=1e-4)
    assert (ro.logp_BT - moved).abs().max() > 1e-2
    # the next start copies the weights as they are then
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    with isolated_rng(1):
        ahead.start(lambda m: generate(m, tok, PROMPTS, max_new_tokens=12, keep_logprobs=True))
        ro = ahead.take()
    torch.testing.assert_close(ro.logp_BT, score(model, ro), rtol=0, atol=1e-4)


def test_an_error_on_the_worker_is_raised_on_the_caller(tiny_student):
    _, model = tiny_student
    ahead = SampleAhead(model, contextlib.nullcontext)

    def fail(m):
        raise ValueError("the prompt file went away")

    ahead.start(fail)
    with pytest.raises(ValueError, match="the prompt file went away"):
        ahead.take()
    assert not ahead.pending
    with pytest.raises(RuntimeError, match="not taken"):
        ahead.start(lambda m: 1)
        ahead.start(lambda m: 2)
    assert ahead.take() == 1


def test_threads_are_shared_while_the_worker_runs_and_restored_after(tiny_student):
    _, model = tiny_student
    torch.set_num_threads(2)
    seen = []
    ahead = SampleAhead(model, contextlib.nullcontext)
    ahead.start(lambda m: seen.append(torch.get_num_threads()))
    ahead.wait()
    assert seen == [1] and torch.get_num_threads() == 2


def _ahead(tiny_models, **extra) -> list[str]:
    return tiny_overrides(tiny_models, **{"rollout.off_policy_steps": 1, "train.steps": 4, "train.save_every": 2,
                                          "train.eval_every": 0, **extra})


def test_a_run_sampling_ahead_trains_off_policy_and_resumes_exactly(tiny_models, tmp_path, monkeypatch):
    """Steps 2 and 4 train on batches sampled during the previous update; step 3 follows a
    checkpoint, so it samples on-policy. The importance weight is on. A run killed in step 3 and
    resumed ends with the uninterrupted run's weights, bitwise."""
    from effopd import train as train_mod

    train_run(_ahead(tiny_models), tmp_path / "a")
    rows = [r for r in metrics_rows(tmp_path / "a") if "train/loss" in r]
    assert [r["train/sampled_ahead"] for r in rows] == [0.0, 1.0, 0.0, 1.0]
    assert "rollout_is: true" in (tmp_path / "a" / "config.yaml").read_text()

    real = train_mod.optimize
    calls = []

    def crash_in_step_3(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "optimize", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_run(_ahead(tiny_models), tmp_path / "b")
    monkeypatch.setattr(train_mod, "optimize", real)
    train_run(_ahead(tiny_models), tmp_path / "b", resume=True)
    assert_same_weights(checkpoint_weights(tmp_path / "a", 4), checkpoint_weights(tmp_path / "b", 4))

    on_policy = tmp_path / "on"
    train_run(_ahead(tiny_models, **{"rollout.off_policy_steps": 0}), on_policy)
    a2, on2 = checkpoint_weights(tmp_path / "a", 2), checkpoint_weights(on_policy, 2)
    assert any(not torch.equal(a2[k], on2[k]) for k in a2)  # the batch of step 2 came from older weights


@pytest.mark.parametrize("extra, match", [
    ({"loss.method": "sft"}, "samples on-policy only"),
    ({"loss.method": "dapo", "rollout.n": 2}, "no dynamic sampling"),
    ({"rollout.off_policy_steps": 2}, "must be 0"),
    ({"rollout.backend": "hf"}, "rollout.backend=lean"),
])
def test_sampling_ahead_is_refused_where_nothing_corrects_for_it(tiny_models, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], tiny_overrides(tiny_models, **{"rollout.off_policy_steps": 1, **extra}))


def test_a_generator_of_its_own_leaves_the_global_stream_alone(tiny_student):
    """generate(generator=g) and a thread's sampling_generator(g) draw from g only: the same
    seed gives the same samples, and the global generator is not advanced. The hf engine
    (Hugging Face generate takes no generator) refuses one."""
    from effopd.rollout import sampling_generator

    tok, model = tiny_student
    state = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, max_new_tokens=10, generator=torch.Generator().manual_seed(5))
    with sampling_generator(torch.Generator().manual_seed(5)):
        b = generate(model, tok, PROMPTS, max_new_tokens=10)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.response_ids_BT, b.response_ids_BT) and a.response_mask_BT.sum() > len(PROMPTS)
    c = generate(model, tok, PROMPTS, max_new_tokens=10, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a.response_ids_BT[:, :3], c.response_ids_BT[:, :3])
    with pytest.raises(ValueError, match="rollout.backend=lean"):
        generate(model, tok, PROMPTS, max_new_tokens=10, backend="hf", generator=torch.Generator().manual_seed(5))


def test_an_error_in_the_update_cancels_the_batch_and_is_the_one_raised(tiny_student):
    """during(): the block's error wins over the worker's; the batch is cancelled and the global
    generator is back where it was before the worker's seed was drawn."""
    _, model = tiny_student
    ahead = SampleAhead(model, contextlib.nullcontext)
    state = torch.get_rng_state()

    def fail(m):
        raise ValueError("the worker failed too")

    with pytest.raises(KeyError, match="the update failed"):
        with ahead.during(fail):
            raise KeyError("the update failed")
    assert not ahead.pending and torch.equal(torch.get_rng_state(), state)
    with ahead.during(lambda m: "next batch"):
        pass
    assert ahead.take() == "next batch"
    with ahead.during(None):  # nothing to sample at this step
        pass
    assert not ahead.pending
