import json
import subprocess
import sys

import pytest

from conftest import tiny_overrides, train_run
from effopd import cli
from effopd.bootstrap import BootstrapConfig, bootstrap
from effopd.data.loaders import load_examples
from effopd.models import load_model, load_tokenizer


@pytest.mark.parametrize("command", ["demo", "bootstrap", "train", "eval", "analyze", "report"])
def test_help_documents_every_command(command):
    proc = subprocess.run([sys.executable, "-m", "effopd.cli", command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: effopd " + command in proc.stdout


def test_export_jsonl(tmp_path):
    assert cli.main(["bootstrap", "--export-jsonl", str(tmp_path)]) == 0
    test = load_examples(tmp_path / "test.jsonl")
    assert len(test) >= 1000 and test[0].solution.endswith("}")
    assert {p.name for p in tmp_path.iterdir()} == {"train.jsonl", "val.jsonl", "test.jsonl"}


def test_eval_command_on_user_file(tiny_models, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"q": "12+3=", "a": 15}\n{"q": "40-1=", "a": 39}\n')
    out = tmp_path / "records.jsonl"
    code = cli.main(["eval", "--model", tiny_models["student"], "--data", str(data), "--prompt-field", "q",
                     "--answer-field", "a", "--sample", "--samples", "4", "--max-new-tokens", "6", "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 2 and "pass@4" in printed and "avg@4" in printed
    assert len(out.read_text().splitlines()) == 8


def test_bad_dataset_row_is_a_one_line_error(tiny_models, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": 2}\n{"prompt": "2+2="}\n')
    code = cli.main(["eval", "--model", tiny_models["student"], "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and "p.jsonl:2" in err and "answer" in err


@pytest.mark.slow
def test_reduced_bootstrap_end_to_end(tmp_path):
    record = bootstrap(tmp_path, BootstrapConfig.reduced())
    saved = json.loads((tmp_path / "bootstrap.json").read_text())
    assert saved["teacher"]["parameters"] == record["teacher"]["parameters"] == saved["student"]["parameters"]
    for role in ("teacher", "student"):
        tok, model = load_tokenizer(str(tmp_path / role)), load_model(str(tmp_path / role), role)
        assert model.config.vocab_size == len(tok)
        assert 0.0 <= saved[role]["test_greedy_accuracy"] <= 1.0
        curve = saved[role]["loss_curve"]
        assert len(curve) == 2 and curve[1] < curve[0]  # the loss fell between the two 50-step windows


@pytest.mark.slow
def test_analyze_a_training_run(tiny_models, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_models, **{"train.steps": 3, "train.eval_every": 0, "rollout.max_new_tokens": 8,
                                               "data.eval_limit": 4, "eval.max_new_tokens": 8})
    assert cli.main(["train", "--run-dir", str(run), "--no-progress", *overrides]) == 0
    out = tmp_path / "analysis"
    code = cli.main(["analyze", "--base", tiny_models["student"], "--checkpoints", str(run / "checkpoints"),
                     "--out", str(out), "--eval-limit", "4", "--max-new-tokens", "8"])
    assert code == 0
    record = json.loads((out / "analysis.json").read_text())
    assert record["steps"] == [1, 2, 3]
    assert record["eval"]["ran"] is True and len(record["eval"]["efficiency"]) == 3
    assert (out / "tensors.safetensors").exists()
    # analysing again into the same directory is refused unless asked
    assert cli.main(["analyze", "--base", tiny_models["student"], "--checkpoints", str(run / "checkpoints"),
                     "--out", str(out), "--no-eval"]) == 2


def test_unparseable_answers_are_named(tiny_models, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": 2}\n{"prompt": "2+2=", "answer": "\\\\frac{4}{"}\n')
    code = cli.main(["eval", "--model", tiny_models["student"], "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and "p.jsonl:2" in err and "cannot be parsed" in err


# ---- eval and analyze on a training run's checkpoints: the run's own evaluation settings ---------

TEMPLATE = "Q:{prompt}|"


@pytest.fixture(scope="module")
def templated_run(tiny_models, tmp_path_factory):
    """A one-step run whose config differs from every built-in evaluation default."""
    run = tmp_path_factory.mktemp("templated") / "run"
    train_run(tiny_overrides(tiny_models, **{
        "train.steps": 1, "train.eval_every": 0, "data.eval_limit": 2, "rollout.max_new_tokens": 4,
        "data.prompt_template": TEMPLATE, "eval.max_new_tokens": 5, "eval.batch_size": 3}), run)
    return run


@pytest.fixture
def generate_calls(monkeypatch):
    """Every call of rollout.generate (prompts and keywords); the real generation still runs."""
    from effopd import rollout

    calls, real = [], rollout.generate

    def spy(model, tokenizer, prompts, **kw):
        calls.append({"prompts": list(prompts), "dtype": next(model.parameters()).dtype, **kw})
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(rollout, "generate", spy)
    return calls


def _embedded_test_prompts(n):
    from effopd.data import embedded_splits

    return [e.prompt for e in embedded_splits()["test"][:n]]


@pytest.mark.parametrize("model", ["checkpoints/step-1", "checkpoints", "."])
def test_eval_of_a_run_checkpoint_uses_the_run_template_and_lengths(templated_run, generate_calls, capsys, model):
    code = cli.main(["eval", "--model", str(templated_run / model), "--limit", "4"])
    assert code == 0
    captured = capsys.readouterr()
    (call,) = generate_calls
    assert call["prompts"] == [TEMPLATE.format(prompt=p) for p in _embedded_test_prompts(4)]
    assert call["prompts"][0].startswith("Q:") and call["prompts"][0].endswith("=|")  # the exact text fed to the model
    assert call["max_new_tokens"] == 5 and call["batch_size"] == 3
    line = [x for x in captured.err.splitlines() if "config.yaml" in x]
    assert len(line) == 1 and "prompt template 'Q:{prompt}|'" in line[0] and "max_new_tokens=5" in line[0]
    printed = json.loads(captured.out)
    assert printed["prompt_template"] == TEMPLATE and printed["max_new_tokens"] == 5
    assert printed.get("checkpoint", str(templated_run / "checkpoints" / "step-1")).endswith("step-1")


def test_eval_flags_win_over_the_run_config(templated_run, generate_calls, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"q": "12+3=", "a": 15}\n{"q": "40-1=", "a": 39}\n')
    code = cli.main(["eval", "--model", str(templated_run / "checkpoints" / "step-1"), "--data", str(data),
                     "--prompt-field", "q", "--answer-field", "a", "--prompt-template", "{prompt}",
                     "--max-new-tokens", "2", "--batch-size", "1"])
    assert code == 0
    assert [c["prompts"] for c in generate_calls] == [["12+3=", "40-1="]]
    assert generate_calls[0]["max_new_tokens"] == 2 and generate_calls[0]["batch_size"] == 1
    assert "config.yaml" not in capsys.readouterr().err  # nothing came from the run


def test_eval_device_cpu_dtype_bfloat16_loads_the_model_in_bf16(tiny_models, generate_calls, capsys):
    import torch

    code = cli.main(["eval", "--model", tiny_models["student"], "--limit", "2", "--max-new-tokens", "3",
                     "--device", "cpu", "--dtype", "bfloat16"])
    assert code == 0
    assert generate_calls[0]["dtype"] == torch.bfloat16
    printed = json.loads(capsys.readouterr().out)
    assert printed["dtype"] == "bfloat16" and printed["device"] == "cpu"
    assert cli.main(["eval", "--model", tiny_models["student"], "--limit", "1", "--max-new-tokens", "1"]) == 0
    assert generate_calls[-1]["dtype"] == torch.float32  # auto on the CPU


def test_eval_of_a_missing_relative_directory_says_so(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("a path must not reach the hub"))
    assert cli.main(["eval", "--model", "./models/nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the local directory ./models/nope does not exist" in err and len(err.splitlines()) == 1
    assert cli.main(["analyze", "--base", "runs/x/student", "--checkpoints", str(tmp_path), "--out", "o", "--no-eval"]) == 2
    assert "the local directory runs/x/student does not exist" in capsys.readouterr().err


def test_an_unknown_hub_id_without_network_is_a_one_line_error(monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kw):
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder; outgoing traffic has been disabled.")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    assert cli.main(["eval", "--model", "no-such-org/no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("effopd eval: error:")
    assert "'no-such-org/no-such-model'" in err and "not in the local Hugging Face cache" in err
    assert "could not be downloaded" in err and "huggingface-cli download no-such-org/no-such-model" in err


@pytest.mark.slow
def test_analyze_a_run_directory_evaluates_with_the_run_settings(templated_run, generate_calls, tmp_path, capsys):
    out = tmp_path / "analysis"
    # no --base: the run's model.student; the run directory itself stands for its checkpoints
    code = cli.main(["analyze", "--checkpoints", str(templated_run), "--out", str(out), "--eval-limit", "2"])
    assert code == 0
    assert generate_calls and all(c["prompts"] == [TEMPLATE.format(prompt=p) for p in _embedded_test_prompts(2)]
                                  and c["max_new_tokens"] == 5 and c["batch_size"] == 3 for c in generate_calls)
    err = [x for x in capsys.readouterr().err.splitlines() if "config.yaml" in x]
    assert len(err) == 1 and "base " in err[0] and "prompt template 'Q:{prompt}|'" in err[0]
    record = json.loads((out / "analysis.json").read_text())
    assert record["steps"] == [1] and record["eval"]["ran"] is True
    settings = record["eval"]["settings"]
    assert settings["prompt_template"] == TEMPLATE and settings["max_new_tokens"] == 5 and settings["n"] == 2
    # explicit flags win here too
    generate_calls.clear()
    code = cli.main(["analyze", "--checkpoints", str(templated_run / "checkpoints"), "--out", str(tmp_path / "b"),
                     "--eval-limit", "1", "--prompt-template", "{prompt}", "--max-new-tokens", "2"])
    assert code == 0 and generate_calls[0]["prompts"] == _embedded_test_prompts(1) and generate_calls[0]["max_new_tokens"] == 2
