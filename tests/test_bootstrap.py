"""The embedded testbeds' builders: the corpus rules and the separately pre-trained student."""

import json
import random

import pytest

from effopd import cli
from effopd.bootstrap import SeparateConfig, SFTStage, corpus_batch
from effopd.data.task import TaskSpec, make_splits
from effopd.models import load_model, load_tokenizer, resolve


def test_worked_max_ops_writes_longer_problems_bare():
    stage = SFTStage(steps=1, batch_size=400, worked_frac=1.0, min_ops=1, max_ops=3, worked_max_ops=2)
    pairs = corpus_batch(random.Random(0), stage, TaskSpec(1, 3, 2), exclude=set())
    by_ops = {}
    for prompt, completion in pairs:
        ops = prompt.count("+") + prompt.count("-")
        by_ops.setdefault(ops, set()).add(completion.startswith("\\boxed{"))
    assert by_ops[1] == by_ops[2] == {False}  # always worked out
    assert by_ops[3] == {True}  # always bare


def test_corpus_never_holds_an_excluded_prompt():
    spec = TaskSpec(3, 3, 2)
    held = {e.prompt for e in make_splits(spec, 0, n_train=10, n_val=50, n_test=200)["test"]}
    stage = SFTStage(steps=1, batch_size=2000, min_ops=3, max_ops=3)
    assert not held & {p for p, _ in corpus_batch(random.Random(1), stage, spec, held)}


@pytest.mark.slow
def test_separate_testbed_student_is_its_own_model(tmp_path, capsys):
    assert cli.main(["bootstrap", "--separate", "--reduced", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bootstrap.json").read_text())
    teacher, student = (load_model(str(tmp_path / r), r) for r in ("teacher", "student"))
    embedded = load_model(resolve("embedded", "teacher"), "teacher")
    assert student.config.hidden_size * 2 == teacher.config.hidden_size == embedded.config.hidden_size
    assert len(load_tokenizer(str(tmp_path / "student"))) == len(load_tokenizer(str(tmp_path / "teacher")))
    assert record["student"]["parameters"] < record["teacher"]["parameters"] / 3
    assert record["config"]["task"] == {"min_ops": 3, "max_ops": 3, "digits": 2}
    assert record["teacher"]["test_greedy_accuracy"] > 0.8  # the copied teacher solves the 3-operation task
    assert SeparateConfig().student.max_ops < SeparateConfig().task.min_ops  # the target task is not in its corpus
    assert "student" in capsys.readouterr().out
