"""The teacher behind one interface: a local model, or a model served by ``effopd serve-teacher``.

Everything that asks the teacher for the logprobs of sampled tokens (OPD and G-OPD advantages,
EffOPD's ``teacher_logprob`` score) calls :func:`teacher_logprobs`, which takes either:

- a local ``torch.nn.Module`` (scored by :func:`effopd.scoring.score`, chunked LM head), or
- a :class:`RemoteTeacher`, which sends the token ids of the batch (never text: both sides score
  exactly the same tokens) to a teacher server over HTTP and gets the per-token logprobs back as
  raw float32 bytes. A lone request is scored by the server as the same padded batch, with the
  same function, so a served teacher gives bitwise the local teacher's numbers on one machine.

The client checks at start-up that the server's tokenizer has the student's vocabulary (a hash
of the token → id map, both hashes named when they differ), retries connection failures and
timeouts with exponential backoff, and then raises :class:`TeacherUnavailable` naming the URL.

Top-k GKD asks for :meth:`Teacher.topk` instead (the teacher's k most likely tokens and their
log-masses at each position, :func:`local_top_k` for a local model). GKD over the full vocabulary
and SFT on teacher-written responses need a local teacher.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Protocol

import torch

from effopd.errors import UserError

#: Teacher specs that name a server rather than a model.
URL_PREFIXES = ("http://", "https://")


class TeacherUnavailable(UserError, ConnectionError):
    """The teacher server did not answer after the configured retries."""


class TeacherServerError(UserError, RuntimeError):
    """The teacher server answered with an error (a bad request, a failure while scoring)."""


class Teacher(Protocol):
    """What a trainer needs from a teacher it does not hold: per-token logprobs of given tokens."""

    def logprobs(self, rollout, temperature: float, buckets: int = 1, pack: bool = False) -> torch.Tensor:
        """``(B, T)`` float32 logprobs of ``rollout.response_ids_BT`` under softmax(logits /
        temperature), 0 on padding; ``buckets``: score the rows in that many length buckets,
        ``pack``: score them packed instead (:func:`effopd.scoring.score`)."""

    def topk(self, rollout, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k GKD's teacher side at every response position: the k most likely token ids
        ``(B, T, k)``, the log-probabilities of those and of all other tokens together
        ``(B, T, k + 1)`` (:func:`effopd.losses.teacher_top_k`), and the sampled tokens'
        logprobs ``(B, T)``."""


def local_top_k(model, rollout, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`Teacher.topk` of a local model (what a teacher server computes)."""
    from effopd.losses import teacher_top_k
    from effopd.scoring import gather_logprobs, response_logits

    with torch.no_grad():
        logits_BTV = response_logits(model, rollout, temperature)
        valid_BT = rollout.response_mask_BT.to(logits_BTV.device).bool()
        ids_BTK, lp_BTK1 = teacher_top_k(logits_BTV, valid_BT, k)
        return ids_BTK, lp_BTK1, gather_logprobs(logits_BTV, rollout)


def is_url(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(URL_PREFIXES)


def vocab_hash(tokenizer) -> str:
    """SHA-256 (16 hex digits) of the tokenizer's token → id map: equal hashes, same ids."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


class Routed:
    """Several teachers by name (``model.teachers``); each row of a batch is scored by the teacher
    its prompt names (``route``: one index into ``names`` per row)."""

    def __init__(self, teachers: dict):
        if not teachers:
            raise ValueError("Routed needs at least one teacher")
        self.names, self.teachers = list(teachers), dict(teachers)

    def index(self, names: list[str | None], where: str = "") -> torch.Tensor:
        """The route of rows whose prompts name ``names``; an unknown name is an error."""
        bad = sorted({n for n in names if n not in self.teachers}, key=str)
        if bad:
            raise KeyError(f"{where}prompts name the teachers {bad[:3]}, which model.teachers does not define "
                           f"(it has {self.names}); fix the rows' teacher column or add model.teachers.NAME=PATH")
        return torch.tensor([self.names.index(n) for n in names], dtype=torch.long)


def start_logprobs(teacher, rollout, temperature: float, *, chunk_size: int | None = None,
                   chunk_positions: int | None = None, route: torch.Tensor | None = None,
                   buckets: int = 1, pack: bool = False) -> Callable[[], torch.Tensor]:
    """:func:`teacher_logprobs`, started: a served teacher's request is sent from a worker thread
    at once, and the returned function waits for it; a local model is scored when the function
    is called, on the caller's thread. Work done between the two (the base model's logprobs in
    G-OPD, other teachers' rows) overlaps the request. With :class:`Routed` teachers every
    served teacher's rows go out at once. ``buckets``: :func:`effopd.scoring.score`'s length
    buckets, ``pack``: packed rows instead (a served teacher scores the same way)."""
    if isinstance(teacher, Routed):
        if route is None or len(route) != rollout.response_ids_BT.shape[0]:
            raise ValueError("several teachers need the route: one teacher index per row")
        parts = []
        for k, name in enumerate(teacher.names):
            rows = (route == k).nonzero().flatten()
            if len(rows):
                parts.append((rows, start_logprobs(teacher.teachers[name], rollout.select(rows), temperature,
                                                   chunk_size=chunk_size, chunk_positions=chunk_positions, buckets=buckets,
                                                   pack=pack)))

        def routed() -> torch.Tensor:
            out = None
            for rows, result in parts:
                lp = result()
                out = torch.zeros(rollout.response_ids_BT.shape, dtype=lp.dtype, device=lp.device) if out is None else out
                out[rows.to(out.device)] = lp.to(out.device)
            return out

        return routed
    if not isinstance(teacher, torch.nn.Module) and hasattr(teacher, "logprobs"):  # a Teacher: served
        return _pool().submit(teacher.logprobs, rollout, temperature, buckets, pack).result
    from effopd.scoring import CHUNK_POSITIONS, score

    return lambda: score(teacher, rollout, temperature=temperature, chunk_size=chunk_size,
                         chunk_positions=chunk_positions or CHUNK_POSITIONS, buckets=buckets, pack=pack)


def teacher_logprobs(teacher, rollout, temperature: float, *, chunk_size: int | None = None,
                     chunk_positions: int | None = None, route: torch.Tensor | None = None,
                     buckets: int = 1, pack: bool = False) -> torch.Tensor:
    """The teacher's logprob of each response token: a local model's through
    :func:`effopd.scoring.score` (``chunk_size`` rows per pass, ``chunk_positions`` per LM-head
    chunk), a served one's through its client; with :class:`Routed` teachers, each row's own
    teacher's (``route``), each teacher scoring its rows as one batch."""
    return start_logprobs(teacher, rollout, temperature, chunk_size=chunk_size, chunk_positions=chunk_positions,
                          route=route, buckets=buckets, pack=pack)()


_POOL = None


def _pool():
    """The threads that wait for served teachers (requests are I/O: the GIL is free meanwhile)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="effopd-teacher")
    return _POOL


# ---- wire format -------------------------------------------------------------------------------


def encode(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> str:
    """``t`` as base64 of its little-endian ``dtype`` bytes (float32 logprobs, int32 token ids)."""
    return base64.b64encode(t.detach().to("cpu", dtype).contiguous().numpy().tobytes()).decode()


def decode(text: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor :func:`encode` wrote (int32 comes back as int64, torch's index dtype)."""
    flat = torch.frombuffer(bytearray(base64.b64decode(text)), dtype=dtype)
    return (flat.long() if dtype == torch.int32 else flat).view(*shape)


def rollout_request(rollout, temperature: float, buckets: int = 1, pack: bool = False) -> dict:
    """The JSON body of a ``/logprobs`` request: the padded batch as lists of token ids and masks,
    the temperature and how to lay it out: the length buckets, or packed rows."""
    return {
        "prompt_ids": rollout.prompt_ids_BP.tolist(), "prompt_mask": rollout.prompt_mask_BP.tolist(),
        "response_ids": rollout.response_ids_BT.tolist(), "response_mask": rollout.response_mask_BT.tolist(),
        "temperature": float(temperature), "buckets": int(buckets), "pack": bool(pack),
    }


def request_rollout(body: dict):
    """The :class:`~effopd.rollout.Rollout` a ``/logprobs`` request describes (checked)."""
    from effopd.rollout import Rollout

    try:
        p, pm = torch.tensor(body["prompt_ids"], dtype=torch.long), torch.tensor(body["prompt_mask"], dtype=torch.long)
        r, rm = torch.tensor(body["response_ids"], dtype=torch.long), torch.tensor(body["response_mask"], dtype=torch.long)
        temperature = float(body.get("temperature", 1.0))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"a /logprobs request needs prompt_ids, prompt_mask, response_ids, response_mask (equal-length "
                         f"rows of integers) and a temperature: {e}") from None
    if p.ndim != 2 or r.ndim != 2 or p.shape != pm.shape or r.shape != rm.shape or p.shape[0] != r.shape[0] or not len(p):
        raise ValueError(f"shapes do not fit: prompt_ids {tuple(p.shape)}, prompt_mask {tuple(pm.shape)}, response_ids "
                         f"{tuple(r.shape)}, response_mask {tuple(rm.shape)}; send B rows of each, B >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    return Rollout(p, pm, r, rm, torch.zeros(r.shape, dtype=torch.float32), [""] * len(r)), temperature


# ---- the client --------------------------------------------------------------------------------


class RemoteTeacher:
    """A teacher served by ``effopd serve-teacher`` at ``url``.

    Every request retries connection failures and timeouts ``retries`` times, waiting
    ``backoff`` s, then twice that, ...; after the last it raises :class:`TeacherUnavailable`."""

    def __init__(self, url: str, *, timeout: float = 600.0, retries: int = 5, backoff: float = 1.0):
        try:
            import httpx
        except ImportError:
            raise UserError(f"model.teacher={url} is a served teacher, which needs the HTTP client: "
                            "pip install 'effopd[serve]'") from None
        self.url, self.retries, self.backoff = url.rstrip("/"), retries, backoff
        self._http = httpx
        self._client = httpx.Client(timeout=timeout)
        self.info: dict = {}

    def _call(self, method: str, path: str, **kw) -> dict:
        httpx, wait = self._http, self.backoff
        for attempt in range(self.retries + 1):
            try:
                resp = self._client.request(method, self.url + path, **kw)
            except httpx.TransportError as err:  # refused, reset, timed out
                if attempt == self.retries:
                    raise TeacherUnavailable(
                        f"the teacher server {self.url} did not answer {path} after {self.retries + 1} tries "
                        f"({type(err).__name__}: {err}); start it (effopd serve-teacher --model TEACHER --port PORT) "
                        "or fix model.teacher") from err
                time.sleep(wait)
                wait *= 2
                continue
            if resp.status_code != 200:
                try:
                    message = resp.json().get("error", resp.text)
                except ValueError:
                    message = resp.text
                raise TeacherServerError(f"the teacher server {self.url} answered {path} with HTTP {resp.status_code}: "
                                         f"{message[:500]}")
            return resp.json()
        raise AssertionError("unreachable")

    def health(self) -> dict:
        self.info = self._call("GET", "/health")
        return self.info

    def check_vocab(self, tokenizer, student_name: str) -> None:
        """Refuse a server whose tokenizer maps tokens to other ids than the student's."""
        info = self.health()
        mine = vocab_hash(tokenizer)
        if info.get("vocab_hash") != mine:
            raise TeacherServerError(
                f"the teacher served at {self.url} ({info.get('model')}, vocabulary hash {info.get('vocab_hash')}, "
                f"{info.get('vocab_size')} tokens) does not share the student's vocabulary ({student_name}: hash {mine}, "
                f"{len(tokenizer.get_vocab())} tokens). On-policy distillation needs one shared vocabulary: serve a "
                "teacher from the student's model family")

    def logprobs(self, rollout, temperature: float, buckets: int = 1, pack: bool = False) -> torch.Tensor:
        out = self._call("POST", "/logprobs", json=rollout_request(rollout, temperature, buckets, pack))
        lp = decode(out["logprobs"], tuple(rollout.response_ids_BT.shape))
        return lp.to(rollout.response_ids_BT.device)

    def topk(self, rollout, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self._call("POST", "/topk", json={**rollout_request(rollout, temperature), "k": int(k)})
        B, T = rollout.response_ids_BT.shape
        device = rollout.response_ids_BT.device
        return (decode(out["ids"], (B, T, k), torch.int32).to(device), decode(out["logprobs"], (B, T, k + 1)).to(device),
                decode(out["token_logprobs"], (B, T)).to(device))

    def close(self) -> None:
        self._client.close()
