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



def test_a_missing_relative_directory_is_named_as_a_local_directory(tmp_path, monkeypatch):
    import huggingface_hub

    from effopd.models import resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("a path must not reach the hub"))
    for name in ("./models/student", "runs/x/checkpoints/step-2", "../elsewhere", "~/no-such-model-dir"):
        with pytest.raises(ModelLoadError, match=f"the local directory {name} does not exist") as err:
            resolve(name, "student")
        assert "hub" in str(err.value) and "\n" not in str(err.value)  # says what else may be passed


def _offline_empty_cache(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, for the duration of one test."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: the variable alone comes too late
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.timeout(60)
def test_an_uncached_hub_id_offline_is_a_one_line_error(tmp_path, monkeypatch):
    _offline_empty_cache(monkeypatch, tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model("no-such-org/no-such-model", "teacher")
    msg = str(err.value)
    assert "\n" not in msg and "'no-such-org/no-such-model'" in msg and "teacher" in msg
    assert "not in the local Hugging Face cache" in msg and "could not be downloaded" in msg
    assert "huggingface-cli download no-such-org/no-such-model" in msg and "local directory" in msg


def test_a_cached_hub_id_resolves_to_its_local_snapshot(tmp_path, monkeypatch, tiny_models):
    """A hub id found in the local cache loads from there, without the network, as a local
    directory (the analysis reads its safetensors files)."""
    import shutil

    from effopd.models import resolve

    _offline_empty_cache(monkeypatch, tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / "models--tiny-org--tiny-student"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_models["student"], repo / "snapshots" / commit)
    path = resolve("tiny-org/tiny-student", "student")
    assert path == str(repo / "snapshots" / commit) and (repo / "snapshots" / commit / "model.safetensors").exists()
    model = load_model("tiny-org/tiny-student", "student", "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert load_tokenizer("tiny-org/tiny-student").get_vocab() == load_tokenizer(tiny_models["student"]).get_vocab()


def test_device_and_dtype_auto():
    from effopd.models import pick_device, pick_dtype

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", "cpu") == "float32" and pick_dtype("auto", "cuda") == "bfloat16"
    assert pick_dtype("float16", "cpu") == "float16"
    with pytest.raises(ModelLoadError, match="not one of"):
        pick_dtype("int8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="--device cpu"):
            pick_device("cuda")
