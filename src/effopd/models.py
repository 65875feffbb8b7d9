"""Loading students, teachers and tokenizers, and checking that they can be distilled.

``"embedded"`` names the tiny tokenizer/teacher/student that ship inside the package (built by
``effopd bootstrap``); anything else is a local path or a Hugging Face hub id handed to
``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from effopd.data import EMBEDDED
from effopd.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets" / "default"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UserError, ValueError):
    pass


def resolve(name: str, role: str) -> str:
    """Map ``"embedded"`` to the shipped model for ``role`` ("student" or "teacher")."""
    if name != EMBEDDED:
        return name
    path = ASSETS / role
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"the embedded {role} is missing from {path}; the package was installed without its "
            "assets. Rebuild them with `effopd bootstrap --out DIR` and pass "
            f"model.{role}=DIR/{role}"
        )
    return str(path)


def _check_local(path: str, what: str) -> None:
    if not os.path.exists(path) and not _is_hub_id(path):
        raise ModelLoadError(
            f"{what} path {path!r} does not exist; pass a directory written by save_pretrained "
            f"(or `{EMBEDDED}` for the built-in default)"
        )


def _is_hub_id(path: str) -> bool:
    return path.count("/") <= 1 and not path.startswith((".", "/", "~"))


def load_tokenizer(name: str, role: str = "student") -> PreTrainedTokenizerBase:
    path = resolve(name, role)
    _check_local(path, f"{role} tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - re-raised with the input named
        raise ModelLoadError(f"could not load the {role} tokenizer from {path!r}: {err}") from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name: str, role: str, dtype: str = "float32", device: str | torch.device = "cpu") -> PreTrainedModel:
    path = resolve(name, role)
    _check_local(path, role)
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"could not load the {role} model from {path!r}: {err}") from err
    return model.to(device)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def check_same_vocab(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, student_name: str, teacher_name: str
) -> None:
    """OPD compares logprobs of the same token ids, so both tokenizers must map every token to
    the same id. Raise naming both tokenizers and the first ids that differ."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv == tv:
        return
    s_by_id = {i: t for t, i in sv.items()}
    t_by_id = {i: t for t, i in tv.items()}
    diffs = [i for i in sorted(set(s_by_id) | set(t_by_id)) if s_by_id.get(i) != t_by_id.get(i)]
    shown = ", ".join(f"id {i}: student {s_by_id.get(i)!r} vs teacher {t_by_id.get(i)!r}" for i in diffs[:3])
    raise ModelLoadError(
        f"student tokenizer ({student_name}, {len(sv)} tokens) and teacher tokenizer "
        f"({teacher_name}, {len(tv)} tokens) differ at {len(diffs)} ids, first {shown}. On-policy "
        "distillation needs one shared vocabulary: pick a teacher from the student's model family"
    )
