"""Greedy sampling from an FSDP2-sharded student, for tests/test_replicas.py.

    accelerate launch --config_file accelerate_configs/ddp.yaml tests/sharded_generate_worker.py MODEL OUT BACKEND

Process 0's responses end at their first token (every token id counts as its end of sequence),
process 1's run to the length limit (no token ends them), so process 0 runs out of rows long
before process 1. Every forward of a sharded model gathers weights from all processes: the run
finishes only if process 0 goes on running forwards until process 1 has ended. The main
process writes both processes' texts to OUT (JSON).
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from effopd.models import load_model, load_tokenizer
from effopd.rollout import generate
from effopd.sharding import shard_model

PROMPTS = ["12+3=", "45+67-8=", "9="]


def main() -> None:
    path, out, backend = sys.argv[1:]
    state = Accelerator(cpu=True)
    tok = load_tokenizer(path)
    model = shard_model(load_model(path, "student"), "cpu", state.num_processes)
    eos = list(range(len(tok))) if state.process_index == 0 else [len(tok) + 7]  # everything / nothing ends a row
    ro = generate(model, tok, PROMPTS, max_new_tokens=10, greedy=True, eos_token_ids=eos, backend=backend)
    reports = gather_object([{"rank": state.process_index, "texts": ro.texts, "steps": ro.response_ids_BT.shape[1]}])
    if state.is_main_process:
        with open(out, "w") as f:
            json.dump(reports, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
