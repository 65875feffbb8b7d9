"""Bad inputs and first-hour usage answered with one clear line (exit code 2 for input errors),
never a traceback; command-line forms a newcomer types."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from effopd import cli
from effopd.config import ConfigError, load_config, preset_path
from effopd.data import apply_template

from conftest import tiny_overrides, train_run


def _train(tiny_models, run, *extra, **overrides):
    return cli.main(["train", "--run-dir", str(run), *extra, *tiny_overrides(tiny_models, **overrides)])


# ---- prompt templates ----------------------------------------------------------------------


@pytest.mark.parametrize("typed", ["Q: {prompt} A:", "{prompt}", "Solve {prompt} and put it in \\boxed{}.", "{prompt} #1"])
def test_a_template_typed_on_the_command_line_is_taken_as_written(typed):
    cfg = load_config([], [f"data.prompt_template={typed}"])
    assert cfg.data.prompt_template == typed


def test_template_braces_other_than_the_prompt_are_literal():
    assert apply_template("{prompt} in \\boxed{} and {x}", "1+1") == "1+1 in \\boxed{} and {x}"
    cfg = load_config([preset_path("qwen3-1.7b-opd")], ["data.train=t.jsonl", "data.eval=e.jsonl"])
    rendered = apply_template(cfg.data.prompt_template, "What is 2+2?")
    assert "What is 2+2? Please reason step by step" in rendered and "within \\boxed{}." in rendered


def test_a_template_without_the_prompt_is_named():
    with pytest.raises(ConfigError, match="data.prompt_template"):
        load_config([], ["data.prompt_template=Answer:"])


def test_null_still_means_none_for_an_optional_string():
    assert load_config([], ["model.base=null"]).model.base is None


# ---- command-line forms ----------------------------------------------------------------------


def test_overrides_after_flags_are_read_as_overrides(tmp_path, capsys):
    # an unknown key after a flag reaches the config (and is named there), not argparse's usage line
    assert cli.main(["train", "--run-dir", str(tmp_path / "r"), "--no-progress", "optim.lrr=3e-5"]) == 2
    assert "unknown key `optim.lrr`" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_stray_word_is_still_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--run-dir", str(tmp_path / "r"), "--bogus-flag"])
    assert exit_.value.code == 2 and "--bogus-flag" in capsys.readouterr().err


def test_report_labels_take_several_values():
    import argparse

    from effopd.report import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["a", "b", "--label", "A", "B"]).label == ["A", "B"]
    assert p.parse_args(["a", "b", "--label", "A", "--label", "B"]).label == ["A", "B"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("effopd ")


@pytest.mark.parametrize("flag", ["--samples", "--max-new-tokens", "--limit", "--batch-size"])
def test_eval_counts_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", "embedded", flag, "0"])
    assert exit_.value.code == 2 and "must be > 0" in capsys.readouterr().err


# ---- inputs that used to be tracebacks -------------------------------------------------------


def test_sft_gt_without_solutions_is_one_line(tiny_models, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8)))
    code = _train(tiny_models, tmp_path / "r", "--no-progress", **{"loss.method": "sft-gt", "data.train": str(data),
                                                                     "data.eval": str(data)})
    err = capsys.readouterr().err
    assert code == 2 and "worked solutions" in err and "d.jsonl:1 " in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_responses_beyond_the_context_are_refused_with_the_lengths(tiny_models, tmp_path, capsys):
    # the tiny models' context is 128 positions (tests/conftest.py builds them with bootstrap.make_model)
    code = _train(tiny_models, tmp_path / "r", "--no-progress", **{"rollout.max_new_tokens": 200})
    err = capsys.readouterr().err
    assert code == 2 and "context of 128" in err and "max_new_tokens (200)" in err
    assert not (tmp_path / "r").exists()


def test_unknown_module_types_are_named():
    with pytest.raises(ConfigError, match="extrapolate.modules"):
        load_config([], ["extrapolate.modules=[q,attn]"])


def test_effopd_leaves_out_parameters_of_unknown_naming(tiny_models):
    from effopd.models import load_model
    from effopd.train import make_extrapolator

    model = load_model(tiny_models["student"], "student")
    model.model.layers[0].mlp.router = torch.nn.Linear(4, 4, bias=False)  # an MoE router: no known naming
    ex = make_extrapolator(load_config([], ["extrapolate.enabled=true"]), model)
    assert ex.params and not any("router" in n for n in ex.params)


def test_a_finished_run_resumed_says_so(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    train_run(tiny_overrides(tiny_models), run)
    capsys.readouterr()
    assert _train(tiny_models, run, "--no-progress", "--resume") == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "train.steps=4" in out
    assert '"eval/accuracy"' in out  # the final evaluation, not an empty {}


def test_no_progress_prints_a_line_per_evaluation(tiny_models, tmp_path, capsys):
    assert _train(tiny_models, tmp_path / "r", "--no-progress") == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [ln.split(":")[0] for ln in lines] == ["step 1/2", "step 2/2"] and "eval/accuracy" in lines[0]


def test_a_full_disk_while_writing_evaluations_is_one_line(tiny_models, tmp_path, capsys, monkeypatch):
    from effopd import train as train_mod

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(train_mod, "atomic_write_text", full)
    monkeypatch.setattr(train_mod, "init_run_dir", lambda cfg, run_dir, overwrite: run_dir.mkdir(parents=True))
    assert _train(tiny_models, tmp_path / "r", "--no-progress") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-0.jsonl" in err[0] and "No space left on device" in err[0] and "--resume" in err[0]


def test_pickled_weights_are_refused_with_the_conversion(tiny_models, tmp_path, capsys):
    from effopd.models import load_model

    d = tmp_path / "bin-model"
    load_model(tiny_models["student"], "student").save_pretrained(d, safe_serialization=False)
    for f in d.glob("*.safetensors"):
        f.unlink()
    if not any(d.glob("*.bin")):
        torch.save({}, d / "pytorch_model.bin")
    assert cli.main(["eval", "--model", str(d), "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "safetensors only" in err and "save_pretrained" in err


def test_report_reads_an_analyze_out_folder(tmp_path_factory):
    from conftest import make_report_run
    from effopd.report.load import load_run

    run = make_report_run(tmp_path_factory, "opd")
    direct = load_run(run / "analysis")
    assert direct.analysis is not None and direct.analysis_note is None


def test_nan_weights_in_a_checkpoint_are_named_by_analyze(tiny_models, tmp_path):
    from effopd.analysis import AnalysisError, analyze
    from effopd.models import load_model

    model = load_model(tiny_models["student"], "student")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "ck")
    with pytest.raises(AnalysisError, match=r"up_proj.*NaN"):
        analyze(tiny_models["student"], [(1, tmp_path / "ck")], tmp_path / "out", progress=False)


def test_a_failed_analysis_write_leaves_no_partial_output(tiny_models, tmp_path, monkeypatch, capsys):
    from effopd.analysis import run as run_mod

    def full(path, obj, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run_mod, "write_json", full)
    out = tmp_path / "out"
    code = cli.main(["analyze", "--base", tiny_models["student"], "--checkpoints", f"1={tiny_models['teacher']}",
                     "--out", str(out), "--no-eval"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("effopd ")]  # not the progress bar
    assert code == 1 and len(err) == 1 and "analysis.json" in err[0] and "No space left" in err[0]
    assert not (out / "tensors.safetensors").exists() and not (out / "analysis.json").exists()


def test_a_config_typo_is_answered_before_torch_is_imported():
    import subprocess
    import sys

    code = ("import sys\nfrom effopd.config import ConfigError, load_config\ntry:\n    load_config([], ['optim.lrr=1'])\n"
            "except ConfigError as e:\n    print('torch' in sys.modules, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("False ") and "did you mean `optim.lr`" in out
