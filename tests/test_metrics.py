"""metrics.jsonl: the log the trainer appends to and the one reader everything else uses; and the
shared helpers underneath them (atomic writes, the tolerant median)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from effopd import utils
from effopd.metrics import MetricsLog, read_metrics
from effopd.utils import atomic_write_text, median, write_json


def _write(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


# ---- read_metrics ------------------------------------------------------------------------------


def test_damaged_last_line_is_skipped_and_counted(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, ['{"step": 0, "eval/accuracy": 0.25}', '{"step": 1, "train/loss": 2.0}', '{"step": 2, "train/lo'])
    rows, note = read_metrics(path)
    assert rows == [{"step": 0, "eval/accuracy": 0.25}, {"step": 1, "train/loss": 2.0}]
    assert note == f"{path}: skipped 1 unreadable line(s)"


def test_damaged_middle_line_keeps_the_rows_around_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, ['{"step": 0}', '{"step": 1, "x"', "[1, 2]", "", '{"step": 3}'])  # cut off, not an object, blank
    rows, note = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 3]
    assert "skipped 2 unreadable line(s)" in note


def test_empty_and_missing_files_give_no_rows_and_say_why(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert read_metrics(empty) == ([], f"{empty} holds no metrics")
    only_damage = tmp_path / "damaged.jsonl"
    only_damage.write_text('{"step": 0,')
    assert read_metrics(only_damage) == ([], f"{only_damage} holds no metrics")
    rows, note = read_metrics(tmp_path / "absent.jsonl")
    assert rows == [] and "not found" in note


def test_rows_come_back_in_step_order(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, ['{"step": 2, "a": 1}', '{"step": 0}', '{"step": 2, "a": 2}', '{"note": "no step"}', '{"step": 1}'])
    rows, note = read_metrics(path)
    assert note is None
    # a row without a numeric step sorts as step 0; rows of one step keep their file order
    assert rows == [{"step": 0}, {"note": "no step"}, {"step": 1}, {"step": 2, "a": 1}, {"step": 2, "a": 2}]


def test_undecodable_bytes_do_not_stop_the_reader(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 0}\n{"step": 1, "s": "\xff"}\n')
    rows, note = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1] and note is None


# ---- MetricsLog --------------------------------------------------------------------------------


def test_log_appends_and_truncate_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True)
    for step in range(5):
        log.log(step, {"train/loss": 1.0 / (step + 1)})
    log.truncate_after(2)
    rows, note = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2] and note is None
    log.log(3, {"train/loss": 0.5})
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 3, "train/loss": 0.5}


def test_disabled_log_writes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=False)
    log.log(0, {"a": 1})
    log.truncate_after(0)
    assert not path.exists()


# ---- median ------------------------------------------------------------------------------------


@pytest.mark.parametrize("xs, expected", [
    ([3, 1, 2], 2.0),
    ([4, 1, 3, 2], 2.5),
    ([None, 5, float("nan"), 1, None], 3.0),
    ([float("inf"), 1.0, 2.0, 3.0], 2.0),
    ([True, 7], 7.0),          # a bool is not a number here
    (["x", 2, {"a": 1}], 2.0),  # nor is anything read from damaged JSON
])
def test_median_ignores_what_is_not_a_finite_number(xs, expected):
    assert median(xs) == expected


def test_median_of_nothing_is_none():
    assert median([]) is None
    assert median([None, float("nan")]) is None
    assert median(x for x in ()) is None


def test_median_accepts_a_generator_and_returns_a_float():
    m = median(x for x in (5, 1, 9))
    assert m == 5 and isinstance(m, float)


# ---- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_replaces_leaves_no_temporary_and_honours_the_umask(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and path.read_text().endswith("\n")
    atomic_write_text(path, "é\n")
    assert path.read_bytes() == "é\n".encode("utf-8")
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json(path, {"old": True})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})  # fails while encoding, before any file is made

    def no_rename(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(utils.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(path, "new")  # fails after the temporary file was written: it is removed
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_the_reader_and_the_helpers_import_without_torch():
    code = "import sys, effopd.metrics, effopd.utils, effopd.report.load; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"



def test_truncate_after_drops_later_steps_and_a_damaged_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a": 3}\n{"step": 3, "a"')
    MetricsLog(path, enabled=True).truncate_after(1)
    assert path.read_text() == '{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n'
