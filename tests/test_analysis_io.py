"""Checkpoint reading: sharded == unsharded, streaming norms == whole-model norms, clear errors."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from effopd.analysis import dynamics, synthetic
from effopd.analysis.dynamics import compute_dynamics, row_blocks, row_cosines, update_norms
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


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux /proc/self/maps")
def test_reading_keeps_no_file_mapped_or_open(run):
    # Pages of a memory-mapped file count in the process's RSS while the mapping lives, so a
    # reader that maps its files costs as much peak memory as loading the model whole.
    files = {str(f.resolve()) for d in (run["base"], run["sharded"]) for f in d.glob("*.safetensors")}
    readers = [CheckpointReader(run["base"]), CheckpointReader(run["sharded"])]
    held = [r.get(n, rows) for r in readers for n in r.names for rows in (None, slice(1, 3)) if rows is None or r.shape(n)]
    assert held and all(t.untyped_storage().nbytes() == t.nbytes for t in held)  # a row block is no view of a whole tensor
    assert not [line for line in Path("/proc/self/maps").read_text().splitlines() if line.split()[-1] in files]
    open_files = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            open_files.add(os.readlink(fd))
        except OSError:  # the descriptor of the listing itself, closed by now
            pass
    assert not open_files & files


def test_row_blocks_and_dtypes_read_like_safetensors(run, tmp_path):
    r = CheckpointReader(run["sharded"])
    for n in r.names:
        whole = r.get(n)
        assert torch.equal(torch.cat([r.get(n, rows) for rows in row_blocks(r.shape(n), block=40)]), whole), n
        assert torch.equal(r.get(n, slice(3, 10_000)), whole[3:]), n
    state = {"bf16": torch.randn(7, 3).bfloat16(), "f16": torch.randn(5).half(), "i64": torch.arange(6).view(2, 3),
             "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    (tmp_path / "d").mkdir()
    save_file(state, str(tmp_path / "d" / "model.safetensors"))
    r = CheckpointReader(tmp_path / "d")
    for n, t in state.items():
        assert r.get(n).dtype == t.dtype and torch.equal(r.get(n), t), n
    assert torch.equal(r.get("bf16", slice(2, 5)), state["bf16"][2:5])


def test_row_cosines_in_blocks_equal_the_whole_computation():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(1000, 24, generator=g)
    Wt = W0 + 0.5 * torch.randn(1000, 24, generator=g)
    W0[3], Wt[10] = 0, 0
    den = W0.norm(dim=1) * Wt.norm(dim=1)  # the unblocked computation
    whole = torch.where(den > 0, (W0 * Wt).sum(1) / den, torch.full_like(den, float("nan")))
    assert whole[3].isnan() and whole[10].isnan() and not whole[:3].isnan().any()
    for block in (1, 24, 24 * 7, 24 * 999, 10**9):  # one row, 7 rows (uneven last block), ..., all rows
        torch.testing.assert_close(row_cosines(W0, Wt, block=block), whole, rtol=0, atol=0, equal_nan=True)


def test_embedding_read_in_blocks_gives_the_same_analysis(run, monkeypatch):
    ckpts = [CheckpointReader(p) for _, p in run["ckpts"]]
    a, ta = compute_dynamics(CheckpointReader(run["base"]), ckpts, [5, 10], rank=2, progress=False)
    monkeypatch.setattr(dynamics, "BLOCK", 16 * 5)  # 5 of the 64 embedding rows per block
    b, tb = compute_dynamics(CheckpointReader(run["base"]), ckpts, [5, 10], rank=2, progress=False)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, equal_nan=True)
    for key in ("spectrum", "alignment", "trajectory", "embedding_shift"):
        assert a[key] == b[key], key
    emb = "model.embed_tokens.weight"
    assert b["modules"][emb]["w0_norm"] == pytest.approx(a["modules"][emb]["w0_norm"], rel=1e-6)
    assert b["magnitude"]["per_module"][emb]["norm"] == pytest.approx(a["magnitude"]["per_module"][emb]["norm"], rel=1e-6)


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
    (root / "step-10" / "COMPLETE").unlink()  # incomplete: left out of the folder's listing, with a warning
    with pytest.warns(UserWarning, match=rf"incomplete checkpoint {root / 'step-10'}"):
        assert list_checkpoints(root) == [(2, root / "step-2")]
    # named explicitly, the same directory is taken as it is
    assert parse_checkpoint_args([f"10={root / 'step-10'}"]) == [(10, root / "step-10")]
    assert parse_checkpoint_args([str(root / "step-10")]) == [(10, root / "step-10")]
    (root / "step-2" / "COMPLETE").unlink()
    with pytest.warns(UserWarning), pytest.raises(AnalysisError, match="holds no complete checkpoint"):
        list_checkpoints(root)
    with pytest.raises(AnalysisError, match="does not exist"):
        list_checkpoints(tmp_path / "nowhere")
    manifest = json.loads((run["ckpts"][0][1] / "COMPLETE").read_text())
    assert "model.safetensors" in manifest["files"]
