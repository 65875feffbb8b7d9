"""EffOPD's config-free pieces: parameter selection and the validation score (the trainer and
any other host use the same functions)."""

from __future__ import annotations

import math

import pytest
import torch

from effopd.validation import prompt_scores, select_parameters, validation_scorer


def test_selection_takes_the_attention_and_mlp_weights_by_name(tiny_student):
    _, model = tiny_student
    every = select_parameters(model, ["q", "k", "v", "o", "gate", "up", "down"])
    assert sorted({n.rsplit(".", 2)[-2] for n in every}) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                             "up_proj", "v_proj"]
    assert all(t.ndim == 2 for t in every.values())
    live = dict(model.named_parameters())
    assert all(every[n] is live[n] for n in every)  # the live tensors: writing them writes the model
    mlp = select_parameters(model, ["gate", "up", "down"])
    assert mlp and set(mlp) < set(every) and not any("self_attn" in n for n in mlp)


def test_the_score_is_the_mean_and_standard_error_over_prompts():
    seen = []

    def per_prompt(examples):
        seen.append(list(examples))
        return torch.tensor([float(e) for e in examples])

    score = validation_scorer(per_prompt, [1, 2, 3, 6])()
    assert score.value == 3.0
    assert math.isclose(score.noise, math.sqrt(((1 - 3) ** 2 + 1 + 0 + 9) / 3) / 2, rel_tol=1e-6)
    assert seen == [[1, 2, 3, 6]]
    assert validation_scorer(per_prompt, [5])().noise == 0.0  # one prompt: no spread to estimate
    with pytest.raises(ValueError, match="no validation examples"):
        validation_scorer(per_prompt, [])


def test_prompt_scores_says_what_a_teacher_score_needs(tiny_student):
    tok, model = tiny_student
    with pytest.raises(ValueError, match="needs the teacher"):
        prompt_scores(model, tok, [], seed=0, max_new_tokens=2, score="teacher_logprob")
    with pytest.raises(ValueError, match="choose reward or teacher_logprob"):
        prompt_scores(model, tok, [], seed=0, max_new_tokens=2, score="accuracy")
