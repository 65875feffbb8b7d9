"""Built models: scaling limits are bitwise, partial application is exact, reconstructions keep ‖ΔW‖."""

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from effopd.analysis import synthetic, weights
from effopd.analysis.io import CheckpointReader
from effopd.module_groups import DEFAULT_TYPES, module_group


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny matrices: extra threads only add synchronisation overhead


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A bfloat16 Llama base and one synthetic checkpoint of it (bf16 makes bitwise checks strict)."""
    root = tmp_path_factory.mktemp("weights")
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, dtype="bfloat16")
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(root / "base")
    (_, ckpt), = synthetic.write_run(root / "base", root / "ckpts", [10], rank=2, scale=0.2)
    base_sd = load_file(root / "base" / "model.safetensors")
    ckpt_sd = load_file(ckpt / "model.safetensors")
    assert base_sd["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    return root / "base", ckpt, base_sd, ckpt_sd


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_scaling_limits_are_bitwise(pair):
    base, ckpt, base_sd, ckpt_sd = pair
    assert_same(weights.scaled(base, ckpt, 0.0), base_sd)
    assert_same(weights.scaled(base, ckpt, 1.0), ckpt_sd)
    two = weights.scaled(base, ckpt, 2.0)
    name = "model.layers.1.self_attn.v_proj.weight"
    expected = base_sd[name].float() + 2 * (ckpt_sd[name].float() - base_sd[name].float())
    torch.testing.assert_close(two[name].float(), expected, rtol=1e-2, atol=1e-3)  # bf16 rounding
    only_q = weights.scaled(base, ckpt, 0.0, types=["q"])
    assert torch.equal(only_q["model.layers.0.self_attn.q_proj.weight"], base_sd["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(only_q[name], ckpt_sd[name])


def test_partial_application(pair):
    base, ckpt, base_sd, ckpt_sd = pair
    assert_same(weights.partial(base, ckpt, lambda n: True, "apply"), ckpt_sd)
    assert_same(weights.partial(base, ckpt, lambda n: False, "apply"), base_sd)
    assert_same(weights.partial(base, ckpt, lambda n: True, "remove"), base_sd)
    assert_same(weights.partial(base, ckpt, [], "remove"), ckpt_sd)
    up = weights.partial(base, ckpt, weights.by_types(["up"]), "apply")
    for k, v in up.items():
        assert torch.equal(v, ckpt_sd[k] if module_group(k).type == "up" else base_sd[k]), k
    layer1 = weights.partial(base, ckpt, weights.by_layers([1]), "remove")
    for k, v in layer1.items():
        assert torch.equal(v, base_sd[k] if module_group(k).layer == 1 else ckpt_sd[k]), k
    with pytest.raises(ValueError, match="mode"):
        weights.partial(base, ckpt, [], "drop")


@pytest.mark.parametrize("top", [True, False])
def test_lowrank_reconstruction_keeps_the_update_norm(pair, top):
    base, ckpt, base_sd, ckpt_sd = pair
    built = weights.lowrank(base, ckpt, 0.1, top=top)
    for k, v in built.items():
        if module_group(k).type in DEFAULT_TYPES:
            d_new = v.float() - base_sd[k].float()
            d_old = ckpt_sd[k].float() - base_sd[k].float()
            assert float(d_new.norm()) == pytest.approx(float(d_old.norm()), rel=0.02), k  # bf16 rounding
            assert torch.linalg.matrix_rank(d_new.double(), rtol=0.05) <= 2  # k = ceil(0.1 * 16) = 2
        else:
            assert torch.equal(v, ckpt_sd[k]), k


def test_saved_model_dir_loads_with_from_pretrained(pair, tmp_path):
    base, ckpt, base_sd, ckpt_sd = pair
    out = weights.save_model_dir(weights.scaled(base, ckpt, 1.5), ckpt, tmp_path / "m")
    assert not (out / "COMPLETE").exists()  # trainer bookkeeping is not copied
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    reread = CheckpointReader(out)
    sd = model.state_dict()
    for n in reread.names:
        assert torch.equal(sd[n], reread.get(n)), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_effopd_candidates_and_weight_scaling_are_one_formula(tmp_path, dtype):
    """The controller's candidate θ_a + c·(θ_t − θ_a) and the analysis's scaled(θ_0, θ_t, c), on the
    same saved tensors: bitwise equal, and for float32 bitwise the plain formula a + c·(b − a)."""
    from safetensors.torch import save_file

    from effopd.extrapolate import Extrapolator, Score

    g = torch.Generator().manual_seed(3)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
    shapes = [(24, 16), (16, 40), (16,)]
    w0 = {n: torch.randn(s, generator=g).to(dtype) for n, s in zip(names, shapes)}
    wt = {n: (w0[n].float() + 0.05 * torch.randn(s, generator=g)).to(dtype) for n, s in zip(names, shapes)}
    for d, state in (("base", w0), ("ckpt", wt)):
        (tmp_path / d).mkdir()
        save_file(state, str(tmp_path / d / "model.safetensors"))

    params = {n: t.clone() for n, t in wt.items()}
    ex = Extrapolator(params, schedule="paper", max_tries=4)
    for n in ex.anchor:
        ex.anchor[n].copy_(w0[n])
    seen = []

    def score():
        seen.append({n: p.clone() for n, p in params.items()})
        return Score(float(len(seen)))  # every candidate improves: all of them are tried

    rec = ex.search(1, score)
    assert rec.candidates == [3.0, 5.0, 7.0, 9.0]
    for c, state in zip(rec.candidates, seen[1:]):
        built = weights.scaled(tmp_path / "base", tmp_path / "ckpt", c)
        for n in names:
            assert state[n].dtype == built[n].dtype == dtype
            assert torch.equal(state[n], built[n]), (n, c)
            if dtype == torch.float32:
                assert torch.equal(state[n], w0[n] + c * (wt[n] - w0[n])), (n, c)
            else:
                exact = w0[n].double() + c * (wt[n].double() - w0[n].double())
                torch.testing.assert_close(state[n].double(), exact, rtol=2**-8, atol=1e-6)
