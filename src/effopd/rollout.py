"""Sampling responses from the student: a lean decode loop (the default) or Hugging Face
``generate``, both with a KV cache, behind one engine interface (:class:`RolloutEngine`).

Returns everything later stages need as padded tensors: left-padded prompts, right-padded
responses, the response mask (real tokens up to and including the first end-of-sequence token,
any of the model's EOS ids) and, on request (``keep_logprobs``), the sampling engine's own
per-token logprobs ``logp_BT`` (under the temperature-scaled distribution it sampled from).

Generation keeps only what the loss needs: no engine keeps per-step logits (a (B, T, V) float32
stack); with ``keep_logprobs`` each step's logits are reduced to the sampled token's logprob as
they are produced.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Rollout:
    prompt_ids_BP: torch.Tensor
    prompt_mask_BP: torch.Tensor
    response_ids_BT: torch.Tensor
    response_mask_BT: torch.Tensor
    logp_BT: torch.Tensor
    texts: list[str]

    @property
    def lengths_B(self) -> torch.Tensor:
        return self.response_mask_BT.sum(-1)

    def select(self, idx: slice | torch.Tensor) -> "Rollout":
        """Rows ``idx`` (a slice or index tensor), for micro-batching."""
        rows = range(len(self.texts))[idx] if isinstance(idx, slice) else idx.tolist()
        return Rollout(
            self.prompt_ids_BP[idx], self.prompt_mask_BP[idx], self.response_ids_BT[idx],
            self.response_mask_BT[idx], self.logp_BT[idx], [self.texts[i] for i in rows],
        )


def _id_list(ids, name: str) -> list[int]:
    """``ids`` (an int or an iterable of ints) as a list of ints, in order, without repeats."""
    items = [ids] if isinstance(ids, numbers.Integral) or isinstance(ids, torch.Tensor) and ids.dim() == 0 else list(ids)
    out: list[int] = []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (numbers.Integral, torch.Tensor)):
            raise ValueError(f"{name}={ids!r} must be a token id or a list of token ids; got the item {x!r}")
        if int(x) not in out:
            out.append(int(x))
    if not out:
        raise ValueError(f"{name}={ids!r} holds no token id; pass at least one end-of-sequence id")
    return out


def eos_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence ids a response may end with: the model's
    ``generation_config.eos_token_id`` (an int or a list; Qwen3 lists two) followed by the
    tokenizer's ``eos_token_id``, without repeats."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for source in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if source is not None:
            ids += [i for i in _id_list(source, "eos_token_id") if i not in ids]
    if not ids:
        raise ValueError(
            f"neither {type(model).__name__}.generation_config.eos_token_id nor the tokenizer's eos_token_id is set, "
            "so a response could never end; set tokenizer.eos_token or pass eos_token_ids=[...] to generate"
        )
    return ids


def response_mask(response_ids_BT: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """1 for every token up to and including the first end-of-sequence token (any id in
    ``eos_token_id``, an int or a list), 0 after it."""
    eos = torch.tensor(_id_list(eos_token_id, "eos_token_id"), dtype=response_ids_BT.dtype, device=response_ids_BT.device)
    is_eos = torch.isin(response_ids_BT, eos).long()
    eos_before = torch.cumsum(is_eos, dim=-1) - is_eos
    return (eos_before == 0).long()


class _SampledLogprobs(LogitsProcessor):
    """Records ``log softmax(logits / temperature)[sampled token]`` step by step during
    ``generate``, holding one step's (B, V) row at a time instead of every step's logits.

    ``generate`` runs custom processors before its temperature and top-p warpers, so each call
    sees the raw next-token logits; the token chosen from them is only known at the next call
    (the last column of ``input_ids``), or, for the last step, from the finished sequences
    (:meth:`logprobs`)."""

    def __init__(self, temperature: float = 1.0):
        self.temperature = float(temperature)
        self.steps: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None  # (B, V) log-probabilities of the step not yet resolved

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:
            self.steps.append(self._pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logits_BV = scores.float()
        if self.temperature != 1.0:
            logits_BV = logits_BV / self.temperature
        self._pending = torch.log_softmax(logits_BV, dim=-1)
        return scores

    def logprobs(self, response_ids_BT: torch.Tensor) -> torch.Tensor:
        """(B, T) logprobs of the generated tokens ``response_ids_BT`` (the sequences after the prompt)."""
        T = response_ids_BT.shape[1]
        steps = list(self.steps[:T])
        if len(steps) < T and self._pending is not None:
            steps.append(self._pending.gather(-1, response_ids_BT[:, len(steps), None].to(self._pending.device)).squeeze(-1))
        self._pending = None
        if len(steps) != T:
            raise RuntimeError(f"_SampledLogprobs saw {len(steps)} generation steps for {T} generated tokens; "
                               "use a fresh recorder for every generate call")
        if not steps:
            return torch.zeros(response_ids_BT.shape, dtype=torch.float32, device=response_ids_BT.device)
        return torch.stack(steps, dim=1)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int | None = None,
    eos_token_ids: int | list[int] | None = None,
    keep_logprobs: bool = False,
    backend: str | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one response per prompt (repeat prompts for n > 1), ``batch_size`` prompts per
    ``generate`` call (None: all at once). Randomness comes from the global torch generator:
    callers that must not disturb it wrap the call in ``isolated_rng``.

    A response ends at the first of ``eos_token_ids`` (None: :func:`eos_ids`, the model's
    generation-config EOS ids and the tokenizer's); its mask covers the real tokens up to and
    including that token, and later positions hold the pad id.

    ``logp_BT`` is the sampler's logprob of each token under softmax(logits / temperature)
    (softmax(logits) when greedy), before top-p truncation, when ``keep_logprobs`` is True
    (needed for ``loss.rollout_is``); otherwise it is all zeros and no logits are kept.

    Sampling uses exactly ``temperature`` and ``top_p``: the model's own generation-config
    sampling defaults (Qwen3 ships top_k=20, temperature=0.6, top_p=0.95) are overridden, so the
    sampled distribution is the one the trainer scores.

    ``backend`` names the engine in :data:`ENGINES` (None: :data:`DEFAULT_BACKEND`).
    ``generator``: sample from this generator instead of the global one (None: the one
    :func:`sampling_generator` set on this thread, else the global generator); the ``hf``
    engine cannot take one."""
    if not prompts:
        raise ValueError("generate: got no prompts; pass at least one prompt string")
    if not greedy and not (isinstance(temperature, numbers.Real) and temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}; use greedy decoding instead")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1):
        raise ValueError(f"generate: batch_size={batch_size!r} must be a positive integer (prompts per generate call) or None for all")
    backend = DEFAULT_BACKEND if backend is None else backend
    eos = eos_ids(model, tokenizer) if eos_token_ids is None else _id_list(eos_token_ids, "eos_token_ids")
    batch_size = batch_size or len(prompts)
    generator = generator if generator is not None else getattr(_THREAD, "generator", None)
    parts = [
        _generate_batch(model, tokenizer, prompts[i : i + batch_size], max_new_tokens, temperature, top_p, greedy, eos, keep_logprobs,
                        backend, generator)
        for i in range(0, len(prompts), batch_size)
    ]
    return parts[0] if len(parts) == 1 else concat_rollouts(parts, tokenizer.pad_token_id)


_THREAD = threading.local()


@contextlib.contextmanager
def sampling_generator(generator: torch.Generator):
    """Within this block, :func:`generate` on this thread samples from ``generator`` (a thread
    that samples while another works then draws from a stream of its own)."""
    previous = getattr(_THREAD, "generator", None)
    _THREAD.generator = generator
    try:
        yield generator
    finally:
        _THREAD.generator = previous


def _generate_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_p, greedy, eos, keep_logprobs, backend,
                    generator=None) -> Rollout:
    if backend not in ENGINES:
        raise ValueError(f"rollout.backend={backend!r} is not one of {sorted(ENGINES)}; pick one (lean is the faster on CPU)")
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    was_training = model.training
    model.eval()
    try:
        response_ids_BT, logp_BT = ENGINES[backend](
            model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, greedy=greedy, eos=eos, pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id,
            keep_logprobs=keep_logprobs, generator=generator)
    finally:
        model.train(was_training)
    mask_BT = response_mask(response_ids_BT, eos)
    if logp_BT is not None:
        logp_BT = torch.where(mask_BT.bool(), logp_BT, 0.0)
    else:
        logp_BT = torch.zeros(response_ids_BT.shape, dtype=torch.float32, device=device)
    response_ids_BT = torch.where(mask_BT.bool(), response_ids_BT, tokenizer.pad_token_id)
    # The text is what precedes the end-of-sequence token, whichever EOS id it is (a special token or not).
    before_eos_BT = mask_BT.bool() & ~torch.isin(response_ids_BT, torch.tensor(eos, device=response_ids_BT.device))
    texts = tokenizer.batch_decode(torch.where(before_eos_BT, response_ids_BT, tokenizer.pad_token_id), skip_special_tokens=True)
    return Rollout(enc["input_ids"], enc["attention_mask"], response_ids_BT, mask_BT, logp_BT, texts)


# ---- engines -------------------------------------------------------------------------------


class RolloutEngine(Protocol):
    """Decodes one batch of left-padded prompts. Returns the (B, T) response ids (T = the steps
    decoded; anything after a row's first EOS is ignored) and, when ``keep_logprobs``, the (B, T)
    logprobs of the sampled tokens under softmax(logits / temperature) before top-p truncation
    (softmax(logits) when greedy), else None. Randomness comes from ``generator`` (None: the
    global torch generator)."""

    def __call__(self, model: PreTrainedModel, input_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor, *,
                 max_new_tokens: int, temperature: float, top_p: float, greedy: bool, eos: list[int], pad_id: int,
                 bos_id: int | None, keep_logprobs: bool,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def hf_engine(model, input_ids_BP, attention_mask_BP, *, max_new_tokens, temperature, top_p, greedy, eos, pad_id, bos_id,
              keep_logprobs, generator=None):
    """Hugging Face ``generate`` with its KV cache; finished rows keep decoding pad tokens until
    every row has ended. It samples from the global generator only (``generate`` takes none)."""
    if generator is not None and not greedy:
        raise ValueError("rollout.backend=hf samples from the global torch generator (Hugging Face generate takes no "
                         "generator), so it cannot sample on a thread of its own; use rollout.backend=lean")
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        # Explicit neutral values: generate fills every unset (None) field from the model's own
        # generation_config, e.g. Qwen3's top_k=20, which would truncate the distribution sampled.
        top_k=0,
        repetition_penalty=1.0,
        pad_token_id=pad_id,
        eos_token_id=eos,
        bos_token_id=bos_id,
        # Only the token ids come back: no per-step logits or scores, and no KV cache held
        # beyond the call (a returned output object would keep it alive).
        return_dict_in_generate=False,
        output_logits=False,
        output_scores=False,
        use_cache=True,
    )
    recorder = _SampledLogprobs(1.0 if greedy else temperature) if keep_logprobs else None
    extra = {"logits_processor": LogitsProcessorList([recorder])} if recorder is not None else {}
    sequences = model.generate(input_ids=input_ids_BP, attention_mask=attention_mask_BP, generation_config=gen_cfg, **extra)
    response_ids_BT = sequences[:, input_ids_BP.shape[1]:]
    return response_ids_BT, (recorder.logprobs(response_ids_BT) if recorder is not None else None)


def top_p_filter(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits_BV`` with -inf outside the nucleus: the most likely tokens whose probabilities,
    taken in decreasing order, sum to ``top_p`` (the token that crosses it included, so at least one)."""
    if top_p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    outside_BV = probs_BV.cumsum(dim=-1) - probs_BV > top_p  # the mass before the token already exceeds top_p
    return logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(outside_BV, float("-inf")))


def _next_token(logits_BV, temperature, top_p, greedy, keep_logprobs, generator=None):
    """The next token of each row and, when asked, its logprob under softmax(logits / temperature)."""
    logits_BV = logits_BV.float()
    if greedy:
        tok_B = logits_BV.argmax(dim=-1)
    else:
        if temperature != 1.0:
            logits_BV = logits_BV / temperature
        probs_BV = top_p_filter(logits_BV, top_p).softmax(dim=-1)
        tok_B = torch.multinomial(probs_BV, num_samples=1, generator=generator).squeeze(-1)
    if not keep_logprobs:
        return tok_B, None
    return tok_B, torch.log_softmax(logits_BV, dim=-1).gather(-1, tok_B[:, None]).squeeze(-1)


def _synced(model) -> bool:
    """Whether every process must run the same forwards (a model sharded across processes)."""
    from effopd.sharding import is_sharded

    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1 and is_sharded(model)


def _any_process(flag: torch.Tensor) -> bool:
    flag = flag.to(torch.int32).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def lean_engine(model, input_ids_BP, attention_mask_BP, *, max_new_tokens, temperature, top_p, greedy, eos, pad_id, bos_id,
                keep_logprobs, generator=None, min_rows=1):
    """A decode loop that does only what the trainer needs: one forward of the last position per
    step (the prefill computes the logits of the last prompt token only), the sampled token and
    its logprob, and rows leave the batch, cache included, as soon as they end, so later steps
    decode only the rows still running, but never fewer than ``min_rows`` (ended rows stay as
    placeholders; their tokens are ignored). A model sharded across processes gathers its
    weights in every forward, so there every process goes on (with one placeholder row once its
    own rows have ended) until all have ended."""
    B, device = input_ids_BP.shape[0], input_ids_BP.device
    synced = _synced(model)
    min_rows = max(min_rows, 1 if synced else 0)
    ids_BT = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logp_BT = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if keep_logprobs else None
    eos_E = torch.tensor(eos, device=device)
    rows_R = torch.arange(B, device=device)  # the batch row of each row in the decode batch
    live_R = torch.ones(B, dtype=torch.bool, device=device)  # False: ended (kept only as a placeholder)
    cache = DynamicCache(config=model.config)
    mask_RS = attention_mask_BP
    pos_RS = (mask_RS.cumsum(-1) - 1).clamp(min=0)
    logits_RV = model(input_ids=input_ids_BP, attention_mask=mask_RS, position_ids=pos_RS, cache=cache, use_cache=True,
                      logits_to_keep=1).logits[:, -1]
    pos_R1 = pos_RS[:, -1:]
    steps = 0
    for t in range(max_new_tokens):
        tok_R, lp_R = _next_token(logits_RV, temperature, top_p, greedy, keep_logprobs, generator)
        ids_BT[rows_R[live_R], t] = tok_R[live_R]
        if lp_R is not None:
            logp_BT[rows_R[live_R], t] = lp_R[live_R]
        steps = t + 1
        live_R = live_R & ~torch.isin(tok_R, eos_E)
        going = _any_process(live_R.any()) if synced else bool(live_R.any())
        if steps == max_new_tokens or not going:
            break
        if not live_R.all():  # drop the rows that ended, from the cache too
            keep = live_R.nonzero().squeeze(-1)
            if keep.numel() < min_rows:  # placeholders (with a sharded model: this process's rows have all ended,
                # another's go on) keep the batch at min_rows rows
                placeholders = (~live_R).nonzero().squeeze(-1)[: min_rows - keep.numel()]
                keep = torch.cat([keep, placeholders]).sort().values
            if keep.numel() < len(rows_R):
                cache.batch_select_indices(keep)
                rows_R, live_R, tok_R, mask_RS, pos_R1 = rows_R[keep], live_R[keep], tok_R[keep], mask_RS[keep], pos_R1[keep]
        mask_RS = torch.cat([mask_RS, mask_RS.new_ones(len(rows_R), 1)], dim=1)
        pos_R1 = pos_R1 + 1
        logits_RV = model(input_ids=tok_R[:, None], attention_mask=mask_RS, position_ids=pos_R1, cache=cache,
                          use_cache=True).logits[:, -1]
    return ids_BT[:, :steps], (logp_BT[:, :steps] if logp_BT is not None else None)


class _CompiledForward:
    """Stands in for a model in :func:`lean_engine`: its ``config`` and parameters, and a call
    that runs ``torch.compile(model, dynamic=True)``. A model keeps its own in a plain attribute
    (not a submodule: its state dict and parameters stay as they are); a deep copy of the model
    starts without one and compiles its own."""

    def __init__(self, model):
        self.config, self._model = model.config, model
        self._compiled = torch.compile(model, dynamic=True)

    def parameters(self):
        return self._model.parameters()

    def __call__(self, **inputs):
        return self._compiled(**inputs)

    def __deepcopy__(self, memo):
        return None


_COMPILED_ATTR = "_effopd_compiled_forward"
_COMPILE_LOCK = threading.Lock()


def compiled_lean_engine(model, input_ids_BP, attention_mask_BP, **kw):
    """:func:`lean_engine` with the model's forward compiled by ``torch.compile`` (inductor,
    dynamic shapes, so the shrinking batch and the growing cache compile once; the decode batch
    keeps two rows at least): the first call on a model compiles (tens of seconds), later ones
    run with far less per-op overhead. The
    same tokens as ``lean`` when greedy; sampled logprobs equal a teacher-forced forward to
    float rounding. Not for a model sharded across processes."""
    from effopd.sharding import is_sharded

    if is_sharded(model):
        raise ValueError("rollout.backend=lean-compiled does not run a model sharded across processes (its forwards "
                         "gather weights collectively); use rollout.backend=lean")
    with _COMPILE_LOCK:
        forward = model.__dict__.get(_COMPILED_ATTR)
        if forward is None:
            forward = _CompiledForward(model)
            object.__setattr__(model, _COMPILED_ATTR, forward)  # past nn.Module's registration of modules
    # two rows at least: a batch of one would be a shape of its own to compile, in the middle of a run
    return lean_engine(forward, input_ids_BP, attention_mask_BP, min_rows=2, **kw)


#: ``rollout.backend`` -> engine. A new backend (a vLLM client, say) is one more entry here.
ENGINES: dict[str, RolloutEngine] = {"hf": hf_engine, "lean": lean_engine, "lean-compiled": compiled_lean_engine}
#: The engine used when none is named: ``lean`` samples the same distribution as ``generate``
#: (greedy decoding gives the same tokens) in fewer operations per step.
DEFAULT_BACKEND = "lean"


def _pad_to(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    pad = width - x.shape[1]
    if pad == 0:
        return x
    fill = torch.full((x.shape[0], pad), value, dtype=x.dtype, device=x.device)
    return torch.cat([fill, x] if left else [x, fill], dim=1)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts row-wise, re-padding prompts (left) and responses (right) to one width."""
    P = max(r.prompt_ids_BP.shape[1] for r in parts)
    T = max(r.response_ids_BT.shape[1] for r in parts)
    return Rollout(
        torch.cat([_pad_to(r.prompt_ids_BP, P, pad_id, True) for r in parts]),
        torch.cat([_pad_to(r.prompt_mask_BP, P, 0, True) for r in parts]),
        torch.cat([_pad_to(r.response_ids_BT, T, pad_id, False) for r in parts]),
        torch.cat([_pad_to(r.response_mask_BT, T, 0, False) for r in parts]),
        torch.cat([_pad_to(r.logp_BT, T, 0.0, False) for r in parts]),
        [t for r in parts for t in r.texts],
    )


def from_completions(tokenizer: PreTrainedTokenizerBase, prompts: list[str], completions: list[str]) -> Rollout:
    """A teacher-forced batch: each prompt (left-padded, encoded as ``generate`` encodes it)
    followed by a given completion and EOS (right-padded). The response mask covers exactly the
    completion and its EOS, so a loss over it ignores prompt tokens. ``logp_BT`` is 0 (no sampler)."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"from_completions: got {len(prompts)} prompts and {len(completions)} completions; pass one completion per prompt")
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    T = max(len(r) for r in rows)
    ids_BT = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask_BT = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids_BT[b, : len(r)] = torch.tensor(r)
        mask_BT[b, : len(r)] = 1
    return Rollout(enc["input_ids"], enc["attention_mask"], ids_BT, mask_BT, torch.zeros(ids_BT.shape), list(completions))
