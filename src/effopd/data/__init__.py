"""Prompt sets: the embedded task and user files, behind one function."""

from __future__ import annotations

from dataclasses import replace

from effopd.data.example import Example
from effopd.data.task import TaskSpec, make_splits

EMBEDDED = "embedded"


def embedded_splits(seed: int = 0, min_ops: int = 2, max_ops: int = 3, digits: int = 2) -> dict[str, list[Example]]:
    return make_splits(TaskSpec(min_ops, max_ops, digits), seed)


def load_split(source: str, data_cfg, which: str) -> list[Example]:
    """``which`` is "train" or "eval". ``embedded`` gives the task's train or test split."""
    if source == EMBEDDED:
        splits = embedded_splits(data_cfg.task_seed, data_cfg.task_min_ops, data_cfg.task_max_ops, data_cfg.task_digits)
        examples = splits["train" if which == "train" else "test"]
    else:
        from effopd.data.loaders import load_examples

        examples = load_examples(
            source, prompt_field=data_cfg.prompt_field, answer_field=data_cfg.answer_field,
            split=data_cfg.train_split if which == "train" else data_cfg.eval_split,
        )
    if which == "eval" and data_cfg.eval_limit:
        examples = examples[: data_cfg.eval_limit]
    template = data_cfg.prompt_template
    if template != "{prompt}":
        examples = [replace(e, prompt=template.format(prompt=e.prompt)) for e in examples]
    return examples
