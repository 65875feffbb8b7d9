"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the student, and the teacher on request.

``train.parallel=fsdp2`` shards each decoder layer and then the whole model over one device
mesh of all processes: every parameter is a ``DTensor`` holding 1/world of its rows on each
process, gathered layer by layer for the forward and backward passes and resharded after
(also the root's embedding, final norm and LM head: ``reshard_after_forward=True``, so that
after a generation nothing stays gathered and in-place edits of the shards, EffOPD's, are what
the next forward sees).

The wrapping is applied here rather than by accelerate's FSDP plugin: accelerate 1.15 turns an
FSDP request on CPU processes into DDP without a word (``AcceleratorState`` only switches to FSDP
from a GPU-type distributed setup), and the one path should be the one the CPU tests exercise.
accelerate still owns the processes, the device, autocast and the trackers.

Checkpoints: the student and optimizer state are written with torch distributed checkpoint
(each process writes its shards into ``sharded/``; loading reshards); a consolidated Hugging
Face copy of the weights is written at the end of training (and at every checkpoint with
``train.consolidate_checkpoints``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor`` (a view: writing it writes the parameter), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def decoder_layers(model) -> list[torch.nn.Module]:
    inner = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(
            f"train.parallel=fsdp2: cannot find the decoder layers of {type(model).__name__} (model.get_decoder().layers); "
            "use a Llama/Qwen/Mistral-style causal LM or train.parallel=ddp"
        )
    return list(layers)


def shard_model(model, device_type: str, world: int):
    """Shard ``model`` in place (each decoder layer, then the root) over all ``world`` processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def save_sharded(path: Path, model, optimizer) -> None:
    """Every process writes its shards of the model and optimizer state into ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _inner(optimizer))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(path: Path, model, optimizer) -> None:
    """Load the model and optimizer state of ``path`` (resharded to this run's processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, _inner(optimizer))
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, _inner(optimizer), model_state_dict=state["model"], optim_state_dict=state["optim"])


def save_consolidated(model, path: Path, is_main: bool) -> None:
    """The full weights as a Hugging Face checkpoint in ``path`` (a collective: every process
    calls it; the main process gathers them on the CPU and writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:  # an unsharded twin built on the meta device takes the gathered tensors as they are
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            twin = AutoModelForCausalLM.from_config(model.config)
        twin.load_state_dict(full, assign=True)
        twin.tie_weights()
        twin.save_pretrained(path)  # drops tied duplicates as any save_pretrained does


def export_sharded(checkpoint: Path, out: Path) -> Path:
    """Consolidate the sharded checkpoint ``checkpoint`` (a ``step-N`` folder of an FSDP2 run)
    into Hugging Face weights in ``out`` (``model.safetensors``, config, tokenizer), in one
    process, without a process group; the shards are read, resharded, into a float32 model."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from effopd.checkpoint import SHARDED_DIR, CheckpointError

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / SHARDED_DIR / ".metadata").exists():
        raise CheckpointError(
            f"{checkpoint} holds no sharded weights ({SHARDED_DIR}/.metadata is missing): export takes a step-N folder "
            "of a run trained with train.parallel=fsdp2"
        )
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=torch.float32)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_DIR), no_dist=True)
    model.load_state_dict(state["model"])
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return out
