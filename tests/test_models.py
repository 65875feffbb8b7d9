import pytest
import torch

from effopd.bootstrap import build_tokenizer
from effopd.models import ModelLoadError, check_same_vocab, load_model, load_tokenizer


def test_vocab_mismatch_names_both_and_first_ids(task_tokenizer, tmp_path):
    other = build_tokenizer(["abc+def=ghi"])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ModelLoadError) as err:
        check_same_vocab(task_tokenizer, load_tokenizer(str(tmp_path / "other")), "stu-path", "tea-path")
    msg = str(err.value)
    assert "stu-path" in msg and "tea-path" in msg and "id 4" in msg


def test_same_vocab_passes(task_tokenizer):
    check_same_vocab(task_tokenizer, task_tokenizer, "a", "b")


def test_missing_model_path_is_clear(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(missing, "teacher")
    with pytest.raises(ModelLoadError, match="nope"):
        load_tokenizer(missing)


def test_unreadable_model_dir_is_clear(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load the student model"):
        load_model(str(tmp_path / "broken"), "student")


def test_embedded_models_load_and_share_vocab():
    tok_s, tok_t = load_tokenizer("embedded", "student"), load_tokenizer("embedded", "teacher")
    check_same_vocab(tok_s, tok_t, "embedded student", "embedded teacher")
    student, teacher = load_model("embedded", "student"), load_model("embedded", "teacher")
    s, t = dict(student.named_parameters()), dict(teacher.named_parameters())
    assert {n: p.shape for n, p in s.items()} == {n: p.shape for n, p in t.items()}  # same architecture
    # the student is the teacher after one more SFT stage on mostly bare answers (bootstrap.py): different weights
    assert any(not torch.equal(s[n], t[n]) for n in s)

