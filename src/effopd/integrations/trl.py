"""EffOPD as a callback of a transformers/TRL ``Trainer``.

:class:`EffOPDCallback` runs the same controller as ``effopd train`` (:mod:`effopd.extrapolate`)
inside any ``transformers.Trainer`` subclass: TRL's ``DistillationTrainer``, ``GKDTrainer``,
``GRPOTrainer``, or your own. After the optimizer steps it is told to (1, 2, 4, 8, ... by
default) it extrapolates the attention/MLP weights along θ_t − θ_anchor, scores every candidate
on a held-out prompt set with the same sampling seed (common random numbers), and keeps the best
(θ_t bitwise when nothing helps). The optimizer, its moments and the learning-rate schedule are
never touched.

Its state (anchor tensors, search history, adaptive gain) is written into every ``checkpoint-N``
folder the Trainer saves and read back when training resumes from one, so a resumed run takes
the decisions the uninterrupted run takes.

    from effopd.integrations.trl import EffOPDCallback, verifiable_reward

    callback = EffOPDCallback(val_dataset, tokenizer)        # rows with "prompt" and "answer"
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=train_dataset, processing_class=tokenizer,
                                  callbacks=[callback])

Runs it supports: one process, DDP, and FSDP2 (each process extrapolates its own shards; the
validation prompts are split across processes and the scores gathered, so every process takes
the same decision). It refuses DeepSpeed (its optimizer keeps the master weights in its own
partitions and would overwrite the change at the next step), FSDP1 and PEFT adapters, with a
message that says so.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from effopd.errors import UserError
from effopd.extrapolate import Extrapolator, anchor_file
from effopd.module_groups import DEFAULT_TYPE_ORDER
from effopd.sharding import is_sharded
from effopd.utils import atomic_write_text
from effopd.validation import SCORES, make_extrapolator, prompt_scores, validation_scorer

#: The callback's state file in a checkpoint folder (beside the anchor's safetensors file).
STATE_FILE = "effopd_extrapolate.json"
FRESH = "fresh"


class EffOPDSetupError(UserError, ValueError):
    """The callback cannot run in this setup or on this input; the message says what to change."""


@dataclass
class ValidationPrompt:
    """One validation prompt as the scorer sees it: the rendered prompt text, the reference
    answer (None when the score needs none) and the dataset row it came from."""

    prompt: str
    answer: str | None
    row: Mapping[str, Any] = field(default_factory=dict)


def verifiable_reward(completions: list, answer: list, **_) -> list[float]:
    """A TRL reward function (``GRPOTrainer(reward_funcs=[verifiable_reward])``): 1.0 where the
    completion's last ``\\boxed{}`` answer is equivalent to the row's ``answer`` (exact for
    numbers, math-verify for expressions), else 0.0. Conversational completions (lists of
    messages) are scored by their last message's content."""
    from effopd.rewards import reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [reward(t, str(a)) for t, a in zip(texts, answer, strict=True)]


def validation_prompts(rows: Iterable[Mapping[str, Any]], tokenizer, *, prompt_field: str = "prompt",
                       answer_field: str | None = "answer") -> list[ValidationPrompt]:
    """``rows`` (a ``datasets.Dataset`` or any sequence of dicts) as :class:`ValidationPrompt`:
    a text prompt as it is, a conversational one (a list of ``{"role", "content"}`` messages)
    rendered by the tokenizer's chat template with the generation prompt. A row without
    ``prompt_field`` but with ``messages`` (GKD/SFT data) is prompted with all messages but the
    last. ``answer_field=None``: no answer needed."""
    out = []
    for i, row in enumerate(rows):
        if prompt_field in row:
            prompt = row[prompt_field]
        elif "messages" in row and isinstance(row["messages"], list) and len(row["messages"]) > 1:
            prompt = row["messages"][:-1]
        else:
            raise EffOPDSetupError(f"validation row {i} has no {prompt_field!r} field (its fields: {sorted(row)}); "
                                   f"pass prompt_field= naming the prompt column")
        if isinstance(prompt, list):
            if getattr(tokenizer, "chat_template", None) is None:
                raise EffOPDSetupError(f"validation row {i} is conversational but the tokenizer has no chat template; "
                                       "set tokenizer.chat_template or give text prompts")
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if not isinstance(prompt, str) or not prompt:
            raise EffOPDSetupError(f"validation row {i}: {prompt_field!r} is {prompt!r}; it must be a non-empty text "
                                   "or a list of chat messages")
        answer = None
        if answer_field is not None:
            if row.get(answer_field) is None:
                raise EffOPDSetupError(f"validation row {i} has no {answer_field!r} (score='reward' checks each response "
                                       f"against it); pass answer_field= naming the answer column, or another score")
            answer = str(row[answer_field])
        out.append(ValidationPrompt(prompt, answer, dict(row)))
    return out


def _trl_style(fn: Callable) -> Callable[[list[str], list], list[float]]:
    """A TRL reward function (keyword arguments ``prompts``, ``completions`` and one list per
    dataset column) as ``prompt_scores``' ``score(texts, examples)``."""

    def score(texts: list[str], examples: list[ValidationPrompt]) -> list[float]:
        columns = {k: [e.row.get(k) for e in examples] for k in (examples[0].row if examples else {})}
        for taken in ("prompt", "prompts", "completion", "completions", "completion_ids"):
            columns.pop(taken, None)
        values = fn(prompts=[e.prompt for e in examples], completions=texts, **columns)
        if any(v is None for v in values):
            raise EffOPDSetupError(f"the validation reward function {getattr(fn, '__name__', fn)!r} returned None for "
                                   "some responses; every validation response needs a number")
        return values

    return score


def unsupported_setup(args, model) -> str | None:
    """Why EffOPD cannot run in this Trainer setup (None: it can)."""
    env = os.environ
    zero3 = model is not None and any(hasattr(p, "ds_id") for p in model.parameters())
    if getattr(args, "deepspeed", None) or zero3 or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return ("DeepSpeed is not supported: its optimizer holds the trained (fp32) weights in its own partitions and "
                "copies them over the model's parameters at every step, so an extrapolation would be lost at the next "
                "step. Train with DDP or FSDP2 (TrainingArguments(fsdp='full_shard', fsdp_config={'version': 2})) "
                "to use EffOPD")
    fsdp_on = bool(getattr(args, "fsdp", None)) or env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    config = getattr(args, "fsdp_config", None) or {}
    version = str(config.get("version", env.get("FSDP_VERSION", 2))) if isinstance(config, dict) else "2"
    if fsdp_on and version == "1":
        return ("FSDP1 is not supported (its flat parameters do not keep the weight matrices EffOPD extrapolates); "
                "use FSDP2: fsdp_config={'version': 2} (transformers' default) or fsdp_version: 2 in the accelerate config")
    if hasattr(model, "peft_config"):
        return ("PEFT adapters are not supported: EffOPD extrapolates full weight matrices, and a LoRA update is the "
                "product of two trained factors; train the full weights, or merge the adapter and train on")
    return None


class EffOPDCallback(TrainerCallback):
    """EffOPD inside a transformers/TRL ``Trainer``.

    ``val_dataset``: the held-out prompts (rows with ``prompt_field``, and ``answer_field`` for
    ``score="reward"``); the first ``val_prompts`` are used. Keep them out of the training set.
    ``processing_class``: the tokenizer (default: the Trainer's).

    ``score``: ``"reward"`` (the verifiable reward of each sampled response against the row's
    answer), ``"teacher_logprob"`` (the ``teacher``'s mean per-token logprob of it), or a TRL
    reward function (called as ``fn(prompts=..., completions=..., <column>=[...])``, one number
    per completion). Higher is better.

    The controller's settings (``modules``, ``schedule``, ``max_tries``, ``margin``, ``accept``,
    ``momentum``, ``trigger_steps``, ``max_step``, the gains, ``storage``) and the validation settings
    (``val_samples``, ``val_greedy``, ``val_seed``) mean what the ``extrapolate.*`` keys of
    ``effopd train`` mean. ``max_new_tokens``/``temperature``/``top_p`` default to the
    Trainer's own (``max_completion_length`` or ``max_new_tokens``, ``temperature``, ``top_p``),
    so validation samples as training does.

    ``resume_from``: where to read the callback's state when training resumes (default:
    ``args.resume_from_checkpoint``, else ``output_dir/checkpoint-<step>``); ``"fresh"`` starts a
    new anchor at the resumed weights instead.
    """

    def __init__(
        self,
        val_dataset: Iterable[Mapping[str, Any]],
        processing_class=None,
        *,
        score: str | Callable = "reward",
        teacher: torch.nn.Module | None = None,
        modules: Sequence[str] = DEFAULT_TYPE_ORDER,
        schedule: str = "rank1",
        max_tries: int = 5,
        margin: float = 1.0,
        accept: str = "paired",
        momentum: float = 0.5,
        trigger_steps: list[int] | None = None,
        max_step: int | None = None,
        init_gain: float = 0.5,
        min_gain: float = 0.125,
        max_gain: float = 64.0,
        storage: str = "cpu",
        val_prompts: int = 128,
        val_samples: int = 1,
        val_greedy: bool = False,
        val_seed: int = 4321,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        batch_size: int | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        resume_from: str | os.PathLike | None = None,
    ):
        if not callable(score) and score not in SCORES:
            raise EffOPDSetupError(f"EffOPDCallback(score={score!r}): choose one of {SCORES} or pass a reward function")
        if score == "teacher_logprob" and teacher is None:
            raise EffOPDSetupError("EffOPDCallback(score='teacher_logprob') needs the teacher model: pass teacher=...")
        if val_prompts < 1 or val_samples < 1:
            raise EffOPDSetupError(f"EffOPDCallback: val_prompts={val_prompts} and val_samples={val_samples} must be >= 1")
        self.rows = list(itertools.islice(val_dataset, val_prompts))
        if not self.rows:
            raise EffOPDSetupError("EffOPDCallback: val_dataset is empty; pass held-out prompts to score candidates on")
        self.tokenizer, self.score, self.teacher = processing_class, score, teacher
        self.controller = dict(schedule=schedule, max_tries=max_tries, margin=margin, accept=accept, momentum=momentum,
                               trigger_steps=trigger_steps,
                               max_step=max_step, init_gain=init_gain, min_gain=min_gain, max_gain=max_gain, storage=storage)
        self.modules = list(modules)
        self.val_samples, self.val_greedy, self.val_seed = val_samples, val_greedy, val_seed
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.batch_size, self.prompt_field, self.answer_field = batch_size, prompt_field, answer_field
        self.resume_from = resume_from
        self.extrapolator: Extrapolator | None = None
        self.examples: list[ValidationPrompt] = []
        self._model = None
        self._autocast = contextlib.nullcontext

    # ---- set-up ------------------------------------------------------------------------------

    @staticmethod
    def _processes():
        from accelerate import PartialState

        state = PartialState()
        return state if state.num_processes > 1 else None

    def _resolve_sampling(self, args) -> dict:
        s = dict(self.sampling)
        if s["max_new_tokens"] is None:
            s["max_new_tokens"] = getattr(args, "max_completion_length", None) or getattr(args, "max_new_tokens", None) or 256
        if s["temperature"] is None:
            s["temperature"] = getattr(args, "temperature", None) or 1.0
        if s["top_p"] is None:
            s["top_p"] = getattr(args, "top_p", None) or 1.0
        return s

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        why = unsupported_setup(args, model)
        if why:
            raise EffOPDSetupError(f"EffOPDCallback: {why}")
        self.tokenizer = self.tokenizer or processing_class
        if self.tokenizer is None:
            raise EffOPDSetupError("EffOPDCallback: no tokenizer; pass processing_class= to the callback or the Trainer")
        self.tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a processor's text tokenizer
        answer_field = self.answer_field if self.score == "reward" else None
        self.examples = validation_prompts(self.rows, self.tokenizer, prompt_field=self.prompt_field, answer_field=answer_field)
        self.sampling = self._resolve_sampling(args)
        dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None
        device = next(model.parameters()).device
        self._autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
        self._model = model
        self.extrapolator = make_extrapolator(model, self.modules, self._processes(), **self.controller)
        if state.global_step > 0 and self.resume_from != FRESH:
            self._restore(args, state)
        if state.is_world_process_zero:
            n = sum(p.numel() for p in self.extrapolator.params.values())
            print(f"EffOPD: extrapolating {len(self.extrapolator.params)} tensors ({n:,} parameters on this process) of "
                  f"types {self.modules}; validation on {len(self.examples)} prompts")

    # ---- the search ----------------------------------------------------------------------------

    def _per_prompt(self, seed: int) -> Callable[[list], torch.Tensor]:
        score = _trl_style(self.score) if callable(self.score) else self.score

        def per_prompt(examples: list) -> torch.Tensor:
            return prompt_scores(self._model, self.tokenizer, examples, seed=seed, score=score, teacher=self.teacher,
                                 samples=self.val_samples, greedy=self.val_greedy, batch_size=self.batch_size, **self.sampling)

        return per_prompt

    def on_step_end(self, args, state, control, **kwargs):
        x, step = self.extrapolator, state.global_step
        if x is None or not x.should_trigger(step):
            return
        seed = self.val_seed + len(x.history)
        with self._autocast():
            rec = x.search(step, validation_scorer(self._per_prompt(seed), self.examples, self._processes()))
        state.log_history.append({**rec.metrics(), "extrapolate/total_seconds": x.total_seconds, "step": step})
        if state.is_world_process_zero:
            verdict = f"accepted c={rec.accepted_c:g}" if rec.accepted_c != 1 else "kept the trained weights"
            print(f"EffOPD step {step}: {verdict} (score {rec.s0:.4f} -> {rec.best:.4f}, tried {rec.candidates}, "
                  f"{rec.seconds:.1f} s)")

    # ---- checkpoints -----------------------------------------------------------------------------

    def _layout(self) -> tuple[bool, int, int]:
        """Whether the model is sharded, this process's rank and the number of processes."""
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        sharded = is_sharded(self._model)
        return sharded, (dist.get_rank() if sharded else 0), world

    def on_save(self, args, state, control, **kwargs):
        x = self.extrapolator
        if x is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        sharded, rank, processes = self._layout()
        if state.is_world_process_zero or sharded:
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{anchor_file(sharded, rank)}.tmp"
            save_file({n: t.contiguous() for n, t in x.tensors().items()}, str(tmp))
            os.replace(tmp, folder / anchor_file(sharded, rank))
        if state.is_world_process_zero:
            meta = {"step": state.global_step, "controller": x.state_dict(), "tensors": sorted(x.anchor), "sharded": sharded,
                    "processes": processes}
            atomic_write_text(folder / STATE_FILE, json.dumps(meta, indent=1))

    def _restore(self, args, state) -> None:
        candidates = [Path(p) for p in (self.resume_from, getattr(args, "resume_from_checkpoint", None)) if isinstance(p, (str, os.PathLike))]
        candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        folder = next((p for p in candidates if (p / STATE_FILE).exists()), None)
        if folder is None:
            raise EffOPDSetupError(
                f"EffOPDCallback: training resumes at step {state.global_step} but none of {[str(p) for p in candidates]} "
                f"holds {STATE_FILE} (the checkpoint was written without the callback, or elsewhere). Pass "
                f"EffOPDCallback(..., resume_from='CHECKPOINT_FOLDER'), or resume_from='fresh' to start a new anchor at "
                f"the resumed weights")
        meta = json.loads((folder / STATE_FILE).read_text())
        if meta.get("step") != state.global_step:
            raise EffOPDSetupError(f"EffOPDCallback: {folder / STATE_FILE} was written at step {meta.get('step')} but training "
                                   f"resumes at step {state.global_step}; point resume_from at the checkpoint being resumed")
        sharded, rank, processes = self._layout()
        if meta.get("sharded") != sharded or (sharded and meta.get("processes") != processes):
            raise EffOPDSetupError(f"EffOPDCallback: {folder} holds the anchor of a run with sharded={meta.get('sharded')} on "
                                   f"{meta.get('processes')} processes; this one has sharded={sharded} on {processes}. Resume "
                                   "with the same setup, or pass resume_from='fresh'")
        from safetensors.torch import load_file

        self.extrapolator.load_state_dict(meta["controller"], load_file(str(folder / anchor_file(sharded, rank))))
