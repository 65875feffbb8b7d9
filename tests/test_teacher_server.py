"""A served teacher (``effopd serve-teacher`` as a real process on 127.0.0.1): training against it
equals training with the same teacher loaded locally, a server that goes away stops the run with
the URL and the last checkpoint, and a server with another vocabulary is refused."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import assert_same_weights, checkpoint_weights, tiny_overrides, train_run
from test_replicas import free_port

from effopd.rollout import generate
from effopd.scoring import score
from effopd.serve import Batcher
from effopd.teachers import RemoteTeacher, TeacherServerError, TeacherUnavailable, vocab_hash

pytestmark = pytest.mark.slow


class Server:
    """``effopd serve-teacher --model MODEL`` on a free loopback port, until stopped."""

    def __init__(self, model: str, port: int | None = None):
        self.model, self.port = model, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "effopd.cli", "serve-teacher", "--model", self.model, "--port", str(self.port),
               "--device", "cpu"]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "2"}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve-teacher exited with {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("serve-teacher did not answer /health within 120 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def test_top_k_gkd_against_the_served_teacher_equals_the_local_teacher(tiny_models, tmp_path):
    """The server sends GKD's top-k side (ids, k + 1 log-masses, sampled-token logprobs) computed
    as the trainer computes it from local logits: the same weights, bitwise."""
    extra = {"loss.method": "gkd", "loss.gkd_top_k": 4, "train.steps": 2}
    local = tmp_path / "local"
    train_run(tiny_overrides(tiny_models, **extra), local)
    with Server(tiny_models["teacher"]) as server:
        served = tmp_path / "served"
        train_run(tiny_overrides(tiny_models, **extra, **{"model.teacher": server.url}), served)
    assert_same_weights(checkpoint_weights(local, 2), checkpoint_weights(served, 2))


def test_training_against_the_served_teacher_equals_the_local_teacher(tiny_models, tmp_path):
    local = tmp_path / "local"
    train_run(tiny_overrides(tiny_models, **{"train.steps": 3}), local)
    with Server(tiny_models["teacher"]) as server:
        health = httpx.get(server.url + "/health").json()
        served = tmp_path / "served"
        train_run(tiny_overrides(tiny_models, **{"train.steps": 3, "model.teacher": server.url}), served)
        assert httpx.get(server.url + "/health").json()["batches"] >= 3  # the teacher was asked every step
    assert health["model"] == tiny_models["teacher"] and health["dtype"] == "float32"
    assert_same_weights(checkpoint_weights(local, 3), checkpoint_weights(served, 3))


def test_a_server_that_goes_away_stops_the_run_and_resume_completes_it(tiny_models, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    train_run(tiny_overrides(tiny_models, **{"train.steps": 4}), reference)
    server = Server(tiny_models["teacher"]).start()
    calls = {"n": 0}
    real = RemoteTeacher.logprobs

    def logprobs(self, rollout, temperature, buckets=1, pack=False):
        calls["n"] += 1
        if calls["n"] == 3:  # the server dies before step 3 is scored
            server.stop()
        return real(self, rollout, temperature, buckets, pack)

    monkeypatch.setattr(RemoteTeacher, "logprobs", logprobs)
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_models, **{"train.steps": 4, "model.teacher": server.url, "model.teacher_retries": 2})
    try:
        with pytest.raises(TeacherUnavailable) as err:
            train_run(overrides, run)
        message = str(err.value)
        assert server.url in message and "after 3 tries" in message
        assert str(run / "checkpoints" / "step-2") in message and "--resume" in message
        monkeypatch.setattr(RemoteTeacher, "logprobs", real)
        with Server(tiny_models["teacher"], port=server.port):
            train_run(overrides, run, resume=True)
    finally:
        server.stop()
    assert_same_weights(checkpoint_weights(reference, 4), checkpoint_weights(run, 4))


def test_a_server_with_another_vocabulary_is_refused_naming_both_hashes(tiny_models, tmp_path):
    from effopd.models import load_model, load_tokenizer

    other = tmp_path / "other-teacher"
    tok = load_tokenizer(tiny_models["teacher"])
    tok.add_tokens(["@"])
    load_model(tiny_models["teacher"], "teacher").save_pretrained(other)
    tok.save_pretrained(other)
    with Server(str(other)) as server:
        theirs = httpx.get(server.url + "/health").json()["vocab_hash"]
        with pytest.raises(TeacherServerError) as err:
            train_run(tiny_overrides(tiny_models, **{"model.teacher": server.url}), tmp_path / "run")
    mine = vocab_hash(load_tokenizer(tiny_models["student"]))
    assert theirs != mine and theirs in str(err.value) and mine in str(err.value) and server.url in str(err.value)


def test_a_served_teacher_cannot_stand_in_for_one_whose_distribution_is_needed(tiny_models, tmp_path):
    from effopd.config import ConfigError

    with pytest.raises(ConfigError, match="loss.method=gkd needs a local teacher for its full distribution.*gkd_top_k"):
        train_run(tiny_overrides(tiny_models, **{"loss.method": "gkd", "model.teacher": "http://127.0.0.1:9"}), tmp_path / "r")
    with pytest.raises(ConfigError, match="loss.method=sft needs a local teacher for its own samples"):
        train_run(tiny_overrides(tiny_models, **{"loss.method": "sft", "model.teacher": "http://127.0.0.1:9"}), tmp_path / "s")


def test_no_server_is_an_error_naming_the_url(tiny_models, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherUnavailable, match=f"{url} did not answer /health after 2 tries.*serve-teacher"):
        train_run(tiny_overrides(tiny_models, **{"model.teacher": url, "model.teacher_retries": 1}), tmp_path / "r")


def test_concurrent_requests_are_scored_in_one_batch_with_the_numbers_of_scoring_each_alone(tiny_student):
    tok, model = tiny_student
    a = generate(model, tok, ["1+2=", "10+20+30="], max_new_tokens=6)
    b = generate(model, tok, ["7-3="], max_new_tokens=9)
    calls = []

    def score_fn(rollout, temperature, kind):
        calls.append(tuple(rollout.response_ids_BT.shape))
        return (score(model, rollout, temperature),)

    async def both():
        batcher = Batcher(score_fn, max_batch_tokens=10_000, pad_id=tok.pad_token_id)
        worker = asyncio.create_task(batcher.run())
        out = await asyncio.gather(batcher.submit(a, 1.0), batcher.submit(b, 1.0))
        worker.cancel()
        return [x for (x,) in out], batcher.batches

    (lp_a, lp_b), batches = asyncio.run(both())
    assert batches == 1 and len(calls) == 1 and calls[0][0] == 3  # one forward pass over both requests' rows
    torch.testing.assert_close(lp_a, score(model, a, 1.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(lp_b, score(model, b, 1.0), rtol=0, atol=1e-5)
    assert lp_a.shape == a.response_ids_BT.shape and lp_b.shape == b.response_ids_BT.shape


# ---- several teachers routed by prompt ---------------------------------------------------------


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory, task_tokenizer):
    from conftest import TINY

    from effopd.bootstrap import make_model

    path = tmp_path_factory.mktemp("teacher-b")
    make_model(TINY, task_tokenizer, 7).save_pretrained(path)
    task_tokenizer.save_pretrained(path)
    return str(path)


def routed_data(tmp_path, n: int = 8) -> Path:
    from effopd.data.task import TaskSpec, generate_split

    rows = [{"prompt": e.prompt, "answer": e.answer, "domain": "a" if i % 2 else "b"}
            for i, e in enumerate(generate_split(n, TaskSpec(1, 2, 2), seed=5))]
    path = tmp_path / "routed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_prompt_is_scored_by_the_teacher_it_names(tiny_models, second_teacher, tmp_path):
    from effopd.config import load_config
    from effopd.data import load_split
    from effopd.methods import student_samples, teacher_logprobs
    from effopd.train import load_models

    data = routed_data(tmp_path)
    cfg = load_config([], tiny_overrides(tiny_models, **{"model.teachers.a": tiny_models["teacher"],
                                                         "model.teachers.b": second_teacher, "data.train": data,
                                                         "data.teacher_field": "domain"}))
    models = load_models(cfg, torch.device("cpu"))
    examples = load_split(str(data), cfg.data, "train", "domain")
    assert [e.teacher for e in examples[:4]] == ["b", "a", "b", "a"]
    batch = student_samples(cfg, models, models.student, lambda k: examples[:k], 4)
    teacher_logprobs(cfg, models, batch)
    lp_BT, mask_BT = batch.signals["teacher_logp_BT"], batch.rollout.response_mask_BT
    layout = {"buckets": cfg.train.score_buckets, "pack": cfg.train.pack}
    for name, other in (("a", "b"), ("b", "a")):  # each teacher's rows bitwise from it, not from the other
        rows = torch.tensor([i for i, e in enumerate(examples[:4]) if e.teacher == name])
        part, real = batch.rollout.select(rows), mask_BT[rows].bool()
        assert torch.equal(lp_BT[rows], score(models.teacher.teachers[name], part, 1.0, **layout))
        assert not torch.allclose(lp_BT[rows][real], score(models.teacher.teachers[other], part, 1.0)[real], atol=1e-3)
    kl = (batch.rollout.logp_BT - lp_BT) * mask_BT
    a_rows = torch.tensor([e.teacher == "a" for e in examples[:4]])
    assert batch.metrics["train/reverse_kl/a:sum"] == pytest.approx(float(kl[a_rows].sum()))
    assert batch.metrics["train/reverse_kl/a:count"] == float(mask_BT[a_rows].sum())


def test_a_run_with_a_local_and_a_served_teacher_logs_each_teachers_kl(tiny_models, second_teacher, tmp_path):
    from conftest import metrics_rows

    data = routed_data(tmp_path, 16)
    with Server(second_teacher) as server:
        run = tmp_path / "run"
        train_run(tiny_overrides(tiny_models, **{"model.teachers.a": tiny_models["teacher"], "model.teachers.b": server.url,
                                                 "data.train": data, "data.teacher_field": "domain"}), run)
    rows = [r for r in metrics_rows(run) if "train/loss" in r]
    assert len(rows) == 2 and all("train/reverse_kl/a" in r and "train/reverse_kl/b" in r for r in rows)
    assert not any(k.endswith((":sum", ":count")) for r in rows for k in r)


def test_a_prompt_naming_an_unknown_teacher_is_refused_before_training(tiny_models, second_teacher, tmp_path):
    from effopd.data.loaders import DatasetError

    data = routed_data(tmp_path)
    with pytest.raises(DatasetError, match=r"data.train: prompts name the teachers \['b'\].*has \['a'\]"):
        train_run(tiny_overrides(tiny_models, **{"model.teachers.a": tiny_models["teacher"], "data.train": data,
                                                 "data.teacher_field": "domain"}), tmp_path / "run")


def test_the_base_is_scored_while_a_served_teacher_answers(tiny_models):
    """G-OPD: the served teacher's request is out while the local base model scores, so a
    teacher that answers only after the base has run does not hold the step up."""
    import threading

    from effopd.config import load_config
    from effopd.methods import student_samples, teacher_and_base_logprobs
    from effopd.train import load_models

    cfg = load_config([], tiny_overrides(tiny_models, **{"loss.method": "gopd"}))
    models = load_models(cfg, torch.device("cpu"))
    local_teacher, base_ran, asked, overlapped = models.teacher, threading.Event(), threading.Event(), []

    def on_base(*_):
        overlapped.append(asked.wait(timeout=5))  # is the teacher request out (in its thread)?
        base_ran.set()

    models.base.model.layers[0].register_forward_hook(on_base)

    class SlowServed:  # answers once the base has run, or fails after 10 s
        def logprobs(self, rollout, temperature, buckets=1, pack=False):
            asked.set()
            if not base_ran.wait(timeout=10):
                raise TimeoutError("the base model never ran while the teacher request was out")
            return score(local_teacher, rollout, temperature, buckets=buckets, pack=pack)

        def topk(self, rollout, k, temperature):
            raise NotImplementedError

    models.teacher = SlowServed()
    batch = student_samples(cfg, models, models.student, lambda k: generate_examples(k), 4)
    teacher_and_base_logprobs(cfg, models, batch)
    assert overlapped and all(overlapped)
    layout = {"buckets": cfg.train.score_buckets, "pack": cfg.train.pack}
    assert torch.equal(batch.signals["teacher_logp_BT"], score(local_teacher, batch.rollout, 1.0, **layout))
    assert torch.equal(batch.signals["base_logp_BT"], score(models.base, batch.rollout, 1.0, **layout))


def generate_examples(k: int):
    from effopd.data.task import TaskSpec, generate_split

    return generate_split(k, TaskSpec(1, 2, 2), seed=9)
