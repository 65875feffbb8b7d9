"""Reading checkpoints one tensor at a time, and finding the checkpoints of a run.

A checkpoint is a Hugging Face model directory with ``model.safetensors``, or shards listed in
``model.safetensors.index.json`` (what ``save_pretrained``, TRL and verl's HF export write).
:class:`CheckpointReader` reads the safetensors headers up front (names, shapes, dtypes, and a
check that no tensor runs past the end of its file) and loads one tensor, or a block of its
rows, at a time with a plain file read, so analyses never hold a whole model. It does not use
``safetensors.safe_open``: that memory-maps the file, and every page of a mapped file that has
been touched counts in the process's resident memory until the mapping is closed, so reading a
model through one costs as much peak memory as loading it whole. A read leaves the file's pages
in the page cache only, and each tensor returned owns its memory.

Every problem is an :class:`AnalysisError` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from effopd.checkpoint import COMPLETE, CheckpointError, step_checkpoints

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"
_TRAILING_INT_RE = re.compile(r"(\d+)$")
# safetensors dtype codes; the float8 and unsigned types only where this torch has them
_DTYPES = {code: getattr(torch, name) for code, name in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
    ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, name)}


class AnalysisError(CheckpointError):
    """An input to an analysis is missing, corrupt or inconsistent."""


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _read_header(file: Path) -> dict[str, dict]:
    """The safetensors header of ``file`` (8-byte little-endian length, then JSON), checked
    against the file size so that a truncated file is reported with the first tensor it cuts.
    Each entry gets ``start``: the file offset of its first byte."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 0 or n > size - 8:
            raise AnalysisError(f"{file} is not a valid safetensors file (bad header length); re-save or re-download it")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise AnalysisError(f"{file} has a corrupt safetensors header ({e}); re-save or re-download it") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            info["shape"], info["dtype"]
            info["start"] = 8 + n + begin
        except (KeyError, TypeError, IndexError, ValueError):
            raise AnalysisError(f"{file} has a corrupt safetensors header entry for tensor {name!r}") from None
        if end > data_bytes:
            raise AnalysisError(
                f"{file} is truncated or corrupt: tensor {name!r} needs data bytes up to {end} but the "
                f"file holds {data_bytes}; re-save or re-download it"
            )
    return header


class CheckpointReader:
    """Tensor-at-a-time access to one checkpoint directory.

    ``names`` lists the tensors in natural order; ``shape(name)`` and ``dtype(name)`` come from
    the headers; ``get(name)`` loads one tensor (in its stored dtype, on CPU), ``get(name, rows)``
    a block of its rows. No file stays open between calls."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise AnalysisError(f"checkpoint directory {self.path} does not exist")
        if not self.path.is_dir():
            raise AnalysisError(f"checkpoint {self.path} is not a directory (expected a Hugging Face model directory)")
        if (self.path / SINGLE).exists():
            files = {SINGLE: None}
        elif (self.path / INDEX).exists():
            files = self._read_index()
        else:
            raise AnalysisError(
                f"{self.path} has neither {SINGLE} nor {INDEX}; analyses read safetensors checkpoints "
                f"(re-save a .bin checkpoint with save_pretrained(..., safe_serialization=True))"
            )
        # name -> (file, dtype code, shape, file offset of the data, data bytes)
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for fname, expected in files.items():
            file = self.path / fname
            header = _read_header(file)
            for name, info in header.items():
                begin, end = info["data_offsets"]
                self._entries[name] = (file, info["dtype"], tuple(info["shape"]), info["start"], end - begin)
            missing = sorted(set(expected or ()) - set(header))
            if missing:
                raise AnalysisError(f"{self.path / INDEX} puts tensor {missing[0]!r} in {file}, which does not contain it")
        self.names = sorted(self._entries, key=natural_key)

    def _read_index(self) -> dict[str, list[str]]:
        index = self.path / INDEX
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise AnalysisError(f"{index} is not a valid safetensors index ({e!r})") from None
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        for fname, names in files.items():
            if not (self.path / fname).exists():
                raise AnalysisError(
                    f"shard {self.path / fname} (listed in {index} for tensors such as {names[0]!r}) is missing"
                )
        return files

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def dtype(self, name: str) -> str:
        return self._entries[name][1]

    def file(self, name: str) -> Path:
        return self._entries[name][0]

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Load tensor ``name`` (stored dtype, CPU), or only ``rows`` (a slice of its first
        dimension, step 1): a fresh tensor, read straight from the file into its own memory."""
        if name not in self._entries:
            raise AnalysisError(f"tensor {name!r} is not in checkpoint {self.path}")
        file, code, shape, start, nbytes = self._entries[name]
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise AnalysisError(f"tensor {name!r} in {file} has dtype {code}, which this torch cannot hold")
        if nbytes != math.prod(shape) * dtype.itemsize:
            raise AnalysisError(f"{file} is corrupt: tensor {name!r} ({code}, shape {list(shape)}) has "
                                f"{nbytes} data bytes; re-save or re-download it")
        if rows is not None:
            first, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError(f"rows must be a contiguous slice, got {rows}")
            n_rows, row_bytes = max(0, stop - first), math.prod(shape[1:]) * dtype.itemsize
            shape, start, nbytes = (n_rows, *shape[1:]), start + first * row_bytes, n_rows * row_bytes
        out = torch.empty(shape, dtype=dtype)
        with open(file, "rb") as f:
            f.seek(start)
            got = f.readinto(out.reshape(-1).view(torch.uint8).numpy())
        if got != nbytes:
            raise AnalysisError(f"cannot read tensor {name!r} from {file}: the file ended early; it may be corrupt")
        return out

    def config(self) -> dict:
        cfg = self.path / "config.json"
        return json.loads(cfg.read_text()) if cfg.exists() else {}

    def close(self) -> None:
        """Nothing to release (no file stays open); kept so that a reader works as a context manager."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self.names)} tensors)"


def common_names(base: CheckpointReader, ckpt: CheckpointReader) -> list[str]:
    """Tensor names shared by ``base`` and ``ckpt``, after checking that they match.

    The only difference allowed is ``lm_head.weight`` missing on one side (tied to the
    embeddings there); it is then left out, since the embedding carries it. Any other missing
    name or any shape difference is an :class:`AnalysisError` naming the tensor."""
    only_base = [n for n in base.names if n not in ckpt and n != LM_HEAD]
    only_ckpt = [n for n in ckpt.names if n not in base and n != LM_HEAD]
    if only_base or only_ckpt:
        raise AnalysisError(
            f"checkpoint {ckpt.path} does not match base {base.path}: "
            + (f"missing {only_base[:5]}{' ...' if len(only_base) > 5 else ''}; " if only_base else "")
            + (f"extra {only_ckpt[:5]}{' ...' if len(only_ckpt) > 5 else ''}; " if only_ckpt else "")
            + "both must be the same architecture"
        )
    names = [n for n in base.names if n in ckpt]
    for n in names:
        if base.shape(n) != ckpt.shape(n):
            raise AnalysisError(
                f"tensor {n!r} has shape {list(ckpt.shape(n))} in {ckpt.file(n)} but "
                f"{list(base.shape(n))} in base {base.file(n)}; both must be the same architecture"
            )
    return names


_TRAINER_DIR_RE = re.compile(r"^checkpoint-(\d+)$")


def trainer_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``[(N, path)]`` of the ``checkpoint-N`` folders that a transformers ``Trainer`` (and so
    every TRL trainer) writes into its ``output_dir``, sorted by N. A folder counts when it holds
    full weights (``model.safetensors`` or its index) and ``trainer_state.json``, which the
    Trainer writes after the weights; one that holds only a PEFT adapter is an error (its
    tensors are not the model's)."""
    found = []
    for p in Path(root).iterdir():
        m = _TRAINER_DIR_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        if _is_model_dir(p) and (p / "trainer_state.json").exists():
            found.append((int(m.group(1)), p))
        elif (p / "adapter_model.safetensors").exists():
            raise AnalysisError(
                f"{p} holds a PEFT adapter (adapter_model.safetensors), not full weights; merge it into its base "
                "(PeftModel.from_pretrained(base, DIR).merge_and_unload().save_pretrained(OUT)) and pass OUT as STEP=OUT"
            )
        else:
            warnings.warn(f"ignoring {p}: it has no model weights ({SINGLE}) or no trainer_state.json (a save that did "
                          "not finish?)", stacklevel=2)
    return sorted(found)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under ``root``, sorted by step: an effopd run's ``checkpoints/``
    folder (``step-N``) or a transformers/TRL ``Trainer`` output directory (``checkpoint-N``,
    see :func:`trainer_checkpoints`).

    For effopd checkpoints the same rule as resume (:func:`effopd.checkpoint.step_checkpoints`):
    temporary and superseded folders are skipped, and a ``step-N`` folder without a valid
    ``COMPLETE`` manifest is left out with a warning. A folder with no complete checkpoint is an
    error."""
    root = Path(root)
    if not root.is_dir():
        raise AnalysisError(f"checkpoint folder {root} does not exist; pass a run's checkpoints/ folder, "
                            "model directories, or STEP=PATH pairs")
    found = step_checkpoints(root) or trainer_checkpoints(root)
    if not found:
        raise AnalysisError(f"{root} holds no complete checkpoint: neither a step-N folder with a valid {COMPLETE} "
                            "manifest (effopd) nor a checkpoint-N folder with weights and trainer_state.json (a "
                            "transformers/TRL Trainer); pass model directories as STEP=PATH instead")
    return found


def _is_model_dir(p: Path) -> bool:
    return (p / SINGLE).exists() or (p / INDEX).exists()


def parse_checkpoint_args(args: Sequence[str]) -> list[tuple[int, Path]]:
    """Turn command-line checkpoint arguments into ``[(step, path)]`` sorted by step.

    Each argument is ``STEP=PATH`` (an explicit integer step label), a model directory whose name
    ends in its step (``step-100``, ``checkpoint-100``, ``global_step_100``), or a folder of
    ``step-N`` checkpoints (a run's ``checkpoints/``), expanded by :func:`list_checkpoints` into its
    complete checkpoints. An explicitly named directory is taken as it is, manifest or not."""
    out: list[tuple[int, Path]] = []
    for arg in args:
        label, sep, rest = arg.partition("=")
        if sep and "/" not in label:
            try:
                step = int(label)
            except ValueError:
                raise AnalysisError(f"checkpoint label {label!r} in {arg!r} is not an integer training step") from None
            path = Path(rest)
            if not path.exists():
                raise AnalysisError(f"checkpoint directory {path} (from {arg!r}) does not exist")
            out.append((step, path))
            continue
        path = Path(arg)
        if not path.exists():
            raise AnalysisError(f"checkpoint path {path} does not exist")
        if _is_model_dir(path):
            m = _TRAILING_INT_RE.search(path.name)
            if not m:
                raise AnalysisError(f"cannot tell the training step of {path} from its name; pass it as STEP={path}")
            out.append((int(m.group(1)), path))
        else:
            out.extend(list_checkpoints(path))
    steps = [s for s, _ in out]
    dup = sorted({s for s in steps if steps.count(s) > 1})
    if dup:
        raise AnalysisError(f"step(s) {dup} given more than once among the checkpoints {[str(p) for _, p in out]}")
    if not out:
        raise AnalysisError("no checkpoints given")
    return sorted(out)
