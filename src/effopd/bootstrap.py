"""Build the embedded default from a seed: tokenizer, teacher, and an *eliciting* student.

- The tokenizer is trained with ``tokenizers`` on task text: one token per character plus one
  token for ``\\boxed{``.
- The teacher (Qwen3 architecture, ~1M parameters) is trained from scratch by SFT on worked
  solutions of the target distribution (2 to 3 operations) until it solves most problems.
- The student continues from the teacher's weights on a broader corpus (1 to 3 operations) in
  which most examples give the bare answer (``\\boxed{34}``): problems with a subtraction are
  worked out only 10% of the time, all-addition chains 80%. It keeps the skill but rarely uses
  it: greedy decoding works out only all-addition chains and answers the rest bare (low
  accuracy), while the worked form, when forced, is far better. (With one worked share for all
  problems, greedy decoding answered everything bare: 4% accuracy, below the 10-50% wanted.) Post-training then mostly *selects* existing
  behaviour, as it does for large pretrained models; this is the regime the paper studies.
  Student and teacher share architecture and tokenizer and differ in one stage of training.

Measured alternatives that failed (benchmarks/RESULTS.md): students that had to learn the skill
on their own from the mixed corpus (2x64, 3x64, 2x96 and 4x128 Qwen3, 125k to 1M parameters,
1,200 to 3,500 steps) learned the format but not the arithmetic: 7-15% accuracy even when forced
into the worked form, leaving OPD nothing to elicit.

The student's weights are "the base" for analyses and G-OPD.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, get_linear_schedule_with_warmup

from effopd.data.example import Example
from effopd.data.task import TaskSpec, bare_solution, make_problem, make_splits
from effopd.evaluate import evaluate_model
from effopd.utils import write_json

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


@dataclass
class SFTStage:
    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    warmup_frac: float = 0.05
    worked_frac: float = 1.0
    """Share of examples written as worked solutions (the rest: bare answer)..."""
    worked_frac_additions: float | None = None
    """...except for all-addition problems, which use this share when set."""
    min_ops: int = 2  # operation counts of the training corpus
    max_ops: int = 3
    worked_max_ops: int | None = None
    """Problems with more operations than this are always written bare (null: no such limit)."""


@dataclass
class BootstrapConfig:
    seed: int = 0
    task: TaskSpec = field(default_factory=TaskSpec)
    shape: ModelShape = field(default_factory=lambda: ModelShape(128, 4, 512, 4, 2, 32))
    teacher: SFTStage = field(default_factory=lambda: SFTStage(steps=1000))
    """The teacher, from scratch: worked solutions only."""
    student: SFTStage = field(default_factory=lambda: SFTStage(
        steps=400, lr=5e-4, worked_frac=0.1, worked_frac_additions=0.8, min_ops=1, max_ops=3))
    """The student, continuing from the teacher: bare answers, except mostly worked on all-addition chains."""
    n_test: int = 1000
    max_new_tokens: int = 48

    @classmethod
    def reduced(cls, seed: int = 0) -> "BootstrapConfig":
        """A minute-scale budget for tests: same code path, tiny step counts."""
        cfg = cls(seed=seed, n_test=64)
        cfg.teacher.steps, cfg.student.steps = 60, 60
        cfg.teacher.batch_size = cfg.student.batch_size = 16
        return cfg


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tok.add_tokens([AddedToken("\\boxed{", normalized=False)])
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
    )


def make_model(shape: ModelShape, tokenizer, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), max_position_embeddings=128, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **asdict(shape),
    )
    return Qwen3ForCausalLM(config)


def sft_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion+EOS with labels only on the completion (and EOS)."""
    rows, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    L = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (L - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (L - len(lab)) for lab in labels]),
    }


def corpus_batch(rng: random.Random, stage: SFTStage, corpus_spec: TaskSpec, exclude: set[str]) -> list[tuple[str, str]]:
    """One batch of (prompt, completion) pairs of a stage's corpus: fresh problems (never one in
    ``exclude``), each worked out with the stage's probability, else answered bare."""
    pairs = []
    while len(pairs) < stage.batch_size:
        ex = make_problem(rng, corpus_spec)
        if ex.prompt in exclude:
            continue
        frac = stage.worked_frac
        if stage.worked_frac_additions is not None and "-" not in ex.prompt:
            frac = stage.worked_frac_additions
        if stage.worked_max_ops is not None and ex.solution.count(";") > stage.worked_max_ops:
            frac = 0.0
        worked = rng.random() < frac
        pairs.append((ex.prompt, ex.solution if worked else bare_solution(ex)))
    return pairs


def sft(model, tokenizer, stage: SFTStage, spec: TaskSpec, seed: int, exclude: set[str], desc: str) -> list[float]:
    """Supervised training on freshly drawn problems (never ones in ``exclude``); returns the
    loss curve (mean per 50 steps)."""
    rng = random.Random(seed)
    corpus_spec = TaskSpec(stage.min_ops, stage.max_ops, spec.digits)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(stage.warmup_frac * stage.steps), stage.steps)
    model.train()
    curve, window = [], []
    for _ in tqdm(range(stage.steps), desc=desc, mininterval=2.0):
        pairs = corpus_batch(rng, stage, corpus_spec, exclude)
        loss = model(**sft_batch(tokenizer, pairs)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.item())
        if len(window) == 50:
            curve.append(sum(window) / len(window))
            window = []
    if window:
        curve.append(sum(window) / len(window))
    model.eval()
    return curve


def forced_worked(examples: list[Example]) -> list[Example]:
    """Prompts extended by the first worked step's left side (``47+25=``), which forces the
    worked form without revealing any result."""
    return [Example(e.prompt + e.solution.split("=")[0] + "=", e.answer, e.solution, e.source) for e in examples]


def model_record(model, tokenizer, test: list[Example], max_new_tokens: int, curve: list[float], start: float) -> dict:
    """What bootstrap.json records of one built model: size, build seconds, loss curve, and greedy
    test accuracy as it answers and when forced into the worked form."""
    greedy = evaluate_model(model, tokenizer, test, max_new_tokens=max_new_tokens)
    forced = evaluate_model(model, tokenizer, forced_worked(test), max_new_tokens=max_new_tokens)
    return {
        "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - start, 1),
        "loss_curve": [round(x, 4) for x in curve], "test_greedy_accuracy": greedy["accuracy"],
        "test_forced_worked_accuracy": forced["accuracy"], "test_mean_length": greedy["mean_length"],
    }


def bootstrap(out: str | Path, cfg: BootstrapConfig) -> dict:
    """Build tokenizer, teacher and student into ``out/{teacher,student}`` and record how good
    they are in ``out/bootstrap.json``."""
    out = Path(out)
    t0 = time.time()
    splits = make_splits(cfg.task, cfg.seed, n_train=2000, n_test=cfg.n_test)
    held_out = {e.prompt for e in splits["val"] + splits["test"]}
    corpus = [e.prompt + e.solution for e in splits["train"]]
    tokenizer = build_tokenizer(corpus)

    record: dict = {"seed": cfg.seed, "config": asdict(cfg)}
    test = splits["test"]
    model = make_model(cfg.shape, tokenizer, cfg.seed * 100 + 1)
    for role, stage, offset in (("teacher", cfg.teacher, 2), ("student", cfg.student, 3)):
        start = time.time()
        curve = sft(model, tokenizer, stage, cfg.task, cfg.seed * 100 + offset, held_out, desc=f"bootstrap {role}")
        record[role] = model_record(model, tokenizer, test, cfg.max_new_tokens, curve, start)
        model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
    record["seconds"] = round(time.time() - t0, 1)
    write_json(out / "bootstrap.json", record)
    return record


@dataclass
class SeparateConfig:
    """The second testbed: a student that is *not* the teacher's fine-tune.

    The teacher is an existing one (the embedded teacher by default: worked solutions of 2-3
    operations). The student has half its width and is pre-trained from scratch, apart from it,
    on problems of 1 to 2 operations, half of them worked out and half answered bare. The target
    task is longer, 3 operations (``task``): no such problem, worked or bare, is in the
    student's data, so continued SFT on its corpus cannot teach it; the teacher has to. (A
    student that had also seen 3-operation problems, always answered bare, kept answering them
    bare under OPD: it never sampled the worked form, so sampled-token distillation had nothing
    to reinforce; benchmarks/RESULTS.md.)"""

    seed: int = 0
    task: TaskSpec = field(default_factory=lambda: TaskSpec(3, 3, 2))
    shape: ModelShape = field(default_factory=lambda: ModelShape(64, 4, 256, 2, 1, 32))
    student: SFTStage = field(default_factory=lambda: SFTStage(steps=2000, lr=2e-3, worked_frac=0.5, min_ops=1, max_ops=2))
    n_test: int = 1000
    max_new_tokens: int = 48

    @classmethod
    def reduced(cls, seed: int = 0) -> "SeparateConfig":
        cfg = cls(seed=seed, n_test=64)
        cfg.student.steps, cfg.student.batch_size = 60, 16
        return cfg


def bootstrap_separate(out: str | Path, cfg: SeparateConfig, teacher: str | Path) -> dict:
    """Build the second testbed into ``out/{teacher,student}``: ``teacher`` (a model directory
    with its tokenizer) is copied as it is; the student is trained from scratch with its
    tokenizer (:class:`SeparateConfig`). Both are evaluated on the target task's test split
    (``out/bootstrap.json``)."""
    import shutil

    out, teacher = Path(out), Path(teacher)
    t0 = time.time()
    splits = make_splits(cfg.task, cfg.seed, n_train=2000, n_test=cfg.n_test)
    held_out = {e.prompt for e in splits["val"] + splits["test"]}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher)
    shutil.copytree(teacher, out / "teacher", dirs_exist_ok=True)
    record: dict = {"seed": cfg.seed, "config": asdict(cfg), "teacher_from": str(teacher)}
    test = splits["test"]
    teacher_model = Qwen3ForCausalLM.from_pretrained(out / "teacher")
    for role, model in (("teacher", teacher_model), ("student", make_model(cfg.shape, tokenizer, cfg.seed * 100 + 7))):
        start = time.time()
        curve = []
        if role == "student":
            curve = sft(model, tokenizer, cfg.student, cfg.task, cfg.seed * 100 + 8, held_out, desc="bootstrap student")
            model.save_pretrained(out / role)
            tokenizer.save_pretrained(out / role)
        model.eval()
        record[role] = model_record(model, tokenizer, test, cfg.max_new_tokens, curve, start)
    record["seconds"] = round(time.time() - t0, 1)
    write_json(out / "bootstrap.json", record)
    return record


def summary(record: dict) -> str:
    lines = [f"bootstrap seed {record['seed']} in {record['seconds']:.0f}s"]
    for role in ("student", "teacher"):
        r = record[role]
        lines.append(
            f"  {role}: {r['parameters']:,} params, greedy test accuracy {r['test_greedy_accuracy']:.1%}, "
            f"forced worked form {r['test_forced_worked_accuracy']:.1%} ({r['seconds']:.0f}s)"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(bootstrap("/tmp/effopd-bootstrap", BootstrapConfig.reduced()), indent=1)[:2000])
