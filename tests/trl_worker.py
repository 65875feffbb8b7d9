"""One process of a data-parallel TRL DistillationTrainer run with EffOPDCallback (launched by
tests/test_trl_callback.py through accelerate): writes what this process ended with."""

from __future__ import annotations

import hashlib
import json
import sys

import datasets
import torch
from trl import DistillationConfig, DistillationTrainer

from effopd.data import embedded_splits
from effopd.integrations.trl import EffOPDCallback
from effopd.models import load_model, load_tokenizer


class Recording(EffOPDCallback):
    """Records how many validation prompts this process scored per call."""

    scored: list[int] = []

    def _per_prompt(self, seed):
        inner = super()._per_prompt(seed)

        def per_prompt(examples):
            self.scored.append(len(examples))
            return inner(examples)

        return per_prompt


def main(out: str) -> None:
    torch.set_num_threads(1)
    splits = embedded_splits()
    rows = lambda ex: [{"prompt": e.prompt, "answer": e.answer} for e in ex]  # noqa: E731
    tok = load_tokenizer("embedded")
    cb = Recording(rows(splits["val"][:8]), val_prompts=8, max_new_tokens=16, max_tries=2, schedule="paper", accept="best",
                   margin=0.0)
    args = DistillationConfig(output_dir=out + "-run", max_steps=2, per_device_train_batch_size=4, learning_rate=1e-4,
                              max_completion_length=16, bf16=False, use_cpu=True, seed=0, logging_steps=1,
                              save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = DistillationTrainer(model=load_model("embedded", "student"), teacher_model=load_model("embedded", "teacher"),
                                  args=args, processing_class=tok, callbacks=[cb],
                                  train_dataset=datasets.Dataset.from_list(rows(splits["train"][:64])))
    trainer.train()
    digest = hashlib.sha256()
    for name, p in sorted(trainer.model.named_parameters()):
        digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
    rank = trainer.accelerator.process_index
    searches = [{k: v for k, v in h.items() if k not in ("extrapolate/seconds", "extrapolate/total_seconds")}
                for h in trainer.state.log_history if "extrapolate/s0" in h]
    report = {"rank": rank, "world": trainer.accelerator.num_processes, "params": digest.hexdigest(),
              "searches": searches, "scored": cb.scored}
    with open(f"{out}-rank{rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
