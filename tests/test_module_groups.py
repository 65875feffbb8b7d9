"""module_group on the real parameter names of tiny Qwen3, Qwen2, Llama, Mistral and GPT-2 models."""

import pytest
import transformers as tf

from effopd.module_groups import (ATTENTION_TYPES, DEFAULT_TYPE_ORDER, DEFAULT_TYPES, MLP_TYPES, TYPES, Group,
                                  UnknownParameterError, groups, module_group, select)

DECODER = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1)
CONFIGS = {
    "qwen3": lambda: tf.Qwen3Config(**DECODER, head_dim=8),
    "qwen2": lambda: tf.Qwen2Config(**DECODER),
    "llama": lambda: tf.LlamaConfig(**DECODER),
    "mistral": lambda: tf.MistralConfig(**DECODER),
    "gpt2": lambda: tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32),
}


@pytest.mark.parametrize("arch", CONFIGS)
def test_every_parameter_of_a_real_model_lands_in_a_group(arch):
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    names = list(model.state_dict())  # parameters, plus the tied lm_head
    grp = groups(names)
    assert set(grp) == set(names)
    assert all(g.type in TYPES and g.type != "other" for g in grp.values())
    # every layer has attention and MLP weights; these are exactly the 2-D projection matrices
    per_layer = {"gpt2": {"qkv", "o", "up", "down"}}.get(arch, {"q", "k", "v", "o", "gate", "up", "down"})
    chosen = select(names)
    assert len(chosen) == 2 * len(per_layer)
    params = dict(model.named_parameters())
    assert all(params[n].ndim == 2 for n in chosen)
    for layer in (0, 1):
        assert {grp[n].type for n in chosen if grp[n].layer == layer} == per_layer
    # embeddings and the head are not layer-scoped; norms exist
    assert all(g.layer is None for g in grp.values() if g.type in ("embed", "lm_head"))
    assert any(g.type == "norm" for g in grp.values())


@pytest.mark.parametrize("name, group", [
    ("model.layers.3.self_attn.q_proj.weight", Group(3, "q")),
    ("model.layers.3.self_attn.q_proj.bias", Group(3, "q")),  # Qwen2 attention biases
    ("model.layers.0.self_attn.k_norm.weight", Group(0, "norm")),  # Qwen3
    ("model.layers.12.mlp.down_proj.weight", Group(12, "down")),
    ("model.layers.1.post_attention_layernorm.weight", Group(1, "norm")),
    ("model.norm.weight", Group(None, "norm")),
    ("model.embed_tokens.weight", Group(None, "embed")),
    ("lm_head.weight", Group(None, "lm_head")),
    ("transformer.h.2.attn.c_attn.weight", Group(2, "qkv")),
    ("h.2.attn.c_attn.bias", Group(2, "qkv")),  # hub GPT-2 files have no "transformer." prefix
    ("h.2.attn.c_proj.weight", Group(2, "o")),
    ("h.2.mlp.c_proj.bias", Group(2, "down")),
    ("h.2.mlp.c_fc.weight", Group(2, "up")),
    ("h.2.ln_1.bias", Group(2, "norm")),
    ("wpe.weight", Group(None, "embed")),
    ("transformer.ln_f.weight", Group(None, "norm")),
    ("h.2.attn.bias", Group(2, "other")),  # GPT-2 causal-mask buffer
    ("model.layers.0.self_attn.rotary_emb.inv_freq", Group(0, "other")),
])
def test_known_names(name, group):
    assert module_group(name) == group


def test_unknown_names_are_errors_that_list_them():
    with pytest.raises(UnknownParameterError, match="model.layers.0.mlp.experts.0.w1.weight"):
        module_group("model.layers.0.mlp.experts.0.w1.weight")
    with pytest.raises(UnknownParameterError, match=r"2 parameter.*'score.weight'.*'model.layers.0.foo.bias'"):
        groups(["model.norm.weight", "score.weight", "model.layers.0.foo.bias"])


def test_select():
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
             "model.layers.0.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"]
    assert select(names) == [names[0], names[2]]
    assert select(names, ["q", "embed"]) == [names[0], names[4]]
    assert DEFAULT_TYPES == {"q", "k", "v", "qkv", "o", "gate", "up", "down"}
    with pytest.raises(ValueError, match="mlp"):
        select(names, ["mlp"])
    assert Group(3, "q").label == "3.q" and Group(None, "embed").label == "embed"


def test_default_selection_order_matches_the_set():
    assert DEFAULT_TYPE_ORDER == ("q", "k", "v", "o", "qkv", "gate", "up", "down")
    assert len(set(DEFAULT_TYPE_ORDER)) == len(DEFAULT_TYPE_ORDER)
    assert frozenset(DEFAULT_TYPE_ORDER) == DEFAULT_TYPES == ATTENTION_TYPES | MLP_TYPES
    assert set(DEFAULT_TYPE_ORDER) <= set(TYPES)
    names = [f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm")]
    assert select(names, DEFAULT_TYPE_ORDER) == select(names) == names[:2]
