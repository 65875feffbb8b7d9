"""Map parameter names to (layer, module type) for Llama, Qwen2/Qwen3, Mistral and GPT-2.

Every analysis and the EffOPD parameter selection go through :func:`module_group`, so there is
one place that knows checkpoint naming. Types:

    q, k, v, o        attention projections (Llama/Qwen/Mistral ``self_attn.{q,k,v,o}_proj``;
                      GPT-2 ``attn.c_proj`` is ``o``)
    qkv               a fused query/key/value projection (GPT-2 ``attn.c_attn``), kept apart
                      from q/k/v because one matrix mixes all three
    gate, up, down    MLP projections (``mlp.{gate,up,down}_proj``; GPT-2 ``mlp.c_fc`` is
                      ``up`` and ``mlp.c_proj`` is ``down``; GPT-2 has no gate)
    embed             token and position embeddings (``embed_tokens``, ``wte``, ``wpe``)
    lm_head           the output projection (absent from checkpoints when tied to ``embed``)
    norm              every normalisation: per-layer and final norms, Qwen3 ``q_norm``/``k_norm``
    other             non-trainable buffers some checkpoints store: ``rotary_emb.inv_freq``,
                      GPT-2's causal-mask buffers ``attn.bias`` / ``attn.masked_bias``

A bias belongs to its module's group (``q_proj.bias`` is ``q``). Any prefix is accepted
(``model.``, ``transformer.``, none, or a wrapper's ``base_model.model.``); the layer index is the
number after ``layers.`` (Llama/Qwen/Mistral) or ``h.`` (GPT-2). A name that matches none of
these raises :class:`UnknownParameterError` naming it: analyses never skip a parameter silently.

GPT-2 stores its linear weights as ``Conv1D`` with shape (in, out), the transpose of
``nn.Linear``; analyses that take singular vectors of such a weight see the two spaces swapped,
which changes nothing in norms, spectra or per-module alignment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from effopd.errors import UserError

TYPES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "embed", "lm_head", "norm", "other")
ATTENTION_TYPES = frozenset({"q", "k", "v", "qkv", "o"})
MLP_TYPES = frozenset({"gate", "up", "down"})
#: The EffOPD default selection, attention and MLP weights, in the order configs list it
#: (``extrapolate.modules``).
DEFAULT_TYPE_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "down")
#: The same selection as a set, for membership tests.
DEFAULT_TYPES = frozenset(DEFAULT_TYPE_ORDER)

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
# Leaf module name -> type, for leaves whose meaning does not depend on the parent module.
_LEAF_TYPES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "c_attn": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "c_fc": "up",
    "embed_tokens": "embed", "wte": "embed", "wpe": "embed",
    "lm_head": "lm_head",
    "norm": "norm", "q_norm": "norm", "k_norm": "norm",
    "input_layernorm": "norm", "post_attention_layernorm": "norm",
    "ln_1": "norm", "ln_2": "norm", "ln_f": "norm",
}
# GPT-2 ``c_proj`` is the attention output or the MLP down projection, depending on its parent.
_C_PROJ_TYPES = {"attn": "o", "mlp": "down"}
# Buffers some checkpoints store, as (module, tensor) name pairs.
_BUFFERS = {("rotary_emb", "inv_freq"), ("attn", "bias"), ("attn", "masked_bias")}


class UnknownParameterError(UserError, ValueError):
    pass


class Group(NamedTuple):
    layer: int | None
    type: str

    @property
    def label(self) -> str:
        """``"3.q"`` for layer 3's query projection, ``"embed"`` for a non-layer group."""
        return self.type if self.layer is None else f"{self.layer}.{self.type}"


def module_group(name: str) -> Group:
    """The (layer, type) group of parameter ``name``; see the module docstring for the types."""
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    parts = name.split(".")
    if tuple(parts[-2:]) in _BUFFERS:
        return Group(layer, "other")
    if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
        leaf, parent = parts[-2], (parts[-3] if len(parts) >= 3 else "")
        if leaf == "c_proj" and parent in _C_PROJ_TYPES:
            return Group(layer, _C_PROJ_TYPES[parent])
        if leaf in _LEAF_TYPES:
            kind = _LEAF_TYPES[leaf]
            return Group(None if kind in ("embed", "lm_head") else layer, kind)
    raise UnknownParameterError(
        f"parameter {name!r} matches no known module (Llama, Qwen2/3, Mistral or GPT-2 naming); "
        f"add its naming to effopd/module_groups.py"
    )


def groups(names: Iterable[str]) -> dict[str, Group]:
    """``{name: module_group(name)}``; raises on the first unknown name, listing all unknown ones."""
    out, unknown = {}, []
    for n in names:
        try:
            out[n] = module_group(n)
        except UnknownParameterError:
            unknown.append(n)
    if unknown:
        raise UnknownParameterError(
            f"{len(unknown)} parameter(s) match no known module: {unknown}; "
            f"add their naming to effopd/module_groups.py"
        )
    return out


def select(names: Iterable[str], types: Iterable[str] = DEFAULT_TYPES) -> list[str]:
    """The ``.weight`` tensors among ``names`` whose type is in ``types``, in the given order.

    With the default (attention + MLP types) these are exactly the 2-D projection weights:
    biases and norms are left out. Unknown type names are an error."""
    types = frozenset(types)
    bad = types - set(TYPES)
    if bad:
        raise ValueError(f"unknown module type(s) {sorted(bad)}; known types: {list(TYPES)}")
    return [n for n in names if n.endswith(".weight") and module_group(n).type in types]
