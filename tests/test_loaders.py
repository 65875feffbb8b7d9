"""Tests for effopd.data.loaders: every input format, every error message, and a fuzz test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effopd.data.example import Example
from effopd.data.loaders import DatasetError, load_examples, write_jsonl

ROWS = [
    {"prompt": "What is 2+3?", "answer": "5", "solution": "2+3=5. \\boxed{5}"},
    {"prompt": "What is 7*6?", "answer": "42"},
    {"prompt": "Half of 1?", "answer": "0.5", "solution": None},
]
# The fuzz tests reuse one tmp_path file across examples: each example overwrites it.
TMP_PATH_OK = [HealthCheck.function_scoped_fixture]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_rows(path: Path, rows: list) -> Path:
    return write_lines(path, [json.dumps(r) for r in rows])


def assert_matches_rows(examples: list[Example], rows: list[dict]) -> None:
    assert [(e.prompt, e.answer, e.solution) for e in examples] == [
        (r["prompt"], r["answer"], r.get("solution")) for r in rows
    ]


# ---------------------------------------------------------------------------- formats


def test_jsonl_sources_count_lines_and_skip_blanks(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1])])
    examples = load_examples(path)
    assert_matches_rows(examples, ROWS[:2])
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4"]


def test_jsonl_with_bom_and_crlf_line_endings(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in ROWS) + b"\r\n")
    examples = load_examples(path)
    assert_matches_rows(examples, ROWS)
    assert examples[2].source == f"{path}:3"


def test_write_jsonl_round_trip(tmp_path):
    examples = [Example("p1", "1", "sol"), Example("p2\nline two ☃", "x"), Example("p3", "3")]
    path = tmp_path / "new" / "dir" / "out.jsonl"  # parents do not exist yet
    write_jsonl(examples, path)
    loaded = load_examples(path)
    assert [(e.prompt, e.answer, e.solution) for e in loaded] == [
        (e.prompt, e.answer, e.solution) for e in examples
    ]
    # solution is written only when present; no temporary file is left behind
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records[1] == {"prompt": "p2\nline two ☃", "answer": "x"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]


def test_write_jsonl_replaces_existing_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl([Example("a", "1"), Example("b", "2")], path)
    write_jsonl([Example("c", "3")], path)
    assert [e.prompt for e in load_examples(path)] == ["c"]


texts = st.text(min_size=1).filter(lambda s: s.strip())


@settings(max_examples=50, deadline=None, suppress_health_check=TMP_PATH_OK)
@given(st.lists(st.builds(Example, texts, texts, st.none() | st.text()), min_size=1, max_size=5))
def test_write_jsonl_round_trip_fuzz(tmp_path, examples):
    path = tmp_path / "fuzz_rt.jsonl"
    write_jsonl(examples, path)
    loaded = load_examples(path)
    assert [(e.prompt, e.answer, e.solution) for e in loaded] == [
        (e.prompt, e.answer, e.solution) for e in examples
    ]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    examples = load_examples(path)
    assert_matches_rows(examples, ROWS)
    assert [e.source for e in examples] == [f"{path}[row {i}]" for i in range(3)]


def test_saved_dataset(tmp_path):
    import datasets

    path = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    examples = load_examples(path)
    assert_matches_rows(examples, ROWS)
    assert examples[2].source == f"{path}[row 2]"
    with pytest.raises(DatasetError, match="without splits"):
        load_examples(path, split="train")


def test_saved_dataset_dict_split_selection(tmp_path):
    import datasets

    path = tmp_path / "saved_dict"
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:2]), test=datasets.Dataset.from_list(ROWS[2:])
    )
    dd.save_to_disk(str(path))
    assert_matches_rows(load_examples(path, split="train"), ROWS[:2])
    assert_matches_rows(load_examples(path, split="test"), ROWS[2:])
    with pytest.raises(DatasetError) as err:
        load_examples(path, split_key="data.train_split")
    msg = str(err.value)
    assert str(path) in msg and "'train'" in msg and "'test'" in msg and "data.train_split=NAME" in msg
    with pytest.raises(DatasetError) as err:
        load_examples(path, split="validation")
    assert "'validation'" in str(err.value) and "'train'" in str(err.value)


def test_saved_dataset_dict_single_split_needs_no_split(tmp_path):
    import datasets

    path = tmp_path / "one_split"
    datasets.DatasetDict(only=datasets.Dataset.from_list(ROWS)).save_to_disk(str(path))
    assert_matches_rows(load_examples(path), ROWS)


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="save_to_disk") as err:
        load_examples(tmp_path / "plain")
    assert "plain" in str(err.value)


# ---------------------------------------------------------------------------- options


def test_custom_field_names(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"question": "q?", "target": "t", "steps": "s"}])
    [ex] = load_examples(
        path, prompt_field="question", answer_field="target", solution_field="steps"
    )
    assert (ex.prompt, ex.answer, ex.solution) == ("q?", "t", "s")


@pytest.mark.parametrize(
    "answer, expected", [(42, "42"), (42.0, "42"), (-3, "-3"), (0.5, "0.5"), (10**20, str(10**20))]
)
def test_numeric_answers(tmp_path, answer, expected):
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "p", "answer": answer}])
    assert load_examples(path)[0].answer == expected


def test_numeric_answers_in_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": [7, 12]}), path)
    assert [e.answer for e in load_examples(path)] == ["7", "12"]


def test_limit_stops_reading(tmp_path):
    # line 3 is broken, but limit=2 never reaches it
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), json.dumps(ROWS[1]), "{oops"])
    assert_matches_rows(load_examples(path, limit=2), ROWS[:2])
    assert len(load_examples(path, limit=1)) == 1
    with pytest.raises(DatasetError, match=":3"):
        load_examples(path)
    with pytest.raises(ValueError, match="limit"):
        load_examples(path, limit=0)


# ---------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match="no such file") as err:
        load_examples(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err.value)


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\n")
    with pytest.raises(DatasetError) as err:
        load_examples(path)
    msg = str(err.value)
    assert "d.csv" in msg and "'.csv'" in msg and ".jsonl" in msg and ".parquet" in msg


def test_invalid_json_quotes_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), '{"prompt": "unfinished'])
    with pytest.raises(DatasetError) as err:
        load_examples(path)
    msg = str(err.value)
    assert f"{path}:2" in msg and "invalid JSON" in msg and '{"prompt": "unfinished' in msg


def test_deeply_nested_json_is_a_dataset_error(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["[" * 100_000])
    with pytest.raises(DatasetError, match=":1"):
        load_examples(path)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"prompt": "\xff"}\n')
    with pytest.raises(DatasetError, match="UTF-8") as err:
        load_examples(path)
    assert f"{path}:2" in str(err.value)


def test_row_not_an_object(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "[1, 2]"])
    with pytest.raises(DatasetError, match="got list") as err:
        load_examples(path)
    assert f"{path}:2" in str(err.value)


@pytest.mark.parametrize("role, other", [("prompt", "answer"), ("answer", "prompt")])
def test_missing_field_names_field_row_fields_and_option(tmp_path, role, other):
    row = {other: "x", "extra": 1}
    path = write_rows(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], row])
    with pytest.raises(DatasetError) as err:
        load_examples(path)
    msg = str(err.value)
    assert f"{path}:3" in msg
    assert f"missing {role} field '{role}'" in msg
    assert f"'{other}', 'extra'" in msg  # the fields the row has
    assert f"data.{role}_field" in msg


def test_missing_custom_field_in_parquet_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    with pytest.raises(DatasetError) as err:
        load_examples(path, prompt_field="question")
    msg = str(err.value)
    assert f"{path}[row 0]" in msg and "'question'" in msg and "data.prompt_field" in msg


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": "", "answer": "1"}, "prompt"),
        ({"prompt": "  \n", "answer": "1"}, "prompt"),
        ({"prompt": "p", "answer": ""}, "answer"),
        ({"prompt": "p", "answer": None}, "answer"),
    ],
)
def test_empty_prompt_or_answer(tmp_path, row, field):
    path = write_rows(tmp_path / "d.jsonl", [ROWS[0], row])
    with pytest.raises(DatasetError, match="empty") as err:
        load_examples(path)
    assert f"{path}:2" in str(err.value) and f"'{field}'" in str(err.value)


def test_null_answer_in_parquet_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", None]}), path)
    with pytest.raises(DatasetError, match="null answer") as err:
        load_examples(path)
    assert f"{path}[row 1]" in str(err.value)


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": 5, "answer": "1"},
        {"prompt": "p", "answer": [1]},
        {"prompt": "p", "answer": True},
        {"prompt": "p", "answer": 1, "solution": {"a": 1}},
    ],
)
def test_wrong_types(tmp_path, row):
    path = write_rows(tmp_path / "d.jsonl", [row])
    with pytest.raises(DatasetError, match=f"{path.name}:1"):
        load_examples(path)


def test_nan_answer_rejected(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "p", "answer": NaN}'])
    with pytest.raises(DatasetError, match="finite"):
        load_examples(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match="no rows") as err:
        load_examples(path)
    assert "empty.jsonl" in str(err.value)


def test_empty_parquet_and_saved_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "e.parquet")
    with pytest.raises(DatasetError, match="no rows"):
        load_examples(tmp_path / "e.parquet")
    # datasets 5.2 cannot load an empty saved Dataset back; either way the error names the dir
    datasets.Dataset.from_dict({"prompt": [], "answer": []}).save_to_disk(str(tmp_path / "e_ds"))
    with pytest.raises(DatasetError, match="e_ds"):
        load_examples(tmp_path / "e_ds")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="parquet") as err:
        load_examples(path)
    assert "bad.parquet" in str(err.value)


# ---------------------------------------------------------------------------- fuzz

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["prompt", "answer", "solution", "x"]) | st.text(), children,
                      max_size=4),
    max_leaves=8,
)
jsonl_like = st.lists(st.one_of(json_values.map(json.dumps), st.text(max_size=30)), max_size=6).map(
    "\n".join
)


def check_loads_or_dataset_error(path: Path) -> None:
    try:
        examples = load_examples(path)
    except DatasetError as e:
        assert str(path) in str(e)
        return
    assert examples  # a loaded dataset is never empty
    for ex in examples:
        assert isinstance(ex.prompt, str) and ex.prompt.strip()
        assert isinstance(ex.answer, str) and ex.answer.strip()
        assert ex.solution is None or isinstance(ex.solution, str)
        assert ex.source.startswith(f"{path}:")


@settings(max_examples=100, deadline=None, suppress_health_check=TMP_PATH_OK)
@given(st.one_of(st.text(), jsonl_like))
def test_fuzz_text_loads_or_raises_dataset_error(tmp_path, text):
    path = tmp_path / "fuzz.jsonl"
    path.write_text(text, encoding="utf-8")
    check_loads_or_dataset_error(path)


@settings(max_examples=100, deadline=None, suppress_health_check=TMP_PATH_OK)
@given(st.binary())
def test_fuzz_bytes_loads_or_raises_dataset_error(tmp_path, data):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    check_loads_or_dataset_error(path)


def test_split_errors_name_a_key_that_exists(tmp_path):
    """Through the trainer's loader the message names the role's real config key."""
    import datasets

    from effopd.config import DataConfig, _all_keys, Config
    from effopd.data import load_split

    path = tmp_path / "saved_dict"
    datasets.DatasetDict(a=datasets.Dataset.from_list(ROWS), b=datasets.Dataset.from_list(ROWS)).save_to_disk(str(path))
    for which in ("train", "eval", "val"):
        with pytest.raises(DatasetError, match=f"data\\.{which}_split=NAME"):
            load_split(str(path), DataConfig(), which)
        assert f"data.{which}_split" in _all_keys(Config)
