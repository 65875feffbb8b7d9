"""Prompt sets: the embedded task and user files, behind one function."""

from __future__ import annotations

from dataclasses import replace

from effopd.data.example import Example
from effopd.data.task import TaskSpec, make_splits

EMBEDDED = "embedded"  # names the built-in default: the task's splits here, the shipped models in effopd.models
REQUIRED = "required"  # a preset's placeholder for a prompt set the user must supply


def embedded_splits(seed: int = 0, min_ops: int = 2, max_ops: int = 3, digits: int = 2) -> dict[str, list[Example]]:
    return make_splits(TaskSpec(min_ops, max_ops, digits), seed)


def check_answers(examples: list[Example], source: str) -> None:
    """Every reference answer must be verifiable; name the first rows that are not."""
    from effopd.data.loaders import DatasetError
    from effopd.rewards import is_parseable

    bad = [e for e in examples if not is_parseable(e.answer)]
    if bad:
        shown = "; ".join(f"{e.source}: {e.answer[:40]!r}" for e in bad[:3])
        raise DatasetError(
            f"{len(bad)} of {len(examples)} answers in {source} cannot be parsed as a number or a math "
            f"expression, e.g. {shown}. Fix those rows or point data.answer_field at the final answer"
        )


def apply_template(template: str, prompt: str) -> str:
    """``template`` with each ``{prompt}`` replaced by ``prompt``; every other character, braces
    included (``\\boxed{}``, JSON), is literal, so templates need no escaping."""
    return template.replace("{prompt}", prompt)


def load_split(source: str, data_cfg, which: str, teacher_field: str | None = None) -> list[Example]:
    """``which`` is "train", "val" or "eval". ``embedded`` gives the task's train, val or test split.
    ``teacher_field``: read each row's teacher name from that column (several teachers)."""
    if source == REQUIRED:
        from effopd.data.loaders import DatasetError

        raise DatasetError(f"data.{which} is not set: this config needs your own prompt set; pass data.{which}=PATH "
                           "(.jsonl, .parquet or a `datasets` directory with prompt and answer fields)")
    if source == EMBEDDED and teacher_field is not None:
        from effopd.data.loaders import DatasetError

        raise DatasetError(f"data.{which}=embedded has no teacher column, but data.teacher_field={teacher_field} asks for "
                           f"one: several teachers need a prompt set whose rows name their teacher (data.{which}=PATH)")
    if source == EMBEDDED:
        splits = embedded_splits(data_cfg.task_seed, data_cfg.task_min_ops, data_cfg.task_max_ops, data_cfg.task_digits)
        examples = splits[{"train": "train", "val": "val", "eval": "test"}[which]]
    else:
        from effopd.data.loaders import load_examples

        split = {"train": data_cfg.train_split, "val": data_cfg.val_split, "eval": data_cfg.eval_split}[which]
        examples = load_examples(source, prompt_field=data_cfg.prompt_field, answer_field=data_cfg.answer_field,
                                 solution_field=data_cfg.solution_field, split=split, split_key=f"data.{which}_split",
                                 teacher_field=teacher_field)
        check_answers(examples, source)
    if which == "eval" and data_cfg.eval_limit:
        examples = examples[: data_cfg.eval_limit]
    template = data_cfg.prompt_template
    if template != "{prompt}":
        examples = [replace(e, prompt=apply_template(template, e.prompt)) for e in examples]
    return examples
