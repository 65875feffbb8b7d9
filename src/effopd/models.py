"""Loading students, teachers and tokenizers, and checking that they can be distilled.

A model name is one of: ``"embedded"`` (the tiny tokenizer/teacher/student that ship inside the
package, built by ``effopd bootstrap``), a local directory written by ``save_pretrained``, or a
Hugging Face hub id (``Qwen/Qwen3-1.7B``). :func:`resolve` turns each into a local directory: a
hub id is looked up in the local Hugging Face cache first and downloaded only when it is not
there, so that everything downstream (``from_pretrained``, the analyses that read safetensors
files) sees a folder on disk.
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
DEVICES = ("auto", "cpu", "cuda")
#: Files of a hub repository that loading a model and its tokenizer needs (weights as safetensors only).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


class ModelLoadError(UserError, ValueError):
    pass


def resolve(name: str, role: str) -> str:
    """A local model directory for ``name``: the shipped model for ``role`` ("student" or
    "teacher") when ``name`` is ``embedded``; an existing path as it is; otherwise a hub id,
    resolved to its snapshot folder in the local Hugging Face cache (downloaded if absent).

    A name that can only be a path (it starts with ``.``, ``/`` or ``~``, has more than one ``/``,
    or is not a valid hub id) and does not exist is an error saying so, never a hub look-up."""
    if name == EMBEDDED:
        path = ASSETS / role
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"the embedded {role} is missing from {path}; the package was installed without its "
                "assets. Rebuild them with `effopd bootstrap --out DIR` and pass "
                f"model.{role}=DIR/{role}"
            )
        return str(path)
    if os.path.exists(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if not _is_hub_id(name):
        raise ModelLoadError(
            f"{role} model: the local directory {name} does not exist; pass a directory written by "
            f"save_pretrained, `{EMBEDDED}` for the built-in {role}, or a Hugging Face hub id such as Qwen/Qwen3-1.7B"
        )
    return _hub_snapshot(name, role)


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a hub repository id (``name`` or ``namespace/name``)."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_snapshot(repo_id: str, role: str) -> str:
    """The local snapshot folder of hub model ``repo_id``: from the cache if it is there, else
    downloaded; a one-line :class:`ModelLoadError` when neither works."""
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or cached partially): try the hub
        pass
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated, ...: reported with the id
        reason = _first_line(err)
    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):  # files loaded earlier by from_pretrained, without a complete snapshot
        return os.path.dirname(cached)
    raise ModelLoadError(
        f"{role} model {repo_id!r} is not a local directory, is not in the local Hugging Face cache, and could not "
        f"be downloaded ({reason}); download it with `huggingface-cli download {repo_id}` (`hf download {repo_id}` "
        "with newer huggingface_hub) into the cache this machine reads (HF_HOME), or pass a local directory written "
        "by save_pretrained"
    )


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, else the CPU; ``cuda`` without a CUDA device is an error."""
    if device not in DEVICES:
        raise ModelLoadError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda was asked for but this torch sees no CUDA device "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False); pass --device cpu or auto")
    return torch.device(device)


def pick_dtype(dtype: str, device: str | torch.device) -> str:
    """``auto`` = bfloat16 on CUDA, float32 on the CPU; any name in :data:`DTYPES` as it is."""
    if dtype == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return dtype


def load_tokenizer(name: str, role: str = "student") -> PreTrainedTokenizerBase:
    path = resolve(name, role)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - re-raised with the input named
        raise ModelLoadError(f"could not load the {role} tokenizer from {path!r}: {err}") from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name: str, role: str, dtype: str = "float32", device: str | torch.device = "cpu") -> PreTrainedModel:
    """The model ``name`` (see :func:`resolve`) in ``dtype`` (a name in :data:`DTYPES`) on ``device``."""
    path = resolve(name, role)
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    folder = Path(path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ModelLoadError(
            f"the {role} model in {path} has only pickled weights (*.bin); effopd reads safetensors only (a pickle can "
            "run code when loaded). Convert it once where you trust the file: AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR) writes model.safetensors"
        )
    if folder.is_dir() and (folder / "sharded").is_dir() and not any(folder.glob("model*.safetensors")):
        raise ModelLoadError(
            f"{path} is a sharded checkpoint of an FSDP2 run (its weights are in sharded/); consolidate it once with "
            f"`effopd export {path} --out DIR` and use DIR"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True)
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
