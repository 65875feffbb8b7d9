"""Every training method through the one loop: presets, 2-step CLI runs on tiny random models,
and how each method assembles its batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from effopd import cli
from effopd import methods as methods_mod
from effopd import train as train_mod
from effopd.config import ConfigError, list_presets, load_config, preset_path
from effopd.data.example import Example
from effopd.losses import group_advantages, overlong_penalty
from effopd.methods import METHODS, Models

from conftest import checkpoint_weights, metrics_rows, tiny_overrides

EMBEDDED_PRESETS = ["opd", "opd-effopd", "gopd", "gkd", "grpo", "dapo", "sft", "sft-gt"]
METHOD_KEYS = {  # metrics that only this preset's runs log
    "opd-effopd": {"extrapolate/s0"}, "gkd": {"train/jsd"}, "dapo": {"train/sample_rounds", "train/kept_groups"},
    "sft": {"train/nll", "train/target_reward"}, "sft-gt": {"train/nll"},
}


def assemble_batch(cfg, models, student, draw, k):
    return METHODS[cfg.loss.method].assemble(cfg, models, student, draw, k)


def _tiny(tiny_models, **extra) -> list[str]:
    return tiny_overrides(tiny_models, **{"extrapolate.val_prompts": 4, **extra})


def test_presets_are_the_shipped_files():
    assert set(EMBEDDED_PRESETS) | {"qwen3-1.7b-opd"} == set(list_presets())


@pytest.mark.parametrize("name", EMBEDDED_PRESETS)
def test_embedded_presets_share_one_budget(name):
    cfg = load_config([preset_path(name)])
    assert cfg.loss.method == name.removesuffix("-effopd")
    assert cfg.extrapolate.enabled == (name == "opd-effopd")
    assert (cfg.train.steps, cfg.rollout.batch_size * cfg.rollout.n, cfg.optim.lr) == (100, 64, 1e-5)
    assert cfg.model.student == cfg.model.teacher == "embedded"


def test_large_scale_preset_holds_the_published_setting(tmp_path, capsys):
    cfg = load_config([preset_path("qwen3-1.7b-opd")], ["data.train=t.jsonl", "data.eval=e.jsonl"])
    assert (cfg.model.student, cfg.model.teacher) == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B")
    assert (cfg.optim.lr, cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p) == (1e-6, 1, 1.0, 1.0)
    assert cfg.rollout.max_new_tokens == 16384 and cfg.optim.scheduler == "constant"
    assert (cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.grad_clip) == ([0.9, 0.999], 0.01, 1.0)
    assert "{prompt}" in cfg.data.prompt_template and "\\boxed{}" in cfg.data.prompt_template
    # without a prompt set it stops before loading any model, and says what to pass
    code = cli.main(["train", "--preset", "qwen3-1.7b-opd", "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "data.train=PATH" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_unknown_preset_suggests_the_closest(tmp_path, capsys):
    assert cli.main(["train", "--preset", "grp", "--run-dir", str(tmp_path / "r")]) == 2
    assert "did you mean `grpo`" in capsys.readouterr().err


def test_method_defaults_follow_the_method():
    dapo = load_config([], ["loss.method=dapo", "rollout.n=4"]).loss
    assert (dapo.clip_eps_high, dapo.aggregation, dapo.dynamic_sampling, dapo.overlong_penalty) == (0.28, "token-mean", True, 1.0)
    assert dapo.overlong_buffer == 48 // 4
    grpo = load_config([], ["loss.method=grpo", "rollout.n=4"]).loss
    assert (grpo.clip_eps_high, grpo.aggregation, grpo.dynamic_sampling, grpo.overlong_penalty) == (0.2, "seq-mean-token-mean", False, 0.0)
    # an explicit value always wins over the method's default
    assert load_config([], ["loss.method=dapo", "rollout.n=4", "loss.clip_eps_high=0.3"]).loss.clip_eps_high == 0.3
    assert load_config([], []).loss.aggregation == "token-mean"


@pytest.mark.parametrize("bad, match", [
    (["loss.method=grpo"], "rollout.n"),
    (["loss.method=opd", "loss.dynamic_sampling=true"], "loss.dynamic_sampling"),
    (["loss.method=gkd", "loss.gkd_beta=1.5"], "loss.gkd_beta"),
    (["loss.method=ppo"], "loss.method"),
    (["loss.method=dapo", "rollout.n=2", "loss.overlong_buffer=48"], "loss.overlong_buffer"),
])
def test_bad_method_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], bad)


def _even_length_reward(text, gold):
    """A fake verifier with variance on random models: 1 for an even-length response."""
    return float(len(text) % 2 == 0)


@pytest.fixture(scope="module")
def method_runs(tiny_models, tmp_path_factory):
    """Two CLI steps of every embedded preset from the same student, data and seed, with a fake
    verifier (random tiny models never solve a problem, so with the real one every GRPO/DAPO
    advantage would be 0 and those runs could not be told apart)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(methods_mod, "reward", _even_length_reward)
    root, runs = tmp_path_factory.mktemp("methods"), {}
    try:
        for name in EMBEDDED_PRESETS:
            extra = {"rollout.batch_size": 2, "rollout.n": 2} if name in ("grpo", "dapo") else {}
            run = root / name
            code = cli.main(["train", "--preset", name, "--run-dir", str(run), "--no-progress", *_tiny(tiny_models, **extra)])
            rows = metrics_rows(run) if code == 0 else []
            runs[name] = {"code": code, "dir": run, "rows": rows}
    finally:
        mp.undo()
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", EMBEDDED_PRESETS)
def test_two_steps_of_every_method_through_the_cli(name, method_runs):
    r = method_runs[name]
    assert r["code"] == 0
    rows, run = r["rows"], r["dir"]
    assert [x["step"] for x in rows] == [0, 1, 2]
    for x in rows[1:]:
        assert math.isfinite(x["train/loss"]) and math.isfinite(x["train/grad_norm"]) and "eval/accuracy" in x
    others = set().union(*(METHOD_KEYS.get(n, set()) for n in EMBEDDED_PRESETS if n != name)) - METHOD_KEYS.get(name, set())
    assert METHOD_KEYS.get(name, set()) <= set(rows[1]), sorted(rows[1])
    assert not others & set(rows[1]), sorted(others & set(rows[1]))
    assert (run / "checkpoints" / "step-2" / "COMPLETE").exists()
    saved = load_config([run / "config.yaml"])
    assert saved.loss.method == name.removesuffix("-effopd") and saved.train.steps == 2


@pytest.mark.slow
def test_every_method_trains_differently(method_runs):
    """Same student, data and seed: each method's loss moves the weights somewhere else, so a
    method wired to another's batch or loss would show here. (OPD + EffOPD equals OPD on random
    models, which never pass validation: that is tested in test_train.py.)"""
    weights = {n: checkpoint_weights(method_runs[n]["dir"], 2)
               for n in EMBEDDED_PRESETS if n != "opd-effopd"}
    names = sorted(weights)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), f"{a} and {b} trained alike"


# --- batch assembly, method by method -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_models):
    from effopd.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny_models["student"])
    return Models(load_model(tiny_models["student"], "student"), load_model(tiny_models["teacher"], "teacher"), None, tok)


def _examples(n: int) -> list[Example]:
    from effopd.data.task import TaskSpec, generate_split

    return generate_split(n, TaskSpec(), seed=5)


def _drawer(pool):
    state = {"i": 0}

    def draw(k):
        out = [pool[(state["i"] + j) % len(pool)] for j in range(k)]
        state["i"] += k
        return out

    return draw, state


def test_dynamic_sampling_refills_with_informative_groups_only(tiny, monkeypatch):
    # A fake verifier with reward variance: 1 for an even-length response, else 0.
    monkeypatch.setattr(methods_mod, "reward", _even_length_reward)
    cfg = load_config([], ["loss.method=dapo", "rollout.n=4", "rollout.batch_size=3", "rollout.max_new_tokens=12",
                           "loss.max_sample_rounds=20"])
    draw, state = _drawer(_examples(200))
    torch.manual_seed(0)
    batch = assemble_batch(cfg, tiny, tiny.student, draw, 3)
    assert batch.group_size == 4 and len(batch.golds) == 12 == batch.rollout.response_ids_BT.shape[0]
    r_GN = batch.rewards_B.view(-1, 4)
    assert (r_GN.max(-1).values > r_GN.min(-1).values).all()  # no all-equal group survives
    assert batch.metrics["train/kept_groups"] == 3
    assert state["i"] == 3 * batch.metrics["train/sample_rounds"]  # every round drew fresh prompts
    # the rewards are those of the kept responses (outcome + overlong penalty)
    lengths = batch.rollout.lengths_B
    expected = torch.tensor([float(len(t) % 2 == 0) for t in batch.rollout.texts])
    expected = expected + overlong_penalty(lengths, 12, cfg.loss.overlong_buffer, 1.0)
    assert torch.allclose(batch.rewards_B, expected)


def test_dynamic_sampling_gives_up_after_max_rounds(tiny, monkeypatch):
    monkeypatch.setattr(methods_mod, "reward", lambda text, gold: 0.0)  # never informative
    cfg = load_config([], ["loss.method=dapo", "rollout.n=2", "rollout.batch_size=2", "rollout.max_new_tokens=6",
                           "loss.max_sample_rounds=3", "loss.overlong_penalty=0"])
    draw, state = _drawer(_examples(50))
    batch = assemble_batch(cfg, tiny, tiny.student, draw, 2)
    assert batch.metrics["train/sample_rounds"] == 3 and batch.metrics["train/kept_groups"] == 0
    assert state["i"] == 6
    assert torch.equal(group_advantages(batch.rewards_B, 2), torch.zeros(4))


def test_sft_gt_trains_on_the_worked_solutions(tiny):
    cfg = load_config([], ["loss.method=sft-gt"])
    draw, _ = _drawer(_examples(10))
    batch = assemble_batch(cfg, tiny, tiny.student, draw, 3)
    assert batch.rollout.texts == [e.solution for e in _examples(10)[:3]]
    decoded = tiny.tokenizer.batch_decode(batch.rollout.response_ids_BT, skip_special_tokens=True)
    assert decoded == batch.rollout.texts


def test_sft_gt_without_solutions_names_the_row(tiny):
    cfg = load_config([], ["loss.method=sft-gt"])
    rows = [Example("1+1=", "2", None, source="data.jsonl:7")]
    with pytest.raises(ValueError, match="data.jsonl:7.*solution"):
        assemble_batch(cfg, tiny, tiny.student, lambda k: rows * k, 1)


def test_sft_samples_the_teacher_not_the_student(tiny):
    cfg = load_config([], ["loss.method=sft", "rollout.max_new_tokens=8"])
    pool = _examples(10)
    draw, _ = _drawer(pool)
    torch.manual_seed(3)
    batch = assemble_batch(cfg, tiny, tiny.student, draw, 4)
    from effopd.rollout import generate

    torch.manual_seed(3)
    ref = generate(tiny.teacher, tiny.tokenizer, [e.prompt for e in pool[:4]], max_new_tokens=8)
    assert torch.equal(batch.rollout.response_ids_BT, ref.response_ids_BT)
    assert "train/target_reward" in batch.metrics


def test_rl_methods_do_not_load_the_teacher(tiny_models):
    cfg = load_config([], _tiny(tiny_models, **{"loss.method": "grpo", "rollout.n": 2, "model.teacher": "/nonexistent"}))
    models = train_mod.load_models(cfg, "cpu")
    assert models.teacher is None


@pytest.mark.parametrize("name", ["grpo", "sft-gt"])
def test_effopd_switches_on_for_a_baseline(name, tiny_models, tmp_path):
    extra = {"rollout.batch_size": 2, "rollout.n": 2} if name == "grpo" else {}
    run = tmp_path / name
    args = _tiny(tiny_models, **extra, **{"extrapolate.enabled": "true", "model.teacher": "/nonexistent"})
    assert cli.main(["train", "--preset", name, "--run-dir", str(run), "--no-progress", *args]) == 0
    rows = metrics_rows(run)
    searches = [r for r in rows if "extrapolate/s0" in r]
    assert [r["step"] for r in searches] == [1, 2]  # triggered at steps 1 and 2, scored without a teacher
    assert (run / "checkpoints" / "step-2" / "extrapolate_anchor.safetensors").exists()


# --- updates per batch and loss normalisation -----------------------------------------------


def _optimize(tiny_models, overrides, *, lr=1e-2):
    """One step of the trainer's update on a fresh tiny student: (metrics, optimizer, batch)."""
    from accelerate import Accelerator

    from effopd.models import load_model, load_tokenizer
    from transformers import get_scheduler

    cfg = load_config([], [f"optim.lr={lr}", "rollout.max_new_tokens=10", *overrides])
    tok = load_tokenizer(tiny_models["student"])
    models = Models(load_model(tiny_models["student"], "student"), load_model(tiny_models["teacher"], "teacher"), None, tok)
    opt = torch.optim.AdamW(models.student.parameters(), lr=cfg.optim.lr)
    sched = get_scheduler("constant", opt)
    method = METHODS[cfg.loss.method]
    draw, _ = _drawer(_examples(40))
    torch.manual_seed(0)
    batch = method.assemble(cfg, models, models.student, draw, 4)
    m = train_mod.optimize(cfg, Accelerator(cpu=True), models, method, batch, opt, sched, train_mod.NonFiniteCount())
    return m, opt, batch


def _updates(opt) -> int:
    return int(next(iter(opt.state.values()))["step"])


def test_one_update_per_batch_has_ratio_one(tiny_models):
    m, opt, batch = _optimize(tiny_models, [])
    assert _updates(opt) == 1 and "old_logp_BT" not in batch.signals
    assert m["train/clip_frac"] == 0.0  # with one update the clip cannot act


def test_ppo_epochs_and_mini_batches_make_several_updates_against_the_sampling_policy(tiny_models):
    m, opt, batch = _optimize(tiny_models, ["loss.ppo_epochs=2", "loss.mini_batches=2", "loss.clip_eps_low=0.01"], lr=3e-2)
    assert _updates(opt) == 4
    # lp_old is the student's logprob of the samples before any update: rescoring a fresh copy of
    # the initial student gives it back
    from effopd.models import load_model
    from effopd.scoring import score

    init = load_model(tiny_models["student"], "student")
    torch.testing.assert_close(batch.signals["old_logp_BT"], score(init, batch.rollout), atol=1e-6, rtol=0)
    # the later updates see a ratio away from 1, so a tight clip acts on some tokens
    assert m["train/clip_frac"] > 0


def test_mini_batches_split_the_batch_in_order():
    cfg = load_config([], [])
    from effopd.methods import Batch
    from effopd.rollout import Rollout

    ro = Rollout(torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2, dtype=torch.long), torch.arange(5)[:, None],
                 torch.ones(5, 1, dtype=torch.long), torch.zeros(5, 1), [str(i) for i in range(5)])
    one = SimpleNamespace(num_processes=1)
    batch = Batch(ro, list("abcde"))
    assert [p.golds for p in train_mod.mini_batches(one, batch, 2)] == [list("abc"), list("de")]
    # n updates whenever there are n rows (ceil-sized slices would give 3 here)
    assert [p.golds for p in train_mod.mini_batches(one, batch, 4)] == [list("ab"), ["c"], ["d"], ["e"]]
    assert [p.golds for p in train_mod.mini_batches(one, batch, 7)] == [[g] for g in "abcde"]
    assert cfg.loss.mini_batches == 1


def test_a_process_short_of_rows_fills_its_mini_batch_with_a_weightless_row():
    """Under DDP every process must make the same number of updates: with another process
    holding 4 rows, a process with 1 row splits into 4 mini-batches, three of them one row whose
    response mask is all zero (it joins the all-reduce, adds nothing)."""
    from effopd.methods import Batch
    from effopd.rollout import Rollout

    class TwoProcesses:  # the other process holds 4 rows
        num_processes = 2

        def reduce(self, t, reduction):
            assert reduction == "max"
            return torch.maximum(t, torch.tensor([4.0], dtype=t.dtype))

        device = "cpu"

    ro = Rollout(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), torch.tensor([[7, 8]]),
                 torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2), ["x"])
    parts = train_mod.mini_batches(TwoProcesses(), Batch(ro, ["a"]), 4)
    assert len(parts) == 4
    assert parts[0].rollout.response_mask_BT.sum() == 2
    assert all(p.rollout.response_mask_BT.sum() == 0 and len(p) == 1 for p in parts[1:])


def _sft_batch(tiny, widths_extra: int = 0, empty_row: int | None = None):
    from effopd.rollout import _pad_to, from_completions

    ex = _examples(4)
    ro = from_completions(tiny.tokenizer, [e.prompt for e in ex], [e.solution for e in ex])
    if widths_extra:  # the same responses right-padded to a wider batch
        T = ro.response_ids_BT.shape[1] + widths_extra
        ro.response_ids_BT = _pad_to(ro.response_ids_BT, T, tiny.tokenizer.pad_token_id, False)
        ro.response_mask_BT = _pad_to(ro.response_mask_BT, T, 0, False)
        ro.logp_BT = _pad_to(ro.logp_BT, T, 0.0, False)
    if empty_row is not None:
        ro.response_mask_BT[empty_row] = 0
    return methods_mod.Batch(ro, [e.answer for e in ex])


def _loss_and_grad(tiny, cfg, batch):
    from accelerate import Accelerator

    tiny.student.zero_grad(set_to_none=True)
    m = train_mod.accumulate_gradients(cfg, Accelerator(cpu=True), tiny, METHODS[cfg.loss.method], batch)
    grads = [p.grad.clone() for p in tiny.student.parameters() if p.grad is not None]
    tiny.student.zero_grad(set_to_none=True)
    return m["train/loss"], grads


def test_sum_norm_divides_by_a_constant_not_the_padded_width(tiny):
    cfg = load_config([], ["loss.method=sft-gt", "loss.aggregation=seq-mean-token-sum-norm"])
    narrow, _ = _loss_and_grad(tiny, cfg, _sft_batch(tiny))
    wide, _ = _loss_and_grad(tiny, cfg, _sft_batch(tiny, widths_extra=7))
    assert narrow == pytest.approx(wide, rel=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_with_an_empty_row_equal_one_pass(tiny, agg):
    """A micro-batch holding only a fully masked row contributes nothing, for every aggregation."""
    whole = load_config([], ["loss.method=sft-gt", f"loss.aggregation={agg}"])
    micro = load_config([], ["loss.method=sft-gt", f"loss.aggregation={agg}", "train.micro_batch_size=1"])
    batch = _sft_batch(tiny, empty_row=1)
    loss_a, grads_a = _loss_and_grad(tiny, whole, batch)
    loss_b, grads_b = _loss_and_grad(tiny, micro, batch)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["opd", "grpo", "gkd", "sft-gt"])
@pytest.mark.parametrize("buckets, micro", [(2, None), (3, None), (4, 1), (2, 3)])
def test_length_sorted_micro_batches_give_the_one_pass_gradient(tiny, method, buckets, micro):
    """train.update_buckets: rows sorted by length, each micro-batch trimmed to its own width;
    the loss and gradient of the update are those of the batch in sampled order (float rounding)."""
    from effopd.methods import teacher_logprobs

    base = [f"loss.method={method}", "train.update_buckets=1"] + (["rollout.n=2"] if method == "grpo" else [])
    plain = load_config([], base)
    sorted_ = load_config([], [*base, f"train.update_buckets={buckets}"] + ([f"train.micro_batch_size={micro}"] if micro else []))
    batch = _sft_batch(tiny)
    if method == "opd":
        teacher_logprobs(plain, tiny, batch)
    if method == "grpo":
        batch.signals["seq_adv_B"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    parts = train_mod.micro_batches(sorted_, __import__("accelerate").Accelerator(cpu=True), batch)
    lengths = [int(p.rollout.response_mask_BT.sum(1).max()) for p in parts]
    assert all(p.rollout.response_ids_BT.shape[1] == n for p, n in zip(parts, lengths))  # trimmed to its widest row
    assert sum(len(p) for p in parts) == len(batch) and len(parts) == (-(-4 // micro) if micro else min(buckets, 4))
    loss_a, grads_a = _loss_and_grad(tiny, plain, batch)
    loss_b, grads_b = _loss_and_grad(tiny, sorted_, batch)
    assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-7)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["opd", "grpo", "sft-gt"])
@pytest.mark.parametrize("buckets, empty_row", [(1, None), (2, None), (1, 2)])
def test_packed_update_gives_the_padded_gradient(tiny, method, buckets, empty_row):
    """train.pack: the update's forward/backward on packed rows gives the padded batch's loss and
    gradient (float rounding), with or without length buckets, an empty response included."""
    from effopd.methods import teacher_logprobs

    base = [f"loss.method={method}", f"train.update_buckets={buckets}"] + (["rollout.n=2"] if method == "grpo" else [])
    plain, packed = load_config([], base), load_config([], [*base, "train.pack=true"])
    batch = _sft_batch(tiny, widths_extra=3, empty_row=empty_row)
    if method == "opd":
        teacher_logprobs(plain, tiny, batch)
    if method == "grpo":
        batch.signals["seq_adv_B"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss_a, grads_a = _loss_and_grad(tiny, plain, batch)
    loss_b, grads_b = _loss_and_grad(tiny, packed, batch)
    assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-7)
    assert len(grads_a) == len(grads_b) and any(bool(g.abs().sum() > 0) for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
