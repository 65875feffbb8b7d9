"""``effopd serve-teacher``: a frozen teacher behind HTTP, for trainers that should not hold it.

Endpoints (JSON):

- ``GET /health``: ``{"status": "ok", "model", "vocab_hash", "vocab_size", "dtype", "device"}``;
  a trainer compares ``vocab_hash`` with its student's tokenizer before the first step.
- ``POST /logprobs``: a padded batch of token ids (``prompt_ids``/``prompt_mask`` left-padded,
  ``response_ids``/``response_mask`` right-padded, ``temperature``) → ``{"logprobs": base64 of
  the (B, T) float32 logprobs of the response tokens, little-endian}``.
- ``POST /topk``: the same and ``k`` → top-k GKD's teacher side: ``ids`` (B, T, k) int32, ``logprobs``
  (B, T, k + 1) float32 (the k tokens and the rest), ``token_logprobs`` (B, T) float32, base64.

Concurrent requests are queued and scored in batches of up to ``max_batch_tokens`` tokens (rows ×
padded length; same endpoint, temperature and k): several requests are merged into one padded batch, a request
larger than the budget is scored in row chunks. A request scored alone is the batch it sent, so its
numbers are bitwise those of the same model scoring it in the trainer. The model runs in a
worker thread; ``/health`` answers while it scores.

The HTTP layer is Starlette on uvicorn (``pip install 'effopd[serve]'``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import torch

from effopd.teachers import encode, request_rollout, vocab_hash


@dataclass
class _Job:
    rollout: object
    temperature: float
    kind: tuple
    future: asyncio.Future
    tokens: int = field(init=False)

    def __post_init__(self):
        self.tokens = self.rollout.response_ids_BT.shape[0] * (self.rollout.prompt_ids_BP.shape[1]
                                                                + self.rollout.response_ids_BT.shape[1])


class Batcher:
    """Merges queued scoring jobs of one kind into batches of at most ``max_batch_tokens``
    tokens. ``score_fn(rollout, temperature, kind)`` returns a tuple of tensors whose first two
    dimensions are the rollout's rows and response positions."""

    def __init__(self, score_fn, max_batch_tokens: int, pad_id: int):
        self.score_fn, self.max_batch_tokens, self.pad_id = score_fn, max_batch_tokens, pad_id
        self.pending: deque[_Job] = deque()
        self.wake = asyncio.Event()
        self.batches = 0

    async def submit(self, rollout, temperature: float, kind: tuple = ("logprobs", 1, False)) -> tuple[torch.Tensor, ...]:
        job = _Job(rollout, temperature, kind, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self.wake.set()
        return await job.future

    def _take(self) -> list[_Job]:
        group = [self.pending.popleft()]
        tokens, first = group[0].tokens, group[0]
        while self.pending and (self.pending[0].temperature, self.pending[0].kind) == (first.temperature, first.kind) \
                and tokens + self.pending[0].tokens <= self.max_batch_tokens:
            job = self.pending.popleft()
            group.append(job)
            tokens += job.tokens
        return group

    def _score(self, group: list[_Job]) -> list[tuple[torch.Tensor, ...]]:
        from effopd.rollout import concat_rollouts

        first = group[0]
        ro = first.rollout if len(group) == 1 else concat_rollouts([j.rollout for j in group], self.pad_id)
        B, L = ro.response_ids_BT.shape[0], ro.prompt_ids_BP.shape[1] + ro.response_ids_BT.shape[1]
        rows = max(1, self.max_batch_tokens // max(L, 1))
        parts = [self.score_fn(ro.select(slice(i, i + rows)), first.temperature, first.kind) for i in range(0, B, rows)]
        whole = [(p[0] if len(parts) == 1 else torch.cat(p)).cpu() for p in zip(*parts)]
        out, start = [], 0
        for j in group:
            b, t = j.rollout.response_ids_BT.shape
            out.append(tuple(x[start : start + b, :t] for x in whole))
            start += b
        return out

    async def run(self) -> None:
        import anyio

        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                group = self._take()
                try:
                    results = await anyio.to_thread.run_sync(self._score, group)
                except Exception as err:  # a failure while scoring answers each request of the batch
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(err)
                    continue
                self.batches += 1
                for j, result in zip(group, results):
                    if not j.future.done():
                        j.future.set_result(result)


def make_app(model, tokenizer, *, name: str, max_batch_tokens: int = 65536, chunk_positions: int | None = None):
    """The Starlette application serving ``model`` (frozen, on its device)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from effopd.teachers import local_top_k, teacher_logprobs

    def score_fn(rollout, temperature, kind):
        if kind[0] == "topk":
            return local_top_k(model, rollout, kind[1], temperature)
        return (teacher_logprobs(model, rollout, temperature, chunk_positions=chunk_positions, buckets=kind[1],
                                 pack=kind[2]),)

    batcher = Batcher(score_fn, max_batch_tokens, tokenizer.pad_token_id)
    info = {"status": "ok", "model": name, "vocab_hash": vocab_hash(tokenizer), "vocab_size": len(tokenizer.get_vocab()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device), "max_batch_tokens": max_batch_tokens}

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({**info, "batches": batcher.batches, "queued": len(batcher.pending)})

    async def scored(request: Request, kind) -> tuple | JSONResponse:
        try:
            body = await request.json()
            rollout, temperature = request_rollout(body)
            if kind == "topk":
                k = body.get("k")
                if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= info["vocab_size"]:
                    raise ValueError(f"k={k!r} must be an integer in [1, {info['vocab_size']}]")
                kind = ("topk", k)
            else:
                buckets = body.get("buckets", 1)
                if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
                    raise ValueError(f"buckets={buckets!r} must be a positive integer")
                pack = body.get("pack", False)
                if not isinstance(pack, bool):
                    raise ValueError(f"pack={pack!r} must be true or false")
                kind = ("logprobs", buckets, pack)
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        try:
            return await batcher.submit(rollout, temperature, kind)
        except Exception as err:  # noqa: BLE001 - the client gets the reason
            return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=500)

    async def logprobs(request: Request) -> JSONResponse:
        out = await scored(request, "logprobs")
        return out if isinstance(out, JSONResponse) else JSONResponse({"logprobs": encode(out[0])})

    async def topk(request: Request) -> JSONResponse:
        out = await scored(request, "topk")
        if isinstance(out, JSONResponse):
            return out
        ids, lp, tok = out
        return JSONResponse({"ids": encode(ids, torch.int32), "logprobs": encode(lp), "token_logprobs": encode(tok)})

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    return Starlette(routes=[Route("/health", health), Route("/logprobs", logprobs, methods=["POST"]),
                             Route("/topk", topk, methods=["POST"])], lifespan=lifespan)


def serve(model_name: str, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", dtype: str = "float32",
          max_batch_tokens: int = 65536) -> None:
    """Load the teacher and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        from effopd.errors import UserError

        raise UserError("effopd serve-teacher needs the server libraries: pip install 'effopd[serve]'") from None
    from effopd.models import freeze, load_model, load_tokenizer, pick_device, pick_dtype

    dev = pick_device(device)
    model = freeze(load_model(model_name, "teacher", pick_dtype(dtype, dev), dev))
    app = make_app(model, load_tokenizer(model_name, "teacher"), name=model_name, max_batch_tokens=max_batch_tokens)
    print(f"serving teacher {model_name} on http://{host}:{port} ({dev}, {dtype}, batches of <= {max_batch_tokens} tokens)",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
