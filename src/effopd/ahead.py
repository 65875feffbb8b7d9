"""Sampling one batch ahead (``rollout.off_policy_steps=1``): while the update of step t runs,
a worker thread samples the batch of step t + 1 with a copy of the student's weights as they
were before that update.

The batch of step t + 1 is then one optimizer update behind the weights it trains: one-step
off-policy, as in asynchronous RL trainers. The importance weight ``min(exp(lp_old - lp_roll),
loss.is_cap)`` (``loss.rollout_is``, on by default in this mode) corrects for it: ``lp_roll`` is
the sampler's logprob under the copy, ``lp_old`` the trainer's under the current weights.

The copy (``SampleAhead.copy``) is a second student in the master weights' dtype: the update
may change the student's weights in place at any time without disturbing the sampler, and its
forward hooks, training flag and autograd state are its own. The weights are copied into it
before each start. On a CUDA device the worker runs on its own stream (ordered after the
copy); on the CPU both threads share the cores, each with half of torch's intra-op threads
while both run.

What the worker touches: the copy, the prompt order (``draw``) and whatever the method's
``assemble`` reads; it samples from a generator of its own, seeded from the global one when it
starts, so the run is reproducible whatever the two threads' timing. The main thread does not
touch the copy or the prompt order while the worker runs; everything that changes what the
worker reads (evaluation's and EffOPD's sampling, checkpoints) runs after :meth:`SampleAhead.wait`.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Callable

import torch

from effopd.rollout import sampling_generator


class SampleAhead:
    """Samples the next batch on a worker thread from a copy of ``student``'s weights."""

    def __init__(self, student: torch.nn.Module, autocast: Callable[[], object]):
        self.student, self.autocast = student, autocast
        self.copy = copy.deepcopy(student).eval().requires_grad_(False)
        self.device = next(student.parameters()).device
        self._thread: threading.Thread | None = None
        self._result = None
        self._error: BaseException | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._threads: int | None = None
        self._rng: torch.Tensor | None = None

    @property
    def pending(self) -> bool:
        """A batch was started and not yet taken."""
        return self._thread is not None

    @torch.no_grad()
    def start(self, assemble: Callable[[torch.nn.Module], object]) -> None:
        """Copy the student's current weights, then run ``assemble(copy)`` on the worker thread."""
        if self.pending:
            raise RuntimeError("SampleAhead.start: the previous batch was not taken; call take() first")
        for mine, theirs in zip(self.copy.parameters(), self.student.parameters()):
            mine.copy_(theirs)
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the copy happens first
        elif torch.get_num_threads() > 1:  # two threads at work: each gets half of the cores
            self._threads = torch.get_num_threads()
            torch.set_num_threads(max(1, self._threads // 2))
        share = torch.get_num_threads()
        self._rng = torch.get_rng_state()
        # the worker samples from a generator of its own, seeded from the global one here (on this
        # thread, at a fixed point of the run): the main thread's use of the global generator
        # while it works cannot change the worker's samples, nor the worker's the main thread's
        generator = torch.Generator(self.device).manual_seed(int(torch.randint(0, 2**62, (1,))))
        self._result, self._error = None, None

        def work():
            try:
                # set on this thread too: OpenMP's thread count is per thread, and a BLAS left to pick
                # its own count under load would sum in a different order from run to run
                torch.set_num_threads(share)
                stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
                with stream, self.autocast(), torch.no_grad(), sampling_generator(generator):
                    self._result = assemble(self.copy)
            except BaseException as err:  # raised again on the main thread, in wait()
                self._error = err

        self._thread = threading.Thread(target=work, name="effopd-sample-ahead", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the worker is done (the batch stays for :meth:`take`); re-raises its error."""
        if self._thread is None:
            return
        self._thread.join()
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        if self._error is not None:
            err, self._error, self._thread = self._error, None, None
            raise err

    def take(self):
        """The batch sampled ahead (waits for it)."""
        self.wait()
        out, self._result, self._thread = self._result, None, None
        return out

    def cancel(self) -> None:
        """Wait for the worker, discard its batch and put the global generator back where it was
        before :meth:`start` drew the worker's seed, as if it had not started."""
        if self.pending:
            try:
                self.take()
            finally:
                torch.set_rng_state(self._rng)

    @contextlib.contextmanager
    def during(self, assemble: Callable[[torch.nn.Module], object] | None):
        """Sample ``assemble(copy)`` on the worker while the block runs (None: nothing to sample),
        and wait for it at the end. If the block raises, the batch is cancelled and the block's
        error is the one raised."""
        if assemble is not None:
            self.start(assemble)
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.cancel()
            raise
        self.wait()

