"""On-policy distillation with TRL's DistillationTrainer, accelerated by EffOPD, on effopd's embedded
task and models (CPU, no downloads, about a minute).

    pip install "effopd[trl]"
    python examples/trl_distillation_effopd.py --out runs/trl-effopd
    python examples/trl_distillation_effopd.py --out runs/trl-plain --no-effopd   # the same run without it

Then look at what the run did to the weights, and at its curves and EffOPD searches:

    effopd analyze --base embedded --checkpoints runs/trl-effopd --out runs/trl-effopd/analysis
    effopd report runs/trl-effopd --out runs/trl-effopd/report.html

With your own models, replace the three ``load_*`` calls by ``AutoModelForCausalLM`` /
``AutoTokenizer`` and the embedded splits by your prompt set (rows with ``prompt`` and
``answer``); keep the validation prompts out of the training set.
"""

from __future__ import annotations

import argparse

import datasets
from trl import DistillationConfig, DistillationTrainer

from effopd.data import embedded_splits
from effopd.evaluate import evaluate_model
from effopd.integrations.trl import EffOPDCallback
from effopd.models import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the Trainer's output_dir (checkpoints, trainer_state.json)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    ap.add_argument("--batch", type=int, default=32, help="prompts per step, one sample each (default 32)")
    ap.add_argument("--eval-limit", type=int, default=300, help="test problems for the accuracy before and after")
    ap.add_argument("--val-prompts", type=int, default=128, help="validation prompts EffOPD scores candidates on")
    ap.add_argument("--no-effopd", action="store_true", help="train without the EffOPD callback")
    ns = ap.parse_args()

    splits = embedded_splits()  # train / val / test prompts with verifiable answers
    rows = lambda examples: [{"prompt": e.prompt, "answer": e.answer} for e in examples]  # noqa: E731
    tokenizer = load_tokenizer("embedded")
    student, teacher = load_model("embedded", "student"), load_model("embedded", "teacher")

    callbacks = []
    if not ns.no_effopd:
        # After steps 1, 2, 4, 8, ...: try θ_anchor + c·(θ_t − θ_anchor) for c = 3, 5, 7, ..., score each on
        # held-out prompts (the verifiable reward of one sampled response each, same seed for every
        # candidate), keep the best. The optimizer and the learning-rate schedule are left as they are.
        callbacks.append(EffOPDCallback(rows(splits["val"]), tokenizer, score="reward", val_prompts=ns.val_prompts))

    args = DistillationConfig(
        output_dir=ns.out, max_steps=ns.steps, per_device_train_batch_size=ns.batch, learning_rate=ns.lr,
        max_completion_length=48, temperature=1.0, bf16=False, use_cpu=True, logging_steps=1,
        save_steps=max(1, ns.steps // 4), report_to="none", seed=0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                  train_dataset=datasets.Dataset.from_list(rows(splits["train"])), callbacks=callbacks)
    test = splits["test"][: ns.eval_limit]
    before = evaluate_model(student, tokenizer, test, max_new_tokens=48, greedy=True)["accuracy"]
    trainer.train()
    after = evaluate_model(student, tokenizer, test, max_new_tokens=48, greedy=True)["accuracy"]
    searches = [h for h in trainer.state.log_history if "extrapolate/s0" in h]
    print(f"greedy accuracy on {len(test)} test problems: {before:.1%} before, {after:.1%} after {ns.steps} steps")
    for h in searches:
        print(f"  EffOPD after step {h['step']}: c = {h['extrapolate/accepted_c']:g} "
              f"(validation reward {h['extrapolate/s0']:.3f} -> {h['extrapolate/best']:.3f})")
    print(f"checkpoints in {ns.out}; analyse them with: effopd analyze --base embedded --checkpoints {ns.out} "
          f"--out {ns.out}/analysis")


if __name__ == "__main__":
    main()
