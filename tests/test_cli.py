import json
import subprocess
import sys

import pytest

from conftest import tiny_overrides
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
