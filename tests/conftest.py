"""Shared fixtures: a task tokenizer and tiny random Qwen3 student/teacher saved to disk."""

from __future__ import annotations

import pytest
import torch

from effopd.bootstrap import ModelShape, build_tokenizer, make_model
from effopd.data.task import TaskSpec, generate_split

TINY = ModelShape(hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8)


@pytest.fixture(scope="session")
def task_tokenizer():
    corpus = [e.prompt + e.solution for e in generate_split(200, TaskSpec(1, 3, 2), seed=0)]
    return build_tokenizer(corpus)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, task_tokenizer):
    """Paths of a tiny random student and a (different) tiny random teacher."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for role, seed in (("student", 1), ("teacher", 2)):
        model = make_model(TINY, task_tokenizer, seed)
        model.save_pretrained(root / role)
        task_tokenizer.save_pretrained(root / role)
        paths[role] = str(root / role)
    return paths


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
