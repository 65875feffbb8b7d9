"""Sampling responses from the student with Hugging Face ``generate`` (KV cache on).

Returns everything later stages need as padded tensors: left-padded prompts, right-padded
responses, the response mask (real tokens up to and including the first EOS) and the sampling
engine's own per-token logprobs ``logp_BT`` (under the temperature-scaled distribution it
sampled from).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


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


def response_mask(response_ids_BT: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it."""
    is_eos = (response_ids_BT == eos_token_id).long()
    eos_before = torch.cumsum(is_eos, dim=-1) - is_eos
    return (eos_before == 0).long()


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
) -> Rollout:
    """Sample one response per prompt (repeat prompts for n > 1). Randomness comes from the
    global torch generator: callers that must not disturb it wrap the call in ``isolated_rng``."""
    if not prompts:
        raise ValueError("generate: got no prompts")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use greedy decoding instead")
    batch_size = batch_size or len(prompts)
    parts = [
        _generate_batch(model, tokenizer, prompts[i : i + batch_size], max_new_tokens, temperature, top_p, greedy)
        for i in range(0, len(prompts), batch_size)
    ]
    return parts[0] if len(parts) == 1 else concat_rollouts(parts, tokenizer.pad_token_id)


def _generate_batch(model, tokenizer, prompts, max_new_tokens, temperature, top_p, greedy) -> Rollout:
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        return_dict_in_generate=True,
        output_logits=True,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    out = model.generate(**enc, generation_config=gen_cfg)
    model.train(was_training)
    P = enc["input_ids"].shape[1]
    response_ids_BT = out.sequences[:, P:]
    logits_BTV = torch.stack(out.logits, dim=1).float()
    if not greedy:
        logits_BTV = logits_BTV / temperature
    logp_BT = torch.log_softmax(logits_BTV, -1).gather(-1, response_ids_BT.unsqueeze(-1)).squeeze(-1)
    mask_BT = response_mask(response_ids_BT, tokenizer.eos_token_id)
    response_ids_BT = torch.where(mask_BT.bool(), response_ids_BT, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(response_ids_BT, skip_special_tokens=True)
    return Rollout(enc["input_ids"], enc["attention_mask"], response_ids_BT, mask_BT, logp_BT * mask_BT, texts)


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
