"""EffOPD's pieces that need no effopd config: which weights it moves, and the validation score.

Any training loop that holds a causal LM can run the controller (:class:`extrapolate.Extrapolator`)
with these two: :func:`select_parameters` picks the attention/MLP weights by their names
(``module_groups``), as this process's shards of a sharded model; :func:`validation_scorer`
turns a per-prompt scoring function into the ``score()`` the controller calls, split across
processes and gathered so that every process takes the same decision. :func:`prompt_scores` is
the scoring function effopd's trainer uses: a verifiable reward, or the teacher's logprob.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from effopd.extrapolate import Extrapolator, Score
from effopd.module_groups import UnknownParameterError, module_group
from effopd.replicas import gather_list, padded_shard, sum_across
from effopd.scoring import CHUNK_POSITIONS
from effopd.sharding import is_sharded, local

#: What a validation score can be besides a callable: the verifiable reward or the teacher's logprob.
SCORES = ("reward", "teacher_logprob")


def _group_type(name: str) -> str | None:
    """The module type of parameter ``name``, or None for a naming ``module_group`` does not know
    (fused ``qkv_proj``/``gate_up_proj`` variants, MoE routers): such tensors are left out."""
    try:
        return module_group(name).type
    except UnknownParameterError:
        return None


def select_parameters(model: torch.nn.Module, modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """The 2-D weights of ``model`` whose module type (``module_group(name).type``: q, k, v, o,
    gate, up, down, ...) is in ``modules``, by name: the live tensors, or this process's shards
    of a sharded (FSDP2) model (views: writing them writes the parameters)."""
    wanted = set(modules)
    return {n: local(p) for n, p in model.named_parameters() if p.ndim == 2 and _group_type(n) in wanted}


def make_extrapolator(model: torch.nn.Module, modules: Iterable[str], accelerator=None, **controller) -> Extrapolator:
    """The EffOPD controller over :func:`select_parameters` (``model``, ``modules``);
    ``controller`` are :class:`~effopd.extrapolate.Extrapolator`'s keyword arguments. Of a
    sharded model it takes this process's shards and sums the logged update norm over the
    processes of ``accelerator`` (anything with ``num_processes``, e.g. accelerate's
    ``PartialState``); replicated copies are not summed."""
    sharded = is_sharded(model)
    if sharded and controller.get("schedule") == "rank1":
        raise ValueError("extrapolate.schedule=rank1 needs whole tensors for their top singular direction, and this "
                         "model is sharded (FSDP2); choose paper, adaptive, lookahead or expo, or run unsharded")
    total = (lambda v: sum_across(accelerator, [v])[0]) if accelerator is not None and sharded else None
    return Extrapolator(select_parameters(model, modules), total=total, **controller)


def prompt_scores(model, tokenizer, examples: list, *, seed: int, max_new_tokens: int,
                  score: str | Callable[[list[str], list], Sequence[float]] = "reward",
                  teacher=None, samples: int = 1, greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  batch_size: int | None = None, score_chunk_size: int | None = None, score_buckets: int = 1,
                  logit_chunk: int = CHUNK_POSITIONS, backend: str | None = None) -> torch.Tensor:
    """One score per example (float32, ``(len(examples),)``): the mean over its ``samples``
    responses (one when ``greedy``), drawn from their own generator seeded with ``seed``, of the
    verifiable reward against ``example.answer`` (``score="reward"``), of ``teacher``'s mean
    per-token logprob of the response at ``temperature`` (``score="teacher_logprob"``), or of
    ``score(texts, examples)`` for a callable: one number per response text, ``examples[i]``
    being the example response ``i`` answers (each repeated ``samples`` times)."""
    from effopd.rewards import reward
    from effopd.rollout import generate
    from effopd.teachers import Routed, teacher_logprobs
    from effopd.utils import isolated_rng

    if not callable(score) and score not in SCORES:
        raise ValueError(f"score={score!r}: choose reward or teacher_logprob, or pass a function (texts, examples) -> scores")
    if score == "teacher_logprob" and teacher is None:
        raise ValueError("score=teacher_logprob needs the teacher model (teacher=...)")
    k = 1 if greedy else samples
    prompts = [e.prompt for e in examples for _ in range(k)]
    with isolated_rng(seed):
        ro = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      greedy=greedy, batch_size=batch_size, backend=backend)
    if callable(score):
        per_sample = torch.tensor([float(v) for v in _checked(score(ro.texts, [examples[i // k] for i in range(len(prompts))]),
                                                               len(prompts))])
    elif score == "reward":
        per_sample = torch.tensor([reward(t, examples[i // k].answer) for i, t in enumerate(ro.texts)])
    else:
        route = teacher.index([examples[i // k].teacher for i in range(len(prompts))]) if isinstance(teacher, Routed) else None
        lp_BT = teacher_logprobs(teacher, ro, temperature, chunk_size=score_chunk_size, chunk_positions=logit_chunk,
                                 route=route, buckets=score_buckets)
        per_sample = (lp_BT.sum(-1) / ro.response_mask_BT.sum(-1).clamp(min=1)).cpu()
    return per_sample.float().view(len(examples), k).mean(-1)


def _checked(values, n: int) -> list:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"the validation score function returned {len(values)} values for {n} responses; return one number per response")
    return values


def validation_scorer(per_prompt: Callable[[list], torch.Tensor], examples: list, accelerator=None) -> Callable[[], Score]:
    """``score()`` for one search: ``per_prompt(examples)`` (the same prompts and seed for every
    candidate: common random numbers), as the mean and standard error over prompts.

    With an ``accelerator`` of several processes, each scores its contiguous share (padded to
    one length, as sharded models need) and the per-prompt scores are gathered in order, so every
    process computes the same ``Score`` (bitwise what one process computes) and takes the same
    decision."""
    if not examples:
        raise ValueError("validation_scorer: no validation examples; pass at least one")
    mine, real = padded_shard(accelerator, examples) if accelerator is not None else (examples, len(examples))

    def score() -> Score:
        scores = per_prompt(mine).tolist()[:real]
        if accelerator is not None:
            scores = gather_list(accelerator, scores)
        t = torch.tensor(scores, dtype=torch.float32)
        noise = float(t.std() / len(examples) ** 0.5) if len(examples) > 1 else 0.0
        return Score(float(t.mean()), noise, scores)

    return score
