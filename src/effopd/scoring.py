"""Per-token log-probabilities of given response tokens under any causal LM.

One function serves the teacher, the frozen base, the old policy (all under ``torch.no_grad``)
and the trainer's own differentiable forward pass: the response is appended to its left-padded
prompt, positions are counted over real tokens only (so padding never shifts them), and only
the last ``T + 1`` positions go through the LM head.
"""

from __future__ import annotations

import torch

from effopd.rollout import Rollout


def response_logits(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """Float logits ``(B, T, V)`` of the positions that predict each response token (divided by
    ``temperature``). Differentiable when grad is enabled."""
    ids_BL = torch.cat([rollout.prompt_ids_BP, rollout.response_ids_BT], dim=1)
    mask_BL = torch.cat([rollout.prompt_mask_BP, rollout.response_mask_BT], dim=1)
    pos_BL = (torch.cumsum(mask_BL, dim=1) - 1).clamp(min=0)
    T = rollout.response_ids_BT.shape[1]
    device = next(model.parameters()).device
    out = model(
        input_ids=ids_BL.to(device),
        attention_mask=mask_BL.to(device),
        position_ids=pos_BL.to(device),
        logits_to_keep=T + 1,
        use_cache=False,
    )
    logits_BTV = out.logits[:, :-1].float()
    return logits_BTV / temperature if temperature != 1.0 else logits_BTV


def gather_logprobs(logits_BTV: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """``log softmax(logits)[response token]`` per position; 0 on padding."""
    response_BT = rollout.response_ids_BT.to(logits_BTV.device)
    logp_BT = torch.log_softmax(logits_BTV, dim=-1).gather(-1, response_BT.unsqueeze(-1)).squeeze(-1)
    return logp_BT * rollout.response_mask_BT.to(logits_BTV.device)


def token_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """``logp_BT[b, t] = log softmax(logits / temperature)[response_ids_BT[b, t]]`` at the
    position that predicts it; 0 on padding. Differentiable when grad is enabled."""
    return gather_logprobs(response_logits(model, rollout, temperature), rollout)


@torch.no_grad()
def score(model, rollout: Rollout, temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """``token_logprobs`` without grad, ``chunk_size`` rows at a time to bound activation memory."""
    B = rollout.response_ids_BT.shape[0]
    chunk_size = chunk_size or B
    parts = [token_logprobs(model, rollout.select(slice(i, i + chunk_size)), temperature) for i in range(0, B, chunk_size)]
    return torch.cat(parts, dim=0)
