"""Read user prompt sets into ``Example`` lists, and write them back as jsonl.

Supported inputs (``load_examples``):

- ``.jsonl``: one JSON object per line, blank lines skipped; ``source`` is ``"{path}:{line}"``
  with 1-based line numbers.
- ``.parquet``: one row per example; ``source`` is ``"{path}[row {i}]"`` (0-based, as ``ds[i]``).
- a directory written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
  ``split`` picks one split of a DatasetDict. Rows are named like parquet rows.

Every problem with the input raises ``DatasetError`` naming the file, the line or row, what was
wrong and what to do, so a bad row in a 100k-line file is found without a debugger.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from effopd.data.example import Example
from effopd.errors import UserError
from effopd.utils import atomic_write_text

SUPPORTED = ".jsonl, .parquet, or a directory written by datasets' save_to_disk"
_QUOTE_CHARS = 60


class DatasetError(UserError, ValueError):
    """A prompt set could not be read; the message names the file, the line/row and the fix."""


def load_examples(
    path: str | os.PathLike[str],
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    solution_field: str = "solution",
    split: str | None = None,
    split_key: str = "split",
    limit: int | None = None,
    teacher_field: str | None = None,
) -> list[Example]:
    """Load the examples of a prompt set at ``path`` (jsonl, parquet or a saved HF dataset).

    ``*_field`` name the columns/keys to read; the solution is optional (``None`` when its field
    is missing or null). Numeric answers become strings (``42``, ``42.0`` -> ``"42"``; ``0.5`` ->
    ``"0.5"``). ``split`` selects one split of a saved ``DatasetDict`` (required when it has
    several; an error for inputs without splits). ``limit`` keeps the first ``limit`` examples and
    stops reading there, so rows after it are not validated. ``teacher_field`` (optional) names
    the column whose text names each row's teacher; every row must have it.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    fields = {"prompt": prompt_field, "answer": answer_field, "solution": solution_field}
    if teacher_field is not None:
        fields["teacher"] = teacher_field
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{name}: no such file or directory; check the path of the prompt set")
    if p.is_dir():
        rows = _dataset_rows(p, name, split, split_key)
    else:
        suffix = p.suffix.lower()
        if suffix not in (".jsonl", ".parquet"):
            raise DatasetError(
                f"{name}: unsupported file type {p.suffix or '(no extension)'!r}; "
                f"use {SUPPORTED}"
            )
        if split is not None:
            raise DatasetError(
                f"{name}: split={split!r} was given but a {suffix} file has no splits; "
                f"remove {split_key} or point to a saved DatasetDict"
            )
        rows = _jsonl_rows(p, name) if suffix == ".jsonl" else _parquet_rows(p, name)

    examples = []
    for source, row in rows:
        examples.append(_to_example(row, source, fields))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DatasetError(f"{name}: the dataset has no rows; add examples or use another file")
    return examples


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike[str]) -> None:
    """Write ``examples`` as jsonl (``prompt``, ``answer``, and ``solution`` when not None).

    Parent directories are created. The file is replaced atomically
    (:func:`effopd.utils.atomic_write_text`), so readers never see a half-written file.
    """
    lines = []
    for ex in examples:
        record = {"prompt": ex.prompt, "answer": ex.answer}
        if ex.solution is not None:
            record["solution"] = ex.solution
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))


# ---------------------------------------------------------------------------- readers
# Each yields (source, row) pairs; a row is whatever the file holds, checked by _to_example.


def _jsonl_rows(p: Path, name: str) -> Iterator[tuple[str, Any]]:
    # Binary lines decoded one by one, so a bad byte is reported with its line number.
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{name}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # the BOM some editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(
                    f"{source}: not valid UTF-8 (byte {e.start} of the line: {e.reason}); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:  # RecursionError: deeply nested arrays
                detail = str(e) if isinstance(e, ValueError) else "nested too deeply"
                raise DatasetError(
                    f"{source}: invalid JSON ({detail}) in line starting "
                    f"{line.strip()[:_QUOTE_CHARS]!r}; each line must hold one JSON object"
                ) from None
            yield source, row


def _parquet_rows(p: Path, name: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=1024)
        rows = (row for batch in batches for row in batch.to_pylist())
        for i, row in enumerate(rows):
            yield f"{name}[row {i}]", row
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, IO errors OSError
        raise DatasetError(f"{name}: cannot read as parquet ({e}); check the file") from None


def _dataset_rows(p: Path, name: str, split: str | None, split_key: str = "split") -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise DatasetError(
            f"{name}: a directory, but not a dataset written by save_to_disk ({e}); "
            f"point to {SUPPORTED}"
        ) from None
    except Exception as e:  # datasets fails in many ways (an empty saved Dataset: IndexError)
        raise DatasetError(
            f"{name}: datasets.load_from_disk failed ({type(e).__name__}: {e}); the dataset may "
            "be empty or damaged: save it again with save_to_disk"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        available = ", ".join(repr(s) for s in ds)
        if split is None:
            if len(ds) != 1:
                raise DatasetError(
                    f"{name}: holds several splits ({available}); choose one with {split_key}=NAME"
                )
            split = next(iter(ds))
        elif split not in ds:
            raise DatasetError(
                f"{name}: no split {split!r}; available splits: {available}; "
                f"set {split_key} to one of them"
            )
        ds = ds[split]
    elif split is not None:
        raise DatasetError(
            f"{name}: split={split!r} was given but this is a single Dataset without splits; "
            f"remove {split_key}"
        )
    for i, row in enumerate(ds):
        yield f"{name}[row {i}]", row


# ---------------------------------------------------------------------------- validation


def _to_example(row: Any, source: str, fields: Mapping[str, str]) -> Example:
    """Check one row and turn it into an ``Example`` (``source`` is its file:line or [row i])."""
    if not isinstance(row, Mapping):
        raise DatasetError(
            f"{source}: expected a JSON object with {fields['prompt']!r} and "
            f"{fields['answer']!r} fields, got {type(row).__name__}; write one object per row"
        )
    for role in ("prompt", "answer"):
        if fields[role] not in row:
            keys = ", ".join(repr(k) for k in list(row)[:20]) or "none"
            raise DatasetError(
                f"{source}: missing {role} field {fields[role]!r} (the row has fields: {keys}); "
                f"set data.{role}_field ({role}_field=...) to the name of the {role} field"
            )
    prompt = row[fields["prompt"]]
    if not isinstance(prompt, str):
        raise DatasetError(
            f"{source}: prompt field {fields['prompt']!r} must be a string, "
            f"got {type(prompt).__name__}; fix the row or set data.prompt_field"
        )
    if not prompt.strip():
        raise DatasetError(
            f"{source}: empty prompt in field {fields['prompt']!r}; fill it in or remove the row"
        )
    answer = _text(row[fields["answer"]], source, fields["answer"])
    if answer is None or not answer.strip():
        raise DatasetError(
            f"{source}: empty or null answer in field {fields['answer']!r}; every prompt needs a "
            "verifiable answer: fill it in or remove the row"
        )
    solution = _text(row.get(fields["solution"]), source, fields["solution"])
    teacher = None
    if "teacher" in fields:
        teacher = row.get(fields["teacher"])
        if not isinstance(teacher, str) or not teacher.strip():
            raise DatasetError(
                f"{source}: teacher field {fields['teacher']!r} is {teacher!r}; every row needs the name of its teacher "
                "(a key of model.teachers) there, or set data.teacher_field to the column that holds it"
            )
    return Example(prompt=prompt, answer=answer, solution=solution, source=source, teacher=teacher)


def _text(value: Any, source: str, field: str) -> str | None:
    """A string, a finite number rendered as text (integers without ``.0``), or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    raise DatasetError(
        f"{source}: field {field!r} must be a string or a finite number, got {value!r:.60}; "
        "fix the row"
    )
