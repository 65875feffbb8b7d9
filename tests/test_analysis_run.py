"""analyze() end to end on a tiny base and synthetic checkpoints whose answer is known:
every selected weight moves along one fixed rank-2 direction, t/T of the way at step t."""

import json
import math

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from effopd.analysis import AnalysisError, analyze, synthetic
from effopd.analysis.run import JSON_FILE, TENSORS_FILE

STEPS = [10, 20, 30]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny matrices: extra threads only add synchronisation overhead


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = tf.Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    base = synthetic.write_base(cfg, root / "base")
    ckpts = synthetic.write_run(base, root / "run" / "checkpoints", STEPS, rank=2, noise=0.02)
    return root, base, ckpts


def projection_eval(base, final):
    """accuracy = <θ − θ_0, θ_T − θ_0> / ‖θ_T − θ_0‖²: 0 at the base, 1 at the final checkpoint,
    about α·t/T for θ_0 + α(θ_t − θ_0)."""
    b, f = load_file(base / "model.safetensors"), load_file(final / "model.safetensors")
    D = {k: f[k].double() - b[k].double() for k in b}
    den = sum(float((d * d).sum()) for d in D.values())

    def eval_fn(model_dir):
        m = load_file(model_dir / "model.safetensors")
        return {"accuracy": sum(float(((m[k].double() - b[k].double()) * D[k]).sum()) for k in D) / den, "n": 1}

    return eval_fn


def strict_json(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_analyze_end_to_end(run, tmp_path):
    root, base, ckpts = run
    calls = []
    eval_fn = projection_eval(base, ckpts[-1][1])
    record = analyze(base, ckpts, tmp_path / "out", rank=2, eval_fn=lambda p: calls.append(p) or eval_fn(p),
                     alphas=(0, 1, 2, 3), window=1, progress=False)
    on_disk = strict_json(tmp_path / "out" / JSON_FILE)
    assert on_disk == record and record["schema"] == "effopd.analysis/1" and record["steps"] == STEPS
    selected = record["groups"]["selected"]
    assert len(selected) == 14 and all(record["modules"][n]["svd_method"] == "exact" for n in selected)

    # 1: every update moves 5% of its weight norm (scale=0.05) at the final step; shares add to 1
    mag = record["magnitude"]
    assert all(mag["per_module"][n]["rel"][-1] == pytest.approx(0.05, rel=0.05) for n in selected)
    assert sum(m["share"][-1] for m in mag["per_module"].values()) == pytest.approx(1.0)
    assert mag["heatmap"]["layers"] == [0, 1] and "q" in mag["heatmap"]["types"]
    assert mag["total_norm"][0] < mag["total_norm"][1] < mag["total_norm"][2]
    # 4: rank-2 update with singular values 1 : 1/2 -> stable rank 5/4, effective rank about 2
    spec = record["spectrum"]["summary"]
    assert spec["stable_rank"][-1] == pytest.approx(1.25, rel=0.05)
    assert spec["effective_rank_frac"][-1] < 0.3
    # 6: the direction is fixed from the start, so every module locks in at the first checkpoint
    align = record["alignment"]
    assert all(a["lock_in_step"] == 10 for a in align["per_module"].values())
    assert align["summary"]["locked_share"] == [1.0, 1.0, 1.0]
    # 8: u1 barely moves; the trajectory tensors exist
    tensors = load_file(tmp_path / "out" / TENSORS_FILE)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[f"u1/{name}"].shape == (3, 16) and tensors[f"singular_values/{name}"].shape == (3, 16)
    assert len(record["trajectory"][name]["variance_explained"]) <= 3
    # 9: only the first embedding rows moved
    shift = record["embedding_shift"]["model.embed_tokens.weight"]
    assert shift["median"][-1] == pytest.approx(1.0) and shift["min"][-1] < 1.0
    assert tensors["embedding_cos/model.embed_tokens.weight"].shape == (3, 64)

    # 2, 3, 5, 7
    ev = record["eval"]
    assert ev["ran"] and ev["base"]["accuracy"] == pytest.approx(0.0, abs=1e-9)
    assert ev["checkpoints"][-1]["accuracy"] == pytest.approx(1.0)
    assert [p["step"] for p in ev["efficiency"]] == STEPS
    assert ev["checkpoints"][0]["accuracy"] == pytest.approx(1 / 3, abs=0.02)
    assert set(ev["contribution"]["types"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert [w["layers"] for w in ev["contribution"]["windows"]] == [[0], [1]]
    # the update is additive: applying one group plus removing it from the final adds to 1
    for t, r in ev["contribution"]["types"].items():
        assert r["apply"]["accuracy"] + r["remove"]["accuracy"] == pytest.approx(1.0, abs=1e-6), t
    assert [r["frac"] for r in ev["reconstruction"]] == [0.01, 0.05, 0.1]
    assert all("accuracy" in r["top"] and "accuracy" in r["bottom"] for r in ev["reconstruction"])
    # the top-k% reconstruction keeps the rank-2 direction: close to the final accuracy
    assert ev["reconstruction"][-1]["top"]["accuracy"] > 0.9
    scaling = {(r["step"], r["alpha"]): r["recovery"] for r in ev["scaling"]}
    assert set(scaling) == {(s, a) for s in (10, 20) for a in (0, 1, 2, 3)}
    assert scaling[(10, 3)] == pytest.approx(1.0, abs=0.03)  # 3 x (10/30) of the way
    assert scaling[(20, 2)] == pytest.approx(4 / 3, abs=0.03)
    # evaluations: base + 3 checkpoints, 7 types x 2, 2 windows x 2, 3 fracs x 2, 2 early x 2 alphas
    assert len(calls) == 1 + 3 + 14 + 4 + 6 + 4
    assert not list((tmp_path / "out").glob(".eval-models-*"))  # built models are cleaned up

    with pytest.raises(AnalysisError, match="--overwrite"):
        analyze(base, ckpts, tmp_path / "out", progress=False)


def test_without_eval_and_with_randomized_svd(run, tmp_path):
    root, base, ckpts = run
    # the base itself as step 0: a zero update has no spectrum or direction (null), not a crash
    record = analyze(base, [(0, base)] + ckpts[:2], tmp_path / "out", rank=2, exact_svd=False, progress=False)
    assert record["eval"] == {"ran": False, "reason": "no eval_fn given (evaluation switched off)"}
    assert record["settings"]["exact_svd"] is False
    assert {m.get("svd_method") for m in record["modules"].values() if m["spectral"]} == {"randomized"}
    assert all(a["lock_in_step"] == 10 and a["overlap"][0] is None for a in record["alignment"]["per_module"].values())
    assert record["spectrum"]["summary"]["effective_rank"][0] is None
    assert record["magnitude"]["total_norm"][0] == 0.0
    with pytest.raises(AnalysisError, match="unknown module type"):
        analyze(base, ckpts, tmp_path / "out2", types=["attention"], progress=False)


def test_gpt2_with_fused_attention(tmp_path):
    cfg = tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    base = synthetic.write_base(cfg, tmp_path / "base")
    ckpts = synthetic.write_run(base, tmp_path / "ckpts", [1, 4], rank=1)
    record = analyze(base, ckpts, tmp_path / "out", rank=1, progress=False)
    assert record["magnitude"]["heatmap"]["types"] == ["qkv", "o", "up", "down", "norm"]
    assert set(record["embedding_shift"]) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(a["lock_in_step"] == 1 for a in record["alignment"]["per_module"].values())
    assert all(not math.isnan(x) for x in record["magnitude"]["total_norm"])


def test_a_trainer_output_dir_is_analysed_like_the_same_weights_in_effopd_checkpoints(run, tmp_path):
    """A transformers/TRL ``Trainer`` writes ``output_dir/checkpoint-N`` (weights, optimizer.pt,
    trainer_state.json): ``analyze`` takes that folder as it is and gives the numbers it gives for
    the same weights as effopd checkpoints."""
    import shutil

    from effopd.analysis import list_checkpoints

    root, base, ckpts = run
    out = tmp_path / "trl-output"
    for step, path in ckpts:
        dst = out / f"checkpoint-{step}"
        shutil.copytree(path, dst)
        (dst / "COMPLETE").unlink(missing_ok=True)  # the Trainer writes no effopd manifest
        (dst / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (out / "runs").mkdir()  # the Trainer's tensorboard folder sits beside the checkpoints
    found = list_checkpoints(out)
    assert [s for s, _ in found] == [s for s, _ in ckpts]
    a = analyze(base, ckpts, tmp_path / "a", rank=2, progress=False)
    b = analyze(base, found, tmp_path / "b", rank=2, progress=False)
    for key in ("magnitude", "spectrum", "alignment", "modules"):
        assert a[key] == b[key]

    (out / f"checkpoint-{ckpts[0][0]}" / "trainer_state.json").unlink()  # a save that did not finish
    with pytest.warns(UserWarning, match="no trainer_state.json"):
        assert [s for s, _ in list_checkpoints(out)] == [s for s, _ in ckpts[1:]]
    (out / f"checkpoint-{ckpts[0][0]}" / "trainer_state.json").write_text("{}")
    adapter = out / "checkpoint-999"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AnalysisError, match="merge_and_unload"):
        list_checkpoints(out)
