"""Evaluation: accuracy metrics over sampled responses, and running a model on a prompt set.

Metrics (DESIGN.md, "Evaluation and rewards"), for m problems with n samples each, c_i correct:

- ``avg@n``: mean accuracy over all m·n samples;
- ``pass@k``: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
  Trained on Code", eq. 1), 1 − C(n−c, k)/C(n, k), averaged over problems;
- ``mean_length``: mean response length (in tokens, or whatever unit the caller passes).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

# ---------------------------------------------------------------------------------------------
# Metrics: pure functions of per-sample correctness and lengths.
# ---------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: the probability that a uniformly random k-subset of the
    n samples contains at least one of the c correct ones, 1 − C(n−c, k)/C(n, k).

    Computed as 1 − ∏_{i=n−c+1}^{n} (1 − k/i), which never forms the (huge) binomials.
    """
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(
            f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}. "
            "n is the number of samples, c how many are correct, k the subset size."
        )
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def _check_rectangular(rows: Sequence[Sequence], name: str, n: int) -> None:
    for i, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(
                f"{name}[{i}] has {len(row)} samples, expected {n} (as in correct[0]); every "
                "problem needs the same number of samples."
            )


def summarize(
    correct: Sequence[Sequence[bool]],
    lengths: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (1,),
) -> dict[str, float]:
    """Metrics over problems, given one inner list of per-sample correctness per problem.

    Returns ``avg@{n}`` (n = samples per problem), ``pass@{k}`` for every k in ``ks`` with
    k <= n (larger k are skipped, so one ``ks`` serves runs with different n), and
    ``mean_length`` when ``lengths`` (same shape as ``correct``) is given.
    """
    if len(correct) == 0:
        raise ValueError("summarize got no problems; pass one list of per-sample results per problem.")
    n = len(correct[0])
    if n == 0:
        raise ValueError("summarize got problems with no samples; each problem needs at least one.")
    _check_rectangular(correct, "correct", n)
    for k in ks:
        if k < 1:
            raise ValueError(f"summarize: every k in ks must be >= 1; got ks={tuple(ks)}.")

    num_correct = [sum(bool(x) for x in row) for row in correct]
    m = len(correct)
    metrics = {f"avg@{n}": sum(num_correct) / (m * n)}
    for k in ks:
        if k <= n:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in num_correct) / m
    if lengths is not None:
        if len(lengths) != m:
            raise ValueError(f"lengths has {len(lengths)} problems but correct has {m}; give one row per problem.")
        _check_rectangular(lengths, "lengths", n)
        metrics["mean_length"] = sum(sum(row) for row in lengths) / (m * n)
    return metrics


# --- model-driven evaluation: greedy or sampled decoding on a prompt set, scored by rewards ---

def evaluate_model(
    model,
    tokenizer,
    examples,
    *,
    max_new_tokens: int,
    samples: int = 1,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    seed: int = 1234,
    ks: tuple[int, ...] = (1,),
    records: list | None = None,
) -> dict[str, float]:
    """Accuracy of ``model`` on ``examples``: ``samples`` responses per prompt (greedy decoding
    repeats itself, so greedy uses one), scored by the verifier. Sampling draws from its own
    generator seeded with ``seed`` and leaves the caller's random state untouched. When
    ``records`` is a list, one dict per response is appended to it (for eval/*.jsonl)."""
    from effopd.rewards import reward
    from effopd.rollout import generate
    from effopd.utils import isolated_rng

    if not examples:
        raise ValueError("evaluate_model: the evaluation set is empty; pass at least one example")
    n = 1 if greedy else samples
    prompts = [e.prompt for e in examples for _ in range(n)]
    with isolated_rng(seed):
        ro = generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, greedy=greedy, batch_size=batch_size,
        )
    lengths = ro.lengths_B.tolist()
    correct = [reward(text, examples[i // n].answer) > 0 for i, text in enumerate(ro.texts)]
    if records is not None:
        for i, text in enumerate(ro.texts):
            ex = examples[i // n]
            records.append({"prompt": ex.prompt, "answer": ex.answer, "response": text, "correct": correct[i], "length": lengths[i]})
    grouped = [correct[i * n : (i + 1) * n] for i in range(len(examples))]
    metrics = summarize(grouped, [lengths[i * n : (i + 1) * n] for i in range(len(examples))], ks=tuple(k for k in ks if k <= n))
    metrics["accuracy"] = sum(correct) / len(correct)
    return metrics


def make_eval_fn(data: str, limit: int | None, max_new_tokens: int):
    """``model_dir -> metrics``: greedy accuracy of a model directory on a prompt set (``data``:
    a file, a ``datasets`` directory or ``embedded``; at most ``limit`` prompts). The prompt set is
    read once, here; this is the ``eval_fn`` the analyses take (:mod:`effopd.analysis.evals`)."""
    from effopd.config import DataConfig
    from effopd.data import load_split
    from effopd.models import load_model, load_tokenizer

    examples = load_split(data, DataConfig(eval_limit=limit), "eval")

    def eval_fn(model_dir) -> dict:
        model_dir = str(model_dir)
        return evaluate_model(load_model(model_dir, "student"), load_tokenizer(model_dir), examples, max_new_tokens=max_new_tokens)

    return eval_fn
