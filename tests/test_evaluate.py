import math
from fractions import Fraction
from itertools import combinations

import pytest

from effopd.evaluate import pass_at_k, summarize


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize(
    "n, c, k",
    [(1, 0, 1), (1, 1, 1), (5, 0, 3), (5, 2, 1), (5, 2, 3), (5, 2, 4), (6, 1, 6), (8, 3, 2), (10, 5, 5), (12, 1, 4)],
)
def test_pass_at_k_matches_brute_force(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_by_hand():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the accuracy c/n
    # 4 samples, 1 correct, pairs: 3 of the 6 pairs hold the correct one.
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_pass_at_k_is_stable_for_large_n():
    # C(2000, 1000) is far beyond float range; the product form never forms it.
    n, c, k = 2000, 7, 1000
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


def test_summarize_by_hand():
    correct = [
        [True, False, False, False],  # c=1: pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
        [True, True, False, False],  # c=2: pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6
        [False, False, False, False],  # c=0: pass@2 = 0
    ]
    lengths = [[10, 20, 30, 40], [5, 5, 5, 5], [0, 0, 0, 120]]
    out = summarize(correct, lengths, ks=(1, 2, 8))
    assert set(out) == {"avg@4", "pass@1", "pass@2", "mean_length"}  # k=8 > n is skipped
    assert out["avg@4"] == pytest.approx(3 / 12)
    assert out["pass@1"] == pytest.approx(3 / 12)
    assert out["pass@2"] == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    assert out["mean_length"] == pytest.approx(240 / 12)


def test_summarize_without_lengths():
    out = summarize([[1], [0]])  # ints are read as booleans
    assert out == {"avg@1": 0.5, "pass@1": 0.5}


@pytest.mark.parametrize(
    "correct, lengths, match",
    [
        ([], None, "no problems"),
        ([[]], None, "no samples"),
        ([[True, False], [True]], None, r"correct\[1\] has 1 samples, expected 2"),
        ([[True], [False]], [[3]], "lengths has 1 problems"),
        ([[True], [False]], [[3], [4, 5]], r"lengths\[1\] has 2 samples"),
    ],
)
def test_summarize_rejects_bad_shapes(correct, lengths, match):
    with pytest.raises(ValueError, match=match):
        summarize(correct, lengths)


def test_summarize_rejects_bad_k():
    with pytest.raises(ValueError, match="k in ks must be >= 1"):
        summarize([[True]], ks=(0,))


def test_make_eval_fn_reads_the_prompts_once_and_evaluates_each_model_dir(tmp_path, tiny_models, monkeypatch):
    import json

    from effopd import cli, evaluate

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": i + 1}) + "\n" for i in range(3)))
    eval_fn = evaluate.make_eval_fn(str(data), 2, max_new_tokens=4)
    real = eval_fn(tiny_models["student"])  # a real greedy evaluation of the tiny model
    assert set(real) >= {"accuracy", "avg@1", "pass@1", "mean_length"} and real["accuracy"] in (0.0, 0.5, 1.0)
    assert 1 <= real["mean_length"] <= 4

    calls = []
    monkeypatch.setattr(evaluate, "evaluate_model",
                        lambda model, tok, examples, **kw: calls.append(([e.prompt for e in examples], kw)) or {"accuracy": 1.0})
    data.unlink()  # the prompts were read when the function was made
    assert eval_fn(tiny_models["teacher"]) == {"accuracy": 1.0}
    assert calls == [(["0+1=", "1+1="], {"max_new_tokens": 4})]
    assert cli.make_eval_fn is evaluate.make_eval_fn  # `effopd analyze` builds its eval_fn with the same function


# ---- evaluation settings: flag > the run's config.yaml > built-in default ----------------------

RUN_YAML = """\
model:
  student: some/student
data:
  eval: {eval}
  prompt_field: q
  answer_field: a
  eval_split: heldout
  prompt_template: "Q: {{prompt}} A:"
eval:
  max_new_tokens: 77
  batch_size: 5
"""


def _run_settings(tmp_path, eval_data="run-eval.jsonl"):
    from effopd.evaluate import read_run_settings

    run = tmp_path / "run"
    (run / "checkpoints" / "step-3").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(RUN_YAML.format(eval=eval_data))
    return read_run_settings(run)


# (keyword of resolve_eval_settings, how to read the result, the flag's value, the run's, the default)
RESOLVED = [
    ("data", lambda s: s.data, "mine.jsonl", "run-eval.jsonl", "embedded"),
    ("prompt_template", lambda s: s.prompt_template, "> {prompt}", "Q: {prompt} A:", "{prompt}"),
    ("max_new_tokens", lambda s: s.max_new_tokens, 9, 77, 48),
    ("batch_size", lambda s: s.batch_size, 2, 5, 256),
    ("prompt_field", lambda s: s.data_cfg.prompt_field, "question", "q", "prompt"),
    ("answer_field", lambda s: s.data_cfg.answer_field, "solution", "a", "answer"),
    ("split", lambda s: s.data_cfg.eval_split, "dev", "heldout", None),
]


@pytest.mark.parametrize("key, read, flag, from_run, default", RESOLVED, ids=[r[0] for r in RESOLVED])
def test_each_setting_is_flag_then_run_config_then_default(tmp_path, key, read, flag, from_run, default):
    from effopd.evaluate import resolve_eval_settings

    run = _run_settings(tmp_path)
    assert read(resolve_eval_settings(run, **{key: flag})) == flag
    taken = resolve_eval_settings(run)
    assert read(taken) == from_run
    assert read(resolve_eval_settings(None)) == default
    assert from_run != default  # so that the middle assertion can tell the run's value from the default


def test_the_run_fields_apply_only_to_the_run_own_prompt_set(tmp_path):
    from effopd.evaluate import resolve_eval_settings

    run = _run_settings(tmp_path)
    other = resolve_eval_settings(run, data="other.jsonl")  # not the run's data.eval: its fields are not taken
    assert (other.data_cfg.prompt_field, other.data_cfg.answer_field, other.data_cfg.eval_split) == ("prompt", "answer", None)
    assert other.prompt_template == "Q: {prompt} A:" and other.max_new_tokens == 77  # these belong to the run
    same = resolve_eval_settings(run, data="run-eval.jsonl")  # the run's own prompt set, named explicitly
    assert same.data_cfg.prompt_field == "q" and not any("eval data" in t for t in same.from_run)
    assert resolve_eval_settings(run).from_run == [
        "eval data run-eval.jsonl (data.eval)", "prompt template 'Q: {prompt} A:'", "max_new_tokens=77",
        "batch_size=5", "prompt_field=q", "answer_field=a", "eval_split=heldout"]


def test_a_run_on_the_embedded_task_passes_its_task_settings(tmp_path):
    from effopd.evaluate import read_run_settings, resolve_eval_settings

    (tmp_path / "config.yaml").write_text("data:\n  eval: embedded\n  task_seed: 7\n  task_digits: 3\n")
    st = resolve_eval_settings(read_run_settings(tmp_path))
    assert st.data == "embedded" and (st.data_cfg.task_seed, st.data_cfg.task_digits) == (7, 3)
    assert resolve_eval_settings(read_run_settings(tmp_path), data="x.jsonl").data_cfg.task_seed == 0


def test_find_run_dir_knows_a_run_its_checkpoints_and_each_checkpoint(tmp_path, tiny_models):
    from effopd.evaluate import find_run_dir

    run = _run_settings(tmp_path).config.parent
    assert find_run_dir(run) == run
    assert find_run_dir(run / "checkpoints") == run
    assert find_run_dir(run / "checkpoints" / "step-3") == run
    assert find_run_dir(tiny_models["student"]) is None  # a plain model directory
    assert find_run_dir("Qwen/Qwen3-1.7B") is None  # a hub id


def test_a_bad_template_names_where_it_came_from(tmp_path):
    from effopd.evaluate import EvalSettingsError, read_run_settings, resolve_eval_settings

    with pytest.raises(EvalSettingsError, match="does not contain {prompt}") as err:
        resolve_eval_settings(None, prompt_template="no placeholder")
    assert "--prompt-template" in str(err.value)
    (tmp_path / "config.yaml").write_text("data:\n  prompt_template: 'Answer in \\boxed{}'\n")
    with pytest.raises(EvalSettingsError, match="data.prompt_template in .*config.yaml"):
        resolve_eval_settings(read_run_settings(tmp_path))


def test_braces_in_a_template_are_literal():
    from effopd.evaluate import resolve_eval_settings

    st = resolve_eval_settings(None, prompt_template="{prompt} Put the answer in \\boxed{}.")
    assert st.prompt_template == "{prompt} Put the answer in \\boxed{}."


def test_make_eval_fn_applies_template_device_dtype_and_batch_size(tmp_path, tiny_models, monkeypatch):
    import torch

    from effopd import evaluate

    seen = []

    def spy(model, tok, examples, **kw):
        seen.append((next(model.parameters()).dtype, next(model.parameters()).device.type, [e.prompt for e in examples], kw))
        return {"accuracy": 0.5}

    monkeypatch.setattr(evaluate, "evaluate_model", spy)
    eval_fn = evaluate.make_eval_fn("embedded", 2, 7, device="cpu", dtype="bfloat16", prompt_template="Q:{prompt}", batch_size=3)
    assert eval_fn(tiny_models["student"]) == {"accuracy": 0.5}
    from effopd.data import embedded_splits

    raw = [e.prompt for e in embedded_splits()["test"][:2]]
    assert seen == [(torch.bfloat16, "cpu", ["Q:" + p for p in raw], {"max_new_tokens": 7, "batch_size": 3})]
    assert eval_fn.settings["dtype"] == "bfloat16" and eval_fn.settings["prompt_template"] == "Q:{prompt}"
    evaluate.make_eval_fn("embedded", 1, 7)(tiny_models["student"])  # the old call: CPU, float32
    assert seen[-1][:2] == (torch.float32, "cpu")
