"""One training run under ``accelerate launch``, for tests/test_replicas.py.

    accelerate launch --config_file accelerate_configs/ddp.yaml tests/replica_worker.py MODE RUN_DIR OUT RESUME KEY=VALUE...

After the run every process hashes its own live parameters and reports them with its prompt
sampler state and EffOPD decisions; the main process writes all reports to OUT (JSON), so the
test compares the replicas as they are in memory, not a file one of them wrote.

MODE ``plain`` trains as configured; ``dapo`` replaces the verifier: on process 0 it gives 1
for an even-length response (reward variance on random models: some groups are kept), on the
others always 0 (no group is ever kept, so they would refill until the last round); ``decide:A0,A1`` replaces EffOPD's per-prompt validation score on process r by
``A_r · ‖θ − θ_init‖``, so that each process alone would take a different decision.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object

from effopd import methods
from effopd.cli import leave_process_group
from effopd import train as trainer
from effopd.config import load_config
from effopd.models import load_model


def rank_dependent_reward(text: str, gold: str) -> float:
    return float(torch.distributed.get_rank() == 0 and len(text) % 2 == 0)


def rank_dependent_scores(weights: list[float]):
    init: dict[str, torch.Tensor] = {}

    def prompt_scores(cfg, model, models, examples, seed):
        if not init:
            init.update(dict(load_model(cfg.model.student, "student").named_parameters()))
        dist = sum(float((p.detach() - init[n]).pow(2).sum()) for n, p in model.named_parameters()) ** 0.5
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return torch.full((len(examples),), weights[rank] * dist)

    return prompt_scores


def main() -> None:
    mode, run_dir, out, resume, *overrides = sys.argv[1:]
    if mode == "dapo":
        methods.reward = rank_dependent_reward
    elif mode.startswith("decide:"):
        trainer.prompt_scores = rank_dependent_scores([float(a) for a in mode.split(":")[1].split(",")])
    run = trainer.setup(load_config([], overrides), Path(run_dir), resume=resume == "1", overwrite=False)
    trainer.loop(run, trainer.restore(run), progress=False)
    digest = hashlib.sha256()
    for name, p in run.unwrapped.named_parameters():  # a sharded parameter: its gathered whole
        whole = p.full_tensor() if hasattr(p, "full_tensor") else p
        digest.update(name.encode() + whole.detach().cpu().contiguous().numpy().tobytes())
    report = {
        "rank": run.accelerator.process_index, "params": digest.hexdigest(), "sampler": run.sampler.state_dict(),
        "accepted": [r.accepted_c for r in run.extrapolator.history] if run.extrapolator else [],
    }
    reports = gather_object([report])
    if run.accelerator.is_main_process:
        Path(out).write_text(json.dumps(reports))
    leave_process_group(run.accelerator.state)  # as `effopd train` ends a multi-process run


if __name__ == "__main__":
    main()
