"""EffOPD inside real TRL trainers (DistillationTrainer, GKDTrainer, GRPOTrainer) on the embedded
models: a callback that never accepts changes nothing, an accepted candidate changes exactly the
selected tensors, a resumed run ends where the uninterrupted one does, and analyze reads what
TRL wrote."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import TrainerCallback
from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer

from effopd.data import embedded_splits
from effopd.extrapolate import extrapolated
from effopd.integrations.trl import (
    STATE_FILE,
    EffOPDCallback,
    EffOPDSetupError,
    validation_prompts,
    verifiable_reward,
)
from effopd.models import load_model, load_tokenizer, resolve
from effopd.validation import select_parameters

pytestmark = pytest.mark.slow

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"


@pytest.fixture(scope="module")
def splits():
    s = embedded_splits()
    return {"train": s["train"][:256], "val": s["val"][:16]}


def rows(examples):
    return [{"prompt": e.prompt, "answer": e.answer} for e in examples]


def tokenizer():
    tok = load_tokenizer("embedded")
    tok.chat_template = TEMPLATE  # GKD's collator renders messages through a chat template
    return tok


def trainer(kind: str, splits, out, *, steps: int, callbacks=(), save_steps: int | None = None, lr: float = 1e-4):
    """A fresh TRL trainer of ``kind`` on freshly loaded embedded models (fp32, CPU, seed 0)."""
    student, teacher, tok = load_model("embedded", "student"), load_model("embedded", "teacher"), tokenizer()
    common = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr, bf16=False,
                  logging_steps=1, report_to="none", seed=0, disable_tqdm=True, use_cpu=True,
                  save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    if kind == "distillation":
        args = DistillationConfig(max_completion_length=24, **common)
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                                   train_dataset=datasets.Dataset.from_list(rows(splits["train"])), callbacks=list(callbacks))
    if kind == "gkd":
        data = [{"messages": [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.solution}]}
                for e in splits["train"]]
        args = GKDConfig(max_new_tokens=24, max_length=96, **common)
        return GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_list(data), callbacks=list(callbacks))
    raise ValueError(kind)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Constant:
    """A TRL-style reward function that scores every response 0 (so nothing is ever accepted),
    recording the completions it was shown."""

    def __init__(self):
        self.seen: list[list[str]] = []

    def __call__(self, prompts, completions, **columns):
        assert set(columns) == {"answer"} and len(columns["answer"]) == len(completions) == len(prompts)
        self.seen.append(list(completions))
        return [0.0] * len(completions)


class Rising:
    """Scores 0, 1, ..., max_tries in the order it is called: within one search every candidate
    beats the previous one, so the last candidate is accepted. A search makes 1 + max_tries
    calls when it accepts all, so a fresh instance stays in phase after a resume."""

    def __init__(self, max_tries: int):
        self.period, self.calls = max_tries + 1, 0

    def __call__(self, prompts, completions, **_):
        value = float(self.calls % self.period)
        self.calls += 1
        return [value] * len(completions)


PAPER_RULE = dict(schedule="paper", accept="best", margin=0.0)


def callback(splits, score, **kw):
    return EffOPDCallback(rows(splits["val"]), score=score, val_prompts=8, max_new_tokens=16, **{**PAPER_RULE, **kw})


@pytest.mark.parametrize("kind", ["distillation", "gkd"])
def test_a_callback_that_never_accepts_leaves_the_run_bitwise_unchanged(kind, splits, tmp_path):
    plain = trainer(kind, splits, tmp_path / "plain", steps=3)
    plain.train()
    never = Constant()
    with_cb = trainer(kind, splits, tmp_path / "cb", steps=3, callbacks=[callback(splits, never)])
    with_cb.train()
    searches = [h for h in with_cb.state.log_history if "extrapolate/s0" in h]
    assert [h["step"] for h in searches] == [1, 2] and all(h["extrapolate/accepted_c"] == 1.0 for h in searches)
    assert len(never.seen) == 4 and all(len(c) == 8 for c in never.seen)  # s0 and one candidate per search, sampled
    a, b = weights(plain.model), weights(with_cb.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(plain) == losses(with_cb)


@pytest.mark.parametrize("kind", ["distillation", "gkd"])
def test_an_accepted_candidate_changes_exactly_the_selected_tensors(kind, splits, tmp_path):
    theta0 = weights(load_model("embedded", "student"))
    plain = trainer(kind, splits, tmp_path / "plain", steps=1)
    plain.train()
    theta1 = weights(plain.model)
    cb = callback(splits, Rising(2), max_tries=2)
    moved = trainer(kind, splits, tmp_path / "cb", steps=1, callbacks=[cb])
    moved.train()
    (search,) = [h for h in moved.state.log_history if "extrapolate/s0" in h]
    assert search["extrapolate/accepted_c"] == 5.0 and search["extrapolate/candidates"] == [3.0, 5.0]
    after = weights(moved.model)
    selected = set(select_parameters(moved.model, cb.modules))
    assert len(selected) == 28  # q, k, v, o, gate, up, down of 4 layers
    for n in after:
        expected = extrapolated(theta0[n], theta1[n], 5.0) if n in selected else theta1[n]
        assert torch.equal(after[n], expected), n
    assert all(not torch.equal(after[n], theta1[n]) for n in selected)


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("kind", ["distillation", "gkd"])
def test_resuming_from_a_checkpoint_ends_identical_to_the_uninterrupted_run(kind, splits, tmp_path):
    """Searches after steps 1, 2 and 4 all accept; the checkpoint is written at step 3, so the
    step-4 search extrapolates from the anchor the step-2 search left, which after the restart
    only the checkpoint holds (the weights have moved on by one step)."""
    run = lambda out, *extra, **kw: trainer(kind, splits, out, steps=5, save_steps=3,  # noqa: E731
                                            callbacks=[callback(splits, Rising(2), max_tries=2, **kw), *extra])
    full = run(tmp_path / "full")
    full.train()
    assert [h["extrapolate/accepted_c"] for h in full.state.log_history if "extrapolate/s0" in h] == [5.0, 5.0, 5.0]

    out = tmp_path / "interrupted"
    cut = run(out, StopAfter(3))
    cut.train()
    assert cut.state.global_step == 3 and (out / "checkpoint-3" / STATE_FILE).exists()

    resumed = run(out)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    a, b = weights(full.model), weights(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [h["step"] for h in resumed.state.log_history if "extrapolate/s0" in h] == [1, 2, 4]

    fresh = run(tmp_path / "fresh", resume_from="fresh")
    fresh.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    c = weights(fresh.model)
    assert any(not torch.equal(a[n], c[n]) for n in a)  # a new anchor at step 3 gives another step-4 candidate


def test_resuming_a_checkpoint_written_without_the_callback_says_what_to_do(splits, tmp_path):
    out = tmp_path / "run"
    trainer("distillation", splits, out, steps=2, save_steps=1).train()
    later = trainer("distillation", splits, tmp_path / "elsewhere", steps=3, callbacks=[callback(splits, Constant())])
    with pytest.raises(EffOPDSetupError, match="holds effopd_extrapolate.json.*resume_from='fresh'"):
        later.train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_grpo_with_the_callback_and_a_verifiable_reward_runs_two_steps(splits, tmp_path):
    student, tok = load_model("embedded", "student"), tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=24, learning_rate=1e-4, bf16=False, logging_steps=1, report_to="none",
                      seed=0, disable_tqdm=True, use_cpu=True, save_strategy="no")
    cb = EffOPDCallback(rows(splits["val"]), val_prompts=8)
    grpo = GRPOTrainer(model=student, reward_funcs=[verifiable_reward], args=args, processing_class=tok,
                       train_dataset=datasets.Dataset.from_list(rows(splits["train"])), callbacks=[cb])
    grpo.train()
    assert grpo.state.global_step == 2
    assert [h["step"] for h in grpo.state.log_history if "extrapolate/s0" in h] == [1, 2]
    rewards = [h["reward"] for h in grpo.state.log_history if "reward" in h]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)
    assert cb.sampling["max_new_tokens"] == 24  # validation samples as training does


def test_the_verifiable_reward_checks_the_final_answer():
    assert verifiable_reward(["1+2=3;\\boxed{3}", "\\boxed{4}", [{"role": "assistant", "content": "\\boxed{\\frac{14}{2}}"}], "7"],
                             answer=["3", "3", "7", "7"]) == [1.0, 0.0, 1.0, 0.0]


def test_validation_prompts_render_chat_messages_and_name_a_bad_row():
    tok = tokenizer()
    chat = validation_prompts([{"prompt": [{"role": "user", "content": "1+2="}], "answer": "3"}], tok)
    assert chat[0].prompt == "1+2=" and chat[0].answer == "3"
    gkd = validation_prompts([{"messages": [{"role": "user", "content": "4+4="}, {"role": "assistant", "content": "8"}]}],
                             tok, answer_field=None)
    assert gkd[0].prompt == "4+4=" and gkd[0].answer is None
    with pytest.raises(EffOPDSetupError, match="validation row 1 has no 'answer'"):
        validation_prompts([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}], tok)
    with pytest.raises(EffOPDSetupError, match="validation row 0 has no 'question'"):
        validation_prompts([{"prompt": "1+1="}], tok, prompt_field="question")


@pytest.mark.parametrize("args, env, match", [
    (SimpleNamespace(deepspeed="ds_zero3.json"), {}, "DeepSpeed is not supported"),
    (SimpleNamespace(), {"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported"),
    (SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 1}), {}, "FSDP1 is not supported"),
    (SimpleNamespace(), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP1 is not supported"),
])
def test_setups_whose_weights_it_cannot_change_are_refused_with_the_way_out(args, env, match, monkeypatch, splits):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cb = callback(splits, Constant())
    with pytest.raises(EffOPDSetupError, match=match):
        cb.on_train_begin(args, SimpleNamespace(global_step=0), None, model=load_model("embedded", "student"))


def test_analyze_reads_the_checkpoints_trl_wrote_as_it_reads_the_same_weights(splits, tmp_path):
    from effopd.analysis import analyze, list_checkpoints

    out = tmp_path / "trl"
    trainer("distillation", splits, out, steps=2, save_steps=1).train()
    found = list_checkpoints(out)
    assert [s for s, _ in found] == [1, 2]
    copies = []
    for step, path in found:
        dst = tmp_path / "copies" / f"step-{step}"
        load_model(str(path), "student").save_pretrained(dst)
        copies.append((step, dst))
    base = resolve("embedded", "student")
    a = analyze(base, found, tmp_path / "a", rank=2, progress=False)
    b = analyze(base, copies, tmp_path / "b", rank=2, progress=False)
    for key in ("magnitude", "spectrum", "alignment", "modules"):
        assert a[key] == b[key]
    assert max(a["magnitude"]["total_norm"]) > 0  # the steps moved the weights
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


def test_data_parallel_processes_score_their_share_and_take_one_decision(tmp_path):
    """Two gloo processes (accelerate launch, the DDP config): each scores half of the 8
    validation prompts, the scores are gathered, and both apply the same decisions, so their
    weights stay identical (DDP synchronises gradients, not weights)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_replicas import DDP_CONFIG, free_port

    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(Path(__file__).with_name("trl_worker.py")), out]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-10000:]
    reports = [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert all(r["scored"] and set(r["scored"]) == {4} for r in reports)  # its half of the prompts, every call
    assert [s["step"] for s in reports[0]["searches"]] == [1, 2]
    assert reports[0]["searches"] == reports[1]["searches"]
    assert reports[0]["params"] == reports[1]["params"]


def test_the_example_script_runs_and_points_to_the_analysis(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "trl_distillation_effopd.py"
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(example), "--out", str(out), "--steps", "2", "--batch", "8", "--eval-limit", "16",
                           "--val-prompts", "16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "greedy accuracy on 16 test problems" in proc.stdout and "EffOPD after step 1" in proc.stdout
    assert (out / "checkpoint-2" / STATE_FILE).exists() and f"--checkpoints {out}" in proc.stdout


def test_the_callback_defaults_are_effopd_trains_defaults():
    """One set of defaults: the callback's keyword arguments default to what ``effopd train``'s
    ``extrapolate.*`` keys default to, and to the controller's own except its rule (the class keeps
    the paper's schedule and strict acceptance; both front ends default to rank1 + paired)."""
    import dataclasses
    import inspect

    from effopd.config import ExtrapolateConfig
    from effopd.extrapolate import Extrapolator

    mine = {k: p.default for k, p in inspect.signature(EffOPDCallback).parameters.items()}
    rule = {"schedule", "accept", "margin"}
    assert (mine["schedule"], mine["accept"], mine["margin"]) == ("rank1", "paired", 1.0)
    controller = {k: p.default for k, p in inspect.signature(Extrapolator).parameters.items() if k in mine and k not in rule}
    assert controller and all(mine[k] == v for k, v in controller.items()), controller
    config = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(ExtrapolateConfig) if f.name in mine}
    assert len(config) >= 12 and all(mine[k] == v or list(mine[k]) == v for k, v in config.items()), config


def test_the_teachers_logprob_can_score_the_candidates(splits, tmp_path):
    teacher = load_model("embedded", "teacher")
    cb = EffOPDCallback(rows(splits["val"]), score="teacher_logprob", teacher=teacher, val_prompts=8, max_new_tokens=16,
                        max_tries=2)
    run = trainer("distillation", splits, tmp_path / "run", steps=1, callbacks=[cb])
    run.train()
    (search,) = [h for h in run.state.log_history if "extrapolate/s0" in h]
    assert search["extrapolate/s0"] < 0 and all(s < 0 for s in search["extrapolate/scores"])  # mean logprobs
    with pytest.raises(EffOPDSetupError, match="needs the teacher model"):
        EffOPDCallback(rows(splits["val"]), score="teacher_logprob")
