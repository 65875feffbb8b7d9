"""Seconds per step: effopd's OPD loop against TRL's DistillationTrainer on the same models.

    python benchmarks/vs_trl.py --out benchmarks/results/vs_trl.json
    python benchmarks/vs_trl.py --models embedded --out benchmarks/results/vs_trl_embedded.json

``--models tiny`` (the default) builds the two models and the prompts in this script, from seed 0:
a character-level tokenizer (``<pad> <bos> <eos> <unk>``, digits, ``+-*=.()/:`` and space, the
letters of "Compute" and "Answer": 36 tokens), a Qwen3 student with 2 layers of width 64 (4 heads,
MLP 256) and a Qwen3 teacher with 4 layers of width 128 (4 heads, MLP 512), untied heads, random
weights, and prompts such as ``Compute 78+28*78.``. ``--models embedded`` uses the shipped
embedded student and teacher (Qwen3 4 x 128, ~1M parameters) and the embedded task's prompts.

Both trainers run fp32 on the CPU with 2 torch threads, no gradient checkpointing, no evaluation
or checkpoints: on-policy reverse KL (TRL ``beta=1``), one completion per prompt, at most 48 new
tokens, temperature 1, lr 1e-4, ``--steps`` steps. effopd runs once per ``--variants`` entry (a
name and the overrides it adds to its defaults). Runs alternate TRL / each effopd variant,
``--repeats`` rounds per batch size, round i with seed i for every trainer; each run's first two
steps are dropped and its median step time kept. effopd's per-step loss is kept whole, so the
variants' loss curves can be compared with the spread over seeds. A step is timed from its start to its end: sampling, teacher scoring and the update
(TRL: ``on_step_begin`` to ``on_step_end``; effopd: ``time/step``). Completions/s is the batch
size over the step time; generated tokens/s multiplies it by the mean response length (EOS
included) that each trainer logs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = "0123456789+-*=.()/: " + "".join(dict.fromkeys("Compute" + "Answer"))
DEFAULT_VARIANTS = ["default="]


def build_tiny(out: Path, n_prompts: int = 4096) -> None:
    """The character-level tokenizer, the two random-init Qwen3 models (seed 0) and the prompts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    for role, (layers, width, mlp) in {"student": (2, 64, 256), "teacher": (4, 128, 512)}.items():
        torch.manual_seed(0)
        cfg = Qwen3Config(vocab_size=len(vocab), hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=width // 4, max_position_embeddings=256,
                          tie_word_embeddings=False, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"],
                          eos_token_id=vocab["<eos>"])
        Qwen3ForCausalLM(cfg).save_pretrained(out / role)
        tok.save_pretrained(out / role)
    rng = random.Random(0)
    with open(out / "prompts.jsonl", "w") as f:
        for _ in range(n_prompts):
            a, b, c = (rng.randint(10, 99) for _ in range(3))
            f.write(json.dumps({"prompt": f"Compute {a}+{b}*{c}.", "answer": str(a + b * c)}) + "\n")


def inputs(models: str, root: Path) -> dict:
    """Student, teacher and prompt file of ``--models``."""
    if models == "embedded":
        return {"student": "embedded", "teacher": "embedded", "data": "embedded"}
    if not (root / "prompts.jsonl").exists():
        build_tiny(root)
    return {"student": str(root / "student"), "teacher": str(root / "teacher"), "data": str(root / "prompts.jsonl")}


def trl_run(batch: int, steps: int, spec: dict, seed: int) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from effopd.data import load_split
    from effopd.config import DataConfig

    torch.set_num_threads(2)
    times, lengths = [], []

    class Clock(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    def load(role):
        if spec[role] == "embedded":
            from effopd.models import load_model, load_tokenizer

            return load_model("embedded", role), load_tokenizer("embedded")
        return AutoModelForCausalLM.from_pretrained(spec[role]), AutoTokenizer.from_pretrained(spec[role])

    (student, tok), (teacher, _) = load("student"), load("teacher")
    examples = load_split(spec["data"], DataConfig(train=spec["data"]), "train")
    rows = [{"prompt": e.prompt} for e in examples[: batch * steps]]
    with tempfile.TemporaryDirectory() as d:
        args = DistillationConfig(output_dir=d, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                                  max_completion_length=48, temperature=1.0, beta=1.0, bf16=False, use_cpu=True,
                                  gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                                  disable_tqdm=True, seed=seed)
        DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                            train_dataset=datasets.Dataset.from_list(rows), callbacks=[Clock()]).train()
    return {"s_per_step": statistics.median(times[2:]), "mean_length": statistics.mean(lengths[2:]) if lengths else None}


def effopd_run(batch: int, steps: int, spec: dict, overrides: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "effopd.cli", "train", "--run-dir", f"{d}/run", "--no-progress", f"train.steps={steps}",
               "train.eval_every=0", f"train.save_every={steps}", "data.eval_limit=8", f"rollout.batch_size={batch}",
               "rollout.n=1", "rollout.max_new_tokens=48", "optim.lr=1e-4", "train.mixed_precision=no", "train.device=cpu",
               f"model.student={spec['student']}", f"model.teacher={spec['teacher']}", f"data.train={spec['data']}",
               f"data.eval={spec['data']}", f"train.seed={seed}", *overrides]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"effopd train failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        rows = [json.loads(x) for x in Path(f"{d}/run/metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    first = next(r["time/step"] for r in rows if "time/step" in r)  # holds a compile, for lean-compiled
    rows = [r for r in rows if "time/step" in r and r["step"] > 2]
    return {"s_per_step": statistics.median(r["time/step"] for r in rows), "first_step_s": first,
            "max_step_s": max(r["time/step"] for r in rows),
            "mean_length": statistics.mean(r["train/response_length"] for r in rows),
            "loss": losses,
            **{k: statistics.median(r[k] for r in rows) for k in ("time/rollout", "time/score", "time/update") if k in rows[0]}}


def summary(runs: list[dict], batch: int) -> dict:
    s = statistics.median(r["s_per_step"] for r in runs)
    lengths = [r["mean_length"] for r in runs if r["mean_length"] is not None]
    out = {"s_per_step": s, "completions_per_s": batch / s}
    if lengths:
        out["mean_length"] = statistics.mean(lengths)
        out["tokens_per_s"] = batch * out["mean_length"] / s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", choices=["tiny", "embedded"], default="tiny")
    ap.add_argument("--models-dir", type=Path, help="where --models tiny builds (or finds) its models; default: a temp dir")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                    help="effopd runs to time, each NAME=OVERRIDES (space-separated dotted overrides; the first is the "
                         "headline), e.g. 'default=' 'hf=rollout.backend=hf'")
    ap.add_argument("--one", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.one == "trl":  # a TRL run in its own process, like effopd's
        print(json.dumps(trl_run(ns.batch, ns.steps, json.loads(ns.spec), ns.seed)))
        return
    variants = dict(v.split("=", 1) for v in ns.variants)
    with tempfile.TemporaryDirectory() as tmp:
        spec = inputs(ns.models, ns.models_dir or Path(tmp))
        result = {"machine": f"{os.cpu_count()} CPUs, 2 torch threads", "models": ns.models, "steps": ns.steps,
                  "variants": variants, "runs": {}}
        for b in ns.batches:
            rounds = []
            for seed in range(ns.repeats):  # round i: seed i for every trainer, so rounds also show the seed spread
                out = subprocess.run([sys.executable, __file__, "--out", "-", "--one", "trl", "--batch", str(b),
                                      "--steps", str(ns.steps), "--spec", json.dumps(spec), "--seed", str(seed)],
                                     check=True, env=ENV, capture_output=True, text=True)
                pair = {"trl": json.loads(out.stdout.strip().splitlines()[-1])}
                for name, overrides in variants.items():
                    pair[name] = effopd_run(b, ns.steps, spec, overrides.split(), seed)
                rounds.append(pair)
                t = pair["trl"]["s_per_step"]
                print(f"batch {b}: TRL {t:.3f} s/step, " + ", ".join(
                    f"{n} {pair[n]['s_per_step']:.3f} (TRL / it {t / pair[n]['s_per_step']:.2f})" for n in variants), flush=True)
            med = {k: summary([p[k] for p in rounds], b) for k in ["trl", *variants]}
            ratios = {n: [p["trl"]["s_per_step"] / p[n]["s_per_step"] for p in rounds] for n in variants}
            result["runs"][b] = {"rounds": rounds, "medians": med,
                                 "trl_over": {n: med["trl"]["s_per_step"] / med[n]["s_per_step"] for n in variants},
                                 "trl_over_range": {n: [min(r), max(r)] for n, r in ratios.items()},
                                 # effopd's loss at each step: mean and range over the rounds (seeds)
                                 "loss": {n: [[statistics.mean(x), min(x), max(x)] for x in zip(*(p[n]["loss"] for p in rounds))]
                                          for n in variants}}
    ns.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({b: {k: v for k, v in r.items() if k != "rounds"} for b, r in result["runs"].items()}, indent=1))


if __name__ == "__main__":
    main()
