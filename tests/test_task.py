import pytest

from effopd.data import embedded_splits
from effopd.data.task import TaskSpec, bare_solution, generate_split, make_splits
from effopd.rewards import extract_boxed


def _evaluate_left_to_right(prompt: str) -> int:
    expr = prompt.rstrip("=")
    tokens, num, out = [], "", None
    for ch in expr:
        if ch in "+-":
            tokens.append(int(num)), tokens.append(ch)
            num = ""
        else:
            num += ch
    tokens.append(int(num))
    out = tokens[0]
    for op, val in zip(tokens[1::2], tokens[2::2]):
        out = out + val if op == "+" else out - val
    return out


def test_problems_are_correct_and_boxed():
    for ex in generate_split(300, TaskSpec(1, 4, 2), seed=5):
        assert ex.prompt.endswith("=")
        assert int(ex.answer) == _evaluate_left_to_right(ex.prompt)
        assert extract_boxed(ex.solution) == ex.answer
        assert extract_boxed(bare_solution(ex)) == ex.answer
        # one worked step per operation, each step's result feeding the next
        steps = ex.solution.split(";")[:-1]
        assert len(steps) == ex.prompt.count("+") + ex.prompt.count("-")
        assert all(int(s.split("=")[1]) >= 0 for s in steps)


def test_difficulty_knobs():
    exs = generate_split(200, TaskSpec(3, 3, 3), seed=1)
    for ex in exs:
        operands = ex.prompt.rstrip("=").replace("-", "+").split("+")
        assert len(operands) == 4 and all(len(o) == 3 for o in operands)


def test_splits_deterministic_and_disjoint():
    a, b = embedded_splits(seed=0), embedded_splits(seed=0)
    assert [e.prompt for e in a["test"]] == [e.prompt for e in b["test"]]
    assert len(a["test"]) >= 1000
    prompts = {k: {e.prompt for e in v} for k, v in a.items()}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]
    other = embedded_splits(seed=1)
    assert [e.prompt for e in other["test"]] != [e.prompt for e in a["test"]]


def test_test_split_independent_of_train_size():
    spec = TaskSpec()
    assert make_splits(spec, 3, n_train=10)["test"] == make_splits(spec, 3, n_train=50)["test"]


@pytest.mark.parametrize("kwargs", [dict(min_ops=0), dict(min_ops=3, max_ops=2), dict(digits=0)])
def test_bad_spec(kwargs):
    with pytest.raises(ValueError, match="TaskSpec"):
        TaskSpec(**kwargs)


def test_too_small_space_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        generate_split(10_000, TaskSpec(1, 1, 1), seed=0)
