"""Data parallelism: two gloo processes on the CPU (``accelerate launch`` with the repository's
accelerate_configs/ddp.yaml) train exactly one model. Replicas are compared inside the processes (tests/replica_worker.py hashes each one's
live parameters), not by re-reading the checkpoint the main process wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from effopd import cli
from effopd.models import ModelLoadError, load_model
from effopd.replicas import mean_metrics, shard

from conftest import assert_same_weights, checkpoint_weights, metrics_rows, tiny_overrides, train_run

WORKER = Path(__file__).with_name("replica_worker.py")
DDP_CONFIG = Path(__file__).parents[1] / "accelerate_configs" / "ddp.yaml"  # the file the README documents


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, run_dir: Path, overrides: list[str], processes: int = 2, resume: bool = False) -> subprocess.Popen:
    out = run_dir.parent / f"{run_dir.name}-replicas.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG), "--num_processes",
           str(processes), "--main_process_port", str(free_port()),
           str(WORKER), mode, str(run_dir), str(out), "1" if resume else "0", *overrides, "train.device=cpu"]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def replicas(mode: str, run_dir: Path, overrides: list[str], processes: int = 2, resume: bool = False) -> list[dict]:
    """Run to the end; every process's report (live-parameter hash, sampler state, decisions)."""
    proc = launch(mode, run_dir, overrides, processes, resume)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-15000:]
    return json.loads((run_dir.parent / f"{run_dir.name}-replicas.json").read_text())


def assert_identical(reports: list[dict]) -> None:
    assert len(reports) == 2
    assert reports[0]["params"] == reports[1]["params"], "the replicas' live parameters differ"
    assert reports[0]["sampler"] == reports[1]["sampler"]
    assert reports[0]["accepted"] == reports[1]["accepted"]


def relative_distance(a: dict, b: dict, w0: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float((a[k] - w0[k]).pow(2).sum()) for k in a)
    return (num / den) ** 0.5


# ---- helpers, without processes ---------------------------------------------------------------


def test_shards_are_contiguous_and_cover_the_items_once():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard([1], 1, 2) == []


def test_padded_shards_have_one_length_and_say_what_is_real():
    """Sharded models need every process to run the same forward passes: shares are padded."""
    from effopd.replicas import padded_shard

    def on(rank, items):
        return padded_shard(SimpleNamespace(num_processes=2, process_index=rank), items)

    assert on(0, list("abcde")) == (list("abc"), 3)
    assert on(1, list("abcde")) == (list("dee"), 2)
    assert on(1, ["a"]) == (["a"], 0)  # nothing of its own: it repeats an item and keeps no result


def test_metric_means_and_sums_over_processes():
    class Two:  # the other process logged loss 3.0 and kept 5 groups (the same keys: max = own value)
        num_processes, process_index, device = 2, 0, "cpu"
        other_keys = False

        def reduce(self, t, reduction):
            if reduction == "max":
                return t + 1 if self.other_keys else t
            return t + torch.tensor([5.0, 3.0], dtype=t.dtype)

    logged = {"train/loss": 1.0, "train/kept_groups": 1, "note": "x"}
    out = mean_metrics(Two(), logged, summed=("train/kept_groups",))
    assert out == {"train/loss": 2.0, "train/kept_groups": 6.0, "note": "x"}
    two = Two()
    two.other_keys = True
    with pytest.raises(RuntimeError, match="other processes log others"):
        mean_metrics(two, logged)
    one = mean_metrics(SimpleNamespace(num_processes=1), {"train/loss": 1.0})
    assert one == {"train/loss": 1.0}


# ---- two processes ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_world_size_does_not_change_continued_sft(tiny_models, tmp_path, parallel):
    """No sampling: 3 steps of sft-gt at the same global batch give the same weights with one
    process and with two (replicated or sharded). With each process dividing by its own token
    count (the mean of per-process means) this distance was 0.33; with the global count it is
    float rounding. Micro-batches of 2 rows: only the last one synchronises the gradient."""
    o = tiny_overrides(tiny_models, **{"loss.method": "sft-gt", "rollout.batch_size": 8, "train.seed": 5, "train.steps": 3,
                                      "train.micro_batch_size": 2, "train.eval_every": 0, "train.save_every": 3})
    assert_identical(replicas("plain", tmp_path / "two", [*o, f"train.parallel={parallel}"]))
    train_run(o, tmp_path / "one")
    w0 = {n: p.detach() for n, p in load_model(tiny_models["student"], "student").named_parameters()}
    assert relative_distance(checkpoint_weights(tmp_path / "one", 3), checkpoint_weights(tmp_path / "two", 3), w0) < 1e-5


@pytest.mark.slow
def test_two_process_opd_with_effopd_accepting_keeps_replicas_identical(tiny_models, tmp_path):
    """OPD + EffOPD scored by the teacher's logprob (which moves on random models, unlike the
    reward): some candidate is accepted, and both replicas end bitwise equal, with the same
    decisions, the same prompt order and evaluation written once for the whole eval set."""
    # padded batches: a sharded model runs padded, so the replicated run it is compared with bitwise does too
    o = tiny_overrides(tiny_models, **{"train.steps": 4, "extrapolate.enabled": True, "extrapolate.score": "teacher_logprob",
                                      "extrapolate.val_prompts": 6, "train.eval_every": 2, "train.save_every": 2,
                                      "train.pack": False})
    reports = replicas("plain", tmp_path / "eff", o)
    assert_identical(reports)
    assert any(c > 1 for c in reports[0]["accepted"]), reports[0]["accepted"]
    evaluated = (tmp_path / "eff" / "eval" / "step-4.jsonl").read_text().splitlines()
    assert len(evaluated) == 8  # data.eval_limit, split 4 + 4 and gathered

    # the same run with the student and the teacher sharded (FSDP2) trains the same weights; on
    # gloo (a sum of two values, in either collective) even bitwise
    sharded = replicas("plain", tmp_path / "fsdp", [*o, "train.parallel=fsdp2", "train.shard_teacher=true"])
    assert sharded[0]["params"] == reports[0]["params"] and sharded[0]["accepted"] == reports[0]["accepted"]
    ck = tmp_path / "fsdp" / "checkpoints"
    assert (ck / "step-2" / "sharded").is_dir() and not (ck / "step-2" / "model.safetensors").exists()
    assert_same_weights(checkpoint_weights(tmp_path / "eff", 4), checkpoint_weights(tmp_path / "fsdp", 4))  # the export

    # a sharded checkpoint without weights: loading it says how to consolidate; export does, offline
    with pytest.raises(ModelLoadError, match="effopd export"):
        load_model(str(ck / "step-2"), "student")
    assert cli.main(["export", str(ck / "step-2"), "--out", str(tmp_path / "step-2-hf")]) == 0
    assert cli.main(["export", str(ck / "step-4"), "--out", str(tmp_path / "step-4-hf")]) == 0
    assert_same_weights(load_file(tmp_path / "step-4-hf" / "model.safetensors"), checkpoint_weights(tmp_path / "fsdp", 4))
    load_model(str(tmp_path / "step-2-hf"), "student")  # loadable
    assert cli.main(["export", str(tmp_path / "eff" / "checkpoints" / "step-2"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_process_dapo_refills_agree(tiny_models, tmp_path, parallel):
    """DAPO with dynamic sampling where process 0 keeps groups and process 1 never does: process
    1 keeps asking for refills, so both run every round (each advances the shared prompt order),
    process 1 trains on weightless rows, and the replicas end identical. Two mini-batches per
    batch: both processes make the same number of updates whatever rows they kept."""
    o = tiny_overrides(tiny_models, **{"loss.method": "dapo", "rollout.n": 2, "rollout.batch_size": 4, "train.steps": 3,
                                      "loss.max_sample_rounds": 3, "loss.overlong_penalty": 0.0, "train.eval_every": 0, "loss.mini_batches": 2,
                                      "train.save_every": 3, "train.parallel": parallel})
    reports = replicas("dapo", tmp_path / "dapo", o)
    assert_identical(reports)
    rows = [r for r in metrics_rows(tmp_path / "dapo") if "train/sample_rounds" in r]
    assert [r["train/sample_rounds"] for r in rows] == [3, 3, 3]
    # each round of both processes draws the 4 prompts of one global batch from the shared order
    assert reports[0]["sampler"] == {"epoch": 0, "cursor": 4 * 9}
    # summed over processes; at most the 2 groups of one process: only process 0 ever keeps
    assert all(0 < r["train/kept_groups"] <= 2 for r in rows)


@pytest.mark.slow
def test_two_processes_sampling_ahead_stay_identical(tiny_models, tmp_path):
    """rollout.off_policy_steps=1 under DDP: each process samples its share ahead on its own
    thread while the gradients are all-reduced; the replicas end bitwise equal, with the same
    prompt order, and steps 2 and 4 trained on batches sampled ahead."""
    o = tiny_overrides(tiny_models, **{"train.steps": 4, "train.eval_every": 0, "train.save_every": 2,
                                      "rollout.off_policy_steps": 1})
    assert_identical(replicas("plain", tmp_path / "ahead", o))
    rows = [r for r in metrics_rows(tmp_path / "ahead") if "train/loss" in r]
    assert [r["train/sampled_ahead"] for r in rows] == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gkd", "gopd"])
def test_sharded_teacher_and_base_train_as_replicated(tiny_models, tmp_path, method):
    """GKD (full logits of both models) and G-OPD (teacher and base logprobs) with the student,
    teacher and base sharded end bitwise where the replicated run ends."""
    o = tiny_overrides(tiny_models, **{"loss.method": method, "train.steps": 2, "train.eval_every": 0, "train.save_every": 2,
                                      "train.pack": False})  # a sharded model runs padded: compare with padded
    replicated = replicas("plain", tmp_path / "ddp", o)
    sharded = replicas("plain", tmp_path / "fsdp", [*o, "train.parallel=fsdp2", "train.shard_teacher=true"])
    assert sharded[0]["params"] == replicated[0]["params"]


@pytest.mark.slow
@pytest.mark.parametrize("weights, accepted", [("3,-1", 11.0), ("1,-3", 1.0)])
def test_effopd_decision_is_taken_once_for_all_processes(tiny_models, tmp_path, weights, accepted):
    """Process 0's validation prompts favour every extrapolation (score +A0·‖θ − θ_init‖) and
    process 1's disfavour it (A1 < 0): alone, process 0 would accept the largest candidate and
    process 1 none. Both apply the decision of the gathered scores: their mean's sign."""
    o = tiny_overrides(tiny_models, **{"train.steps": 2, "extrapolate.enabled": True, "extrapolate.val_prompts": 2,
                                      "extrapolate.trigger_steps": "[1]", "extrapolate.margin": 0.0,
                                      "train.eval_every": 0, "train.save_every": 2})
    reports = replicas(f"decide:{weights}", tmp_path / "decide", o)
    assert_identical(reports)
    assert reports[0]["accepted"] == [accepted]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_killed_two_process_run_resumes_exactly(tiny_models, tmp_path, parallel):
    """A 2-process OPD + EffOPD run killed (SIGKILL to the whole launcher group) after its
    step-2 checkpoint resumes with --resume and ends with the weights of the uninterrupted run
    (sharded: from the shards of model, optimizer and anchor)."""
    o = tiny_overrides(tiny_models, **{"train.steps": 4, "train.eval_every": 0, "train.save_every": 1,
                                      "extrapolate.enabled": True, "extrapolate.score": "teacher_logprob",
                                      "extrapolate.val_prompts": 3, "train.parallel": parallel})
    whole = replicas("plain", tmp_path / "whole", o)
    assert_identical(whole)

    proc = launch("plain", tmp_path / "killed", o)
    marker = tmp_path / "killed" / "checkpoints" / "step-2"  # renamed into place when complete
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = replicas("plain", tmp_path / "killed", o, resume=True)
    assert_identical(resumed)
    assert resumed[0]["params"] == whole[0]["params"] and resumed[0]["accepted"] == whole[0]["accepted"]


def test_an_accelerate_fsdp_launch_is_refused_not_turned_into_ddp(tiny_models, tmp_path, monkeypatch):
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP; on CPU processes
    accelerate then builds plain DDP. effopd refuses it, naming what to launch instead, before
    the run directory exists."""
    from effopd.config import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="train.parallel=fsdp2"):
        train_run(tiny_overrides(tiny_models), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend", ["lean", "hf"])
def test_a_sharded_student_samples_in_step_when_one_process_ends_first(tmp_path, tiny_models, backend):
    """Process 0's rows all end at the first token, process 1's run to the limit: the sampler
    keeps process 0 running the collective forwards until process 1 is done (else the run
    hangs), and process 1's responses are those of the unsharded model."""
    from effopd.models import load_tokenizer
    from effopd.rollout import generate

    out = tmp_path / "texts.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(WORKER.with_name("sharded_generate_worker.py")),
           tiny_models["student"], str(out), backend]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-15000:]
    first, second = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    tok = load_tokenizer(tiny_models["student"])
    alone = generate(load_model(tiny_models["student"], "student"), tok, ["12+3=", "45+67-8=", "9="], max_new_tokens=10,
                     greedy=True, eos_token_ids=[len(tok) + 7], backend=backend)
    assert first["texts"] == ["", "", ""] and second["steps"] == 10
    assert second["texts"] == alone.texts
