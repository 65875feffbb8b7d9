"""Per-token log-probabilities of given response tokens under any causal LM.

One function, :func:`token_logprobs`, serves the teacher, the frozen base, the old policy (all
under ``torch.no_grad``, through :func:`score`) and the trainer's own differentiable forward
pass. The response is appended to its left-padded prompt and positions are counted over real
tokens only, so padding never shifts them.

Memory: the vocabulary is large (151,936 for Qwen3), so full logits of a long response do not
fit: at T = 16k positions one row of float32 logits is about 10 GB. ``token_logprobs`` therefore
never builds the (B, T, V) logits. It takes the final hidden states (B, T, H) of the positions
that predict the response, then applies the LM head ``chunk_positions`` positions at a time and
reduces each (B, chunk, V) slab to the chosen token's logit minus the logsumexp (in float32).
With grad enabled each chunk runs under ``torch.utils.checkpoint`` (non-reentrant), so the
backward pass recomputes the slab of one chunk at a time instead of keeping all of them.

:func:`response_logits` is the one function here that builds the full (B, T, V) logits; GKD's
full-vocabulary divergence needs them.
"""

from __future__ import annotations

import numbers

import torch
from torch.utils.checkpoint import checkpoint

from effopd.rollout import Rollout

CHUNK_POSITIONS = 256
"""Default positions per LM-head chunk. For one row and Qwen3's V = 151,936 a float32 slab of
256 positions is 0.16 GB (the chunk's backward holds a few such slabs at its peak), against
10 GB for the full float32 logits of a 16k-token response; rows x 256 positions per LM-head
matmul still keep a GPU's matrix units busy. Measured at Qwen3-0.6B's shape on the CPU
(benchmarks/RESULTS.md): teacher scoring at 256 positions adds 854 MiB against 3,781 MiB for
full logits, and takes 0.70 of its time."""


def _sequence(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and position ids (B, P + T) of prompt + response, positions
    counted over real tokens (left padding does not shift them)."""
    ids_BL = torch.cat([rollout.prompt_ids_BP, rollout.response_ids_BT], dim=1)
    mask_BL = torch.cat([rollout.prompt_mask_BP, rollout.response_mask_BT], dim=1)
    pos_BL = (torch.cumsum(mask_BL, dim=1) - 1).clamp(min=0)
    return ids_BL, mask_BL, pos_BL


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _unwrap(model):
    """The model inside a DistributedDataParallel-style wrapper (``.module``), else ``model``."""
    while isinstance(model, torch.nn.Module) and not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def _is_wrapper(model) -> bool:
    return _unwrap(model) is not model


def _lm_head(model) -> torch.nn.Module:
    """The output embedding of ``model`` (unwrapped), checked to be the last step to the logits."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"token_logprobs: {type(inner).__name__} has no output embeddings (get_output_embeddings() gave None); "
            "pass a causal language model such as AutoModelForCausalLM.from_pretrained(...)"
        )
    cfg = getattr(inner, "config", None)
    for key, neutral in (("final_logit_softcapping", None), ("logit_scale", 1), ("logits_scaling", 1)):
        value = getattr(cfg, key, None)
        if value is not None and value != neutral:
            raise ValueError(
                f"token_logprobs: {type(inner).__name__} transforms its logits after the LM head (config.{key}={value}), "
                "which the chunked scoring does not reproduce; use a model whose logits are lm_head(final hidden state) "
                "(Llama, Qwen, Mistral families)"
            )
    return head


def _check_chunk(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer (positions per LM-head chunk); "
                         f"the default is {CHUNK_POSITIONS}")
    return int(value)


def _check_temperature(temperature) -> float:
    if not (isinstance(temperature, numbers.Real) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a number > 0 (the logits are divided by it); "
                         "use 1.0 for the untempered distribution")
    return float(temperature)


def _decoder(model) -> torch.nn.Module:
    inner = _unwrap(model)
    try:
        return inner.get_decoder()
    except (AttributeError, ValueError, NotImplementedError) as err:
        raise ValueError(
            f"token_logprobs: cannot find the decoder of {type(inner).__name__} (get_decoder() failed: {err}); "
            "pass a causal language model such as AutoModelForCausalLM.from_pretrained(...)"
        ) from err


def _last_hidden_state(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def response_hidden_states(model, rollout: Rollout) -> torch.Tensor:
    """Final hidden states (B, T, H) at the positions that predict each response token: the
    decoder's output after its last norm, which the LM head turns into logits.

    With grad enabled, or when ``model`` is a DistributedDataParallel-style wrapper, ``model``
    itself is called (``logits_to_keep=1``: the LM head sees one position) and a forward hook on
    its decoder captures the decoder's output, so that a DDP wrapper's forward runs and
    synchronises the gradients. (This is ``out.hidden_states[-1]`` of
    ``output_hidden_states=True`` in transformers 5, without keeping every layer's states or
    having accelerate convert each of them to float32.) Otherwise (frozen teacher/base under
    no_grad) the decoder alone runs."""
    T = rollout.response_ids_BT.shape[1]
    ids_BL, mask_BL, pos_BL = (x.to(_device(model)) for x in _sequence(rollout))
    h_BLH = _final_hidden(model, {"input_ids": ids_BL, "attention_mask": mask_BL, "position_ids": pos_BL, "use_cache": False})
    return h_BLH[:, h_BLH.shape[1] - T - 1 : h_BLH.shape[1] - 1]


def _final_hidden(model, inputs: dict) -> torch.Tensor:
    """The decoder's final hidden states for ``inputs`` (see :func:`response_hidden_states`)."""
    decoder = _decoder(model)
    if torch.is_grad_enabled() or _is_wrapper(model):
        captured = []
        handle = decoder.register_forward_hook(lambda module, args, output: captured.append(_last_hidden_state(output)))
        try:
            model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"token_logprobs: the decoder of {type(_unwrap(model)).__name__} ran {len(captured)} times "
                               "in one forward pass (expected once); score this model without chunking (response_logits)")
        h_BLH = captured[0]
    else:
        h_BLH = _last_hidden_state(decoder(**inputs))
    return h_BLH


def packing(rollout: Rollout, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The real tokens of ``rollout`` packed into as few rows as hold them: ``(ids_NC, pos_NC,
    index_BT)``. Each row's prompt and response tokens (mask 1) stay in order and contiguous; rows
    go into bins of ``capacity`` tokens (None: the longest row's length, so no packed row is wider
    than the padded batch), first fit by decreasing length; the positions count
    from 0 in each sequence, so a model whose attention follows packed ``position_ids`` (any that
    builds its mask with transformers' masking utils, given no attention mask) keeps sequences
    apart. Bin tails hold token 0 at position 0, each its own one-token sequence.
    ``index_BT[b, t]``: the flat ``N * C`` position whose hidden state predicts response token
    ``(b, t)`` (the token before it; 0 on padding). None when there is nothing to pack or some
    response has no prompt token before it (score that batch padded)."""
    ids_BL, mask_BL, pos_BL = _sequence(rollout)
    real_BL = mask_BL.bool()
    n_B = real_BL.sum(1)
    P, resp_BT = rollout.prompt_ids_BP.shape[1], rollout.response_mask_BT.bool()
    if not resp_BT.any() or bool((resp_BT.any(1) & ~rollout.prompt_mask_BP.bool().any(1)).any()):
        return None
    C = max(int(n_B.max()), capacity or 0)
    free: list[int] = []  # room left in each bin
    start_B = torch.zeros_like(n_B)
    for b in torch.argsort(n_B, descending=True, stable=True).tolist():
        n = int(n_B[b])
        k = next((i for i, room in enumerate(free) if room >= n), len(free))
        if k == len(free):
            free.append(C)
        start_B[b] = k * C + C - free[k]
        free[k] -= n
    dest_BL = start_B[:, None] + pos_BL
    ids_NC = torch.zeros(len(free) * C, dtype=ids_BL.dtype)
    pos_NC = torch.zeros(len(free) * C, dtype=pos_BL.dtype)
    ids_NC[dest_BL[real_BL]] = ids_BL[real_BL]
    pos_NC[dest_BL[real_BL]] = pos_BL[real_BL]
    index_BT = torch.where(resp_BT, dest_BL[:, P:] - 1, 0)
    return ids_NC.view(-1, C), pos_NC.view(-1, C), index_BT


def _packed_hidden_states(model, rollout: Rollout, packed) -> torch.Tensor:
    """:func:`response_hidden_states` from one forward pass over the :func:`packing` rows."""
    ids_NC, pos_NC, index_BT = (x.to(_device(model)) for x in packed)
    h_NCH = _final_hidden(model, {"input_ids": ids_NC, "attention_mask": None, "position_ids": pos_NC, "use_cache": False})
    return h_NCH.flatten(0, 1)[index_BT]


def _check_packing(model, rollout: Rollout, temperature: float) -> None:
    """Once per model: the logprobs of two rows packed into one agree with their padded ones, i.e.
    its attention keeps packed sequences apart. Raises when they do not."""
    inner = _unwrap(model)
    if getattr(inner, "_effopd_packing_checked", False):
        return
    rows = rollout.response_mask_BT.any(1).nonzero().flatten()[:2]
    part = rollout.select(rows)
    # both sequences in one packed row, the second attending past the first's end
    packed = packing(part, capacity=int(part.prompt_mask_BP.sum() + part.response_mask_BT.sum()))
    if len(rows) == 2 and packed is not None:
        with torch.no_grad():
            head = _lm_head(model)
            mask_BT = part.response_mask_BT.to(_device(model))
            ids_BT = part.response_ids_BT.to(_device(model))
            a = _chunked_logprobs(head, _packed_hidden_states(inner, part, packed), ids_BT, mask_BT, temperature, CHUNK_POSITIONS)
            b = _chunked_logprobs(head, response_hidden_states(inner, part), ids_BT, mask_BT, temperature, CHUNK_POSITIONS)
        gap = float((a - b).abs().max())
        if not gap <= 1e-3:
            raise ValueError(
                f"token_logprobs(pack=True): {type(inner).__name__} with attention "
                f"{getattr(inner.config, '_attn_implementation', '?')!r} does not keep packed sequences apart (packed and "
                f"padded logprobs differ by {gap:.3g}); its attention ignores packed position_ids. Set train.pack=false "
                "(score padded batches) or load the model with attn_implementation='sdpa'")
        inner._effopd_packing_checked = True


def _chunk_logprobs(head: torch.nn.Module, h_BCH: torch.Tensor, ids_BC: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(head(h) / temperature)[ids]`` (B, C), in float32, from one (B, C, V) slab."""
    logits_BCV = head(h_BCH).float()
    if temperature != 1.0:
        logits_BCV = logits_BCV / temperature
    chosen_BC = logits_BCV.gather(-1, ids_BC.unsqueeze(-1)).squeeze(-1)
    return chosen_BC - torch.logsumexp(logits_BCV, dim=-1)


def token_logprobs(model, rollout: Rollout, temperature: float = 1.0, *,
                   chunk_positions: int = CHUNK_POSITIONS, pack: bool = False) -> torch.Tensor:
    """``logp_BT[b, t] = log softmax(logits / temperature)[response_ids_BT[b, t]]`` at the
    position that predicts the token; 0 on padding. Float32, differentiable when grad is enabled.

    Never holds the (B, T, V) logits: the LM head runs on ``chunk_positions`` positions at a
    time and each slab is reduced to the chosen token's logprob (logsumexp in float32). With
    grad, each chunk is checkpointed (non-reentrant), so its backward recomputes the slab. A
    chunk whose positions are all padding is skipped (its logprobs are 0), except the first
    under grad: an all-padding micro-batch still backpropagates (zeros) into every parameter.

    ``pack``: one forward pass over the real tokens only, packed by :func:`packing` (no padding
    is computed); the same logprobs to float rounding. The first packed call on a model checks
    that its attention keeps packed sequences apart (:func:`_check_packing`). A sharded (FSDP)
    model, and a batch :func:`packing` declines, are scored padded."""
    temperature = _check_temperature(temperature)
    chunk_positions = _check_chunk("chunk_positions", chunk_positions)
    head = _lm_head(model)
    ids_BT, mask_BT = rollout.response_ids_BT, rollout.response_mask_BT
    if getattr(model, "_is_fsdp_managed_module", False):
        return _inside_root_forward(model, rollout, lambda h_BTH: _chunked_logprobs(
            head, h_BTH, ids_BT.to(h_BTH.device), mask_BT.to(h_BTH.device), temperature, chunk_positions))
    packed = packing(rollout) if pack else None
    if packed is not None:
        _check_packing(model, rollout, temperature)
        h_BTH = _packed_hidden_states(model, rollout, packed)
    else:
        h_BTH = response_hidden_states(model, rollout)
    return _chunked_logprobs(head, h_BTH, ids_BT.to(h_BTH.device), mask_BT.to(h_BTH.device), temperature, chunk_positions)


def _chunked_logprobs(head, h_BTH, ids_BT, mask_BT, temperature: float, chunk_positions: int) -> torch.Tensor:
    B, T = ids_BT.shape
    if T == 0:
        return torch.zeros((B, 0), dtype=torch.float32, device=h_BTH.device)
    grad = torch.is_grad_enabled()
    parts = []
    # split() rather than slices: its backward assembles the gradient of h once, where every
    # slice's backward would allocate a zero (B, T, H) tensor of its own.
    for i, (h_BCH, ids_BC, mask_BC) in enumerate(zip(*(x.split(chunk_positions, dim=1) for x in (h_BTH, ids_BT, mask_BT)))):
        # Under grad the first chunk always runs, so that the result depends on every parameter
        # even when all tokens are padding (backward works, and DDP sees every gradient).
        if not mask_BC.any() and not (grad and i == 0):
            parts.append(torch.zeros(mask_BC.shape, dtype=torch.float32, device=h_BTH.device))
        elif grad:
            parts.append(checkpoint(_chunk_logprobs, head, h_BCH, ids_BC, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, h_BCH, ids_BC, temperature))
    return torch.where(mask_BT.bool(), torch.cat(parts, dim=1), 0.0)


class _InPlaceOfHead(torch.nn.Module):
    """Stands in for the LM head during one forward pass: ``fn(h)`` of the hidden states the
    model would turn into logits, minus the last position (which predicts past the response)."""

    def __init__(self, fn, head: torch.nn.Module):
        super().__init__()
        self.fn, self.head = fn, head

    def forward(self, h_BLH: torch.Tensor) -> torch.Tensor:
        return self.fn(h_BLH[:, :-1])


def _inside_root_forward(model, rollout: Rollout, fn) -> torch.Tensor:
    """``fn(hidden states predicting the response)`` computed inside one call of ``model`` whose
    LM head is swapped for ``fn``. An FSDP2-sharded model gathers its embedding, norm and LM head
    only for the duration of its own forward (and again for its backward), so the chunked head
    must run there, on the gathered weight, not on the shards after the call returns."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    T = rollout.response_ids_BT.shape[1]
    ids_BL, mask_BL, pos_BL = (x.to(_device(model)) for x in _sequence(rollout))
    inner.set_output_embeddings(_InPlaceOfHead(fn, head))
    try:
        out = model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL, logits_to_keep=T + 1, use_cache=False)
    finally:
        inner.set_output_embeddings(head)
    return out.logits


def trimmed(rollout: Rollout) -> Rollout:
    """``rollout`` without the prompt columns that are padding in every row (left) and the
    response columns past its longest response (right, keeping at least one): the same tokens,
    positions and masks (position ids count real tokens), on a narrower batch."""
    real_P = rollout.prompt_mask_BP.any(0).nonzero()
    p0 = int(real_P[0]) if len(real_P) else rollout.prompt_ids_BP.shape[1]
    # at least one response column: a batch of empty (or weightless) responses still runs a
    # forward (and backward) pass through every parameter
    T = rollout.response_ids_BT.shape[1]
    t1 = min(T, max(1, int(rollout.response_mask_BT.sum(1).max()))) if rollout.response_mask_BT.numel() else 0
    return Rollout(rollout.prompt_ids_BP[:, p0:], rollout.prompt_mask_BP[:, p0:], rollout.response_ids_BT[:, :t1],
                   rollout.response_mask_BT[:, :t1], rollout.logp_BT[:, :t1], rollout.texts)


@torch.no_grad()
def score(model, rollout: Rollout, temperature: float = 1.0, chunk_size: int | None = None, *,
          chunk_positions: int = CHUNK_POSITIONS, buckets: int = 1, pack: bool = False) -> torch.Tensor:
    """:func:`token_logprobs` without grad, ``chunk_size`` rows per forward pass (None: all) to
    bound activation memory, ``chunk_positions`` positions per LM-head chunk.

    ``buckets`` > 1: the rows are sorted by length (prompt + response tokens) and split into that
    many groups of near-equal size, each scored on its own :func:`trimmed` width, so short rows
    are not padded to the longest response. The same logprobs to float rounding (a few 1e-6);
    ``buckets=1`` is the padded batch as it is.

    ``pack``: each pass of ``chunk_size`` rows runs on its real tokens only (:func:`packing`, as
    in :func:`token_logprobs`), so there is no padding to bucket and ``buckets`` is not used."""
    B = rollout.response_ids_BT.shape[0]
    if chunk_size is not None:
        _check_chunk("chunk_size", chunk_size)
    if isinstance(buckets, bool) or not isinstance(buckets, numbers.Integral) or buckets < 1:
        raise ValueError(f"buckets={buckets!r} must be a positive integer (1: score the padded batch as it is)")
    if buckets > 1 and B > 1 and not pack:
        lengths_B = rollout.prompt_mask_BP.sum(1) + rollout.response_mask_BT.sum(1)
        out_BT = torch.zeros(rollout.response_ids_BT.shape, dtype=torch.float32, device=_device(model))
        for rows in torch.argsort(lengths_B, stable=True).tensor_split(min(buckets, B)):
            part = trimmed(rollout.select(rows))
            out_BT[rows.to(out_BT.device), : part.response_ids_BT.shape[1]] = score(
                model, part, temperature, chunk_size, chunk_positions=chunk_positions)
        return out_BT
    chunk_size = chunk_size or B
    parts = [token_logprobs(model, rollout.select(slice(i, i + chunk_size)), temperature, chunk_positions=chunk_positions,
                            pack=pack)
             for i in range(0, B, chunk_size)]
    return torch.cat(parts, dim=0)


def response_logits(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """Float32 logits (B, T, V) of the positions that predict each response token, divided by
    ``temperature``; differentiable when grad is enabled. This builds the full (B, T, V) tensor
    (GKD's full-vocabulary divergence needs it); everything that only needs the chosen tokens'
    logprobs uses :func:`token_logprobs`, which does not."""
    temperature = _check_temperature(temperature)
    ids_BL, mask_BL, pos_BL = (x.to(_device(model)) for x in _sequence(rollout))
    T = rollout.response_ids_BT.shape[1]
    out = model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL, logits_to_keep=T + 1, use_cache=False)
    logits_BTV = out.logits[:, :-1].float()
    return logits_BTV / temperature if temperature != 1.0 else logits_BTV


def gather_logprobs(logits_BTV: torch.Tensor, rollout: Rollout, *, chunk_positions: int = CHUNK_POSITIONS) -> torch.Tensor:
    """``log softmax(logits)[response token]`` per position (float32), 0 on padding: the chosen
    logit minus the logsumexp, ``chunk_positions`` positions at a time, so no normalised
    (B, T, V) copy of ``logits_BTV`` is built."""
    chunk_positions = _check_chunk("chunk_positions", chunk_positions)
    ids_BT = rollout.response_ids_BT.to(logits_BTV.device)
    if logits_BTV.shape[1] == 0:
        return torch.zeros(ids_BT.shape, dtype=torch.float32, device=logits_BTV.device)
    parts = []
    for x_BCV, ids_BC in zip(logits_BTV.split(chunk_positions, dim=1), ids_BT.split(chunk_positions, dim=1)):
        x_BCV = x_BCV.float()
        parts.append(x_BCV.gather(-1, ids_BC[..., None]).squeeze(-1) - torch.logsumexp(x_BCV, -1))
    return torch.where(rollout.response_mask_BT.to(logits_BTV.device).bool(), torch.cat(parts, dim=1), 0.0)
