"""Checkpoint reading: sharded == unsharded, streaming norms == whole-model norms, clear errors."""

import json
import shutil

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from effopd.analysis import synthetic
from effopd.analysis.dynamics import compute_dynamics, update_norms
from effopd.analysis.io import AnalysisError, CheckpointReader, common_names, list_checkpoints, parse_checkpoint_args

CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny matrices: extra threads only add synchronisation overhead


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tied Qwen3 base (single file and sharded) and two synthetic checkpoints."""
    root = tmp_path_factory.mktemp("io")
    cfg = tf.Qwen3Config(**CONFIG, tie_word_embeddings=True)
    base = synthetic.write_base(cfg, root / "base")
    sharded = synthetic.write_base(cfg, root / "base_sharded", max_shard_size="8KB")
    ckpts = synthetic.write_run(base, root / "checkpoints", [5, 10], rank=2)
    return {"root": root, "base": base, "sharded": sharded, "ckpts": ckpts}


def test_sharded_and_single_file_read_the_same(run):
    single, sharded = CheckpointReader(run["base"]), CheckpointReader(run["sharded"])
    assert len(list(run["sharded"].glob("model-*.safetensors"))) > 1
    assert single.names == sharded.names
    assert "lm_head.weight" not in single.names  # tied: not saved
    for n in single.names:
        assert single.shape(n) == sharded.shape(n)
        assert torch.equal(single.get(n), sharded.get(n))
    assert single.names.index("model.layers.1.mlp.up_proj.weight") < single.names.index("model.norm.weight")


def test_sharded_base_gives_the_same_analysis(run):
    ckpts = [CheckpointReader(p) for _, p in run["ckpts"]]
    a, ta = compute_dynamics(CheckpointReader(run["base"]), ckpts, [5, 10], rank=2, progress=False)
    b, tb = compute_dynamics(CheckpointReader(run["sharded"]), ckpts, [5, 10], rank=2, progress=False)
    assert a == b
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_streaming_norms_equal_whole_model_norms(run):
    base = tf.AutoModelForCausalLM.from_pretrained(run["base"]).state_dict()
    ckpt = tf.AutoModelForCausalLM.from_pretrained(run["ckpts"][1][1]).state_dict()
    streamed = update_norms(CheckpointReader(run["base"]), CheckpointReader(run["ckpts"][1][1]))
    assert set(streamed) == set(base) - {"lm_head.weight"}
    for n, v in streamed.items():
        assert v == pytest.approx(float((ckpt[n].double() - base[n].double()).norm()), rel=1e-12)
    total = torch.cat([(ckpt[n] - base[n]).flatten() for n in streamed]).norm()
    assert sum(v**2 for v in streamed.values()) ** 0.5 == pytest.approx(float(total), rel=1e-5)


def test_missing_directory_and_missing_shard(run, tmp_path):
    with pytest.raises(AnalysisError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="neither model.safetensors"):
        CheckpointReader(tmp_path / "empty")
    broken = shutil.copytree(run["sharded"], tmp_path / "broken")
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(AnalysisError, match=rf"shard .*{shard.name}.*missing") as e:
        CheckpointReader(broken)
    assert "tensors such as '" in str(e.value)


def test_corrupt_file_names_file_and_tensor(run, tmp_path):
    bad = shutil.copytree(run["base"], tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])  # truncated: the last tensor is cut
    with pytest.raises(AnalysisError, match=rf"{f}.*truncated or corrupt: tensor '[\w.]+'"):
        CheckpointReader(bad)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(AnalysisError, match="corrupt safetensors header"):
        CheckpointReader(bad)


def test_shape_and_name_mismatches_name_the_tensor(run, tmp_path):
    state = load_file(run["ckpts"][0][1] / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file({**state, name: torch.zeros(33, 16)}, str(wrong / "model.safetensors"))
    with pytest.raises(AnalysisError, match=rf"'{name}' has shape \[33, 16\] in .*wrong.* but \[32, 16\] in base"):
        common_names(CheckpointReader(run["base"]), CheckpointReader(wrong))
    del state["model.norm.weight"]
    save_file(state, str(wrong / "model.safetensors"))
    with pytest.raises(AnalysisError, match="missing \\['model.norm.weight'\\]"):
        common_names(CheckpointReader(run["base"]), CheckpointReader(wrong))


def test_untied_checkpoint_against_tied_base(run, tmp_path):
    state = load_file(run["ckpts"][0][1] / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    d = tmp_path / "untied"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    assert "lm_head.weight" not in common_names(CheckpointReader(run["base"]), CheckpointReader(d))


def test_listing_a_runs_checkpoints(run, tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 10):
        shutil.copytree(run["ckpts"][0][1], root / f"step-{step}")
    (root / ".tmp-step-12").mkdir()  # an interrupted save: not a checkpoint
    assert [s for s, _ in list_checkpoints(root)] == [2, 10]
    assert parse_checkpoint_args([str(root), f"7={run['ckpts'][1][1]}"]) == [
        (2, root / "step-2"), (7, run["ckpts"][1][1]), (10, root / "step-10")]
    assert parse_checkpoint_args([str(root / "step-10")]) == [(10, root / "step-10")]
    with pytest.raises(AnalysisError, match="given more than once"):
        parse_checkpoint_args([str(root), str(root / "step-2")])
    with pytest.raises(AnalysisError, match="'final' .* is not an integer"):
        parse_checkpoint_args([f"final={root / 'step-2'}"])
    with pytest.raises(AnalysisError, match="cannot tell the training step"):
        parse_checkpoint_args([str(run["base"])])
    (root / "step-10" / "COMPLETE").unlink()
    with pytest.raises(AnalysisError, match=rf"{root / 'step-10'} is incomplete"):
        list_checkpoints(root)
    manifest = json.loads((run["ckpts"][0][1] / "COMPLETE").read_text())
    assert "model.safetensors" in manifest["files"]
