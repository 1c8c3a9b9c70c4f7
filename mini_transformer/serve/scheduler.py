"""Continuous batching: one thread owns the model and decodes every running sequence in one step.

Requests arrive from any thread (:meth:`Scheduler.submit`) and wait in a bounded queue. The
scheduler thread runs a loop: admit waiting sequences into free rows of its KV-cache (each is
prefilled and gets its first token at once), then run one batched decode step for every row
that holds a sequence, sample each row's token with that sequence's own settings and random
generator, and hand the token over through the sequence's ``on_event`` callback. A sequence that
is finished (its ``max_tokens``, or a stop id) or cancelled (its client went away, or a stop
string matched) leaves its row before the next step, and a waiting one takes it.

**Each sequence gets exactly what it would get alone.** Three rules make a sequence's tokens a
function of its own request only, whatever else runs beside it:

* *fixed shapes*: every decode step runs all ``max_batch`` rows (empty rows decode a dummy token)
  over the whole cache length, and every prefill runs one sequence alone. A float32 matrix
  product gives a row the same bits whatever the other rows hold, but not whatever their
  number: CPU kernels block the work differently for 1, 3 or 16 rows, and the last bits of
  the logits would then depend on the load, which can flip a greedy argmax between two
  near-equal tokens. The price is that one lone sequence pays for ``max_batch`` rows: choose
  ``max_batch`` for the expected concurrency;
* *rows of their own*: the KV-cache has one row per running sequence, written at that row's own
  slots (:class:`~mini_transformer.model.KVCache` with a (B, 1) ``input_pos``) and masked to the
  row's own length, so rows at different lengths share a step;
* *a random generator per sequence*, seeded from its request: ``seed`` reproduces a sample.

The context window follows the engine's rule (:class:`~mini_transformer.generation.ContextWindows`):
a row that fills the cache keeps its last ``context_keep`` tokens and is prefilled again, alone.

The scheduler works on token ids; text (detokenizing, stop strings) is the server's job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch

from ..generation import ContextWindows, SamplingParams, check_inference_mode, check_prompts, prefill
from ..generation.sampling import make_generator, sample_next_token, seen_mask
from ..generation.engine import resolve_context_keep
from ..model import KVCache, Transformer

log = logging.getLogger("mini_transformer.serve")

FinishReason = Literal["length", "stop", "cancelled", "error"]


class QueueFull(Exception):
    """Every row is busy and the waiting queue is at its limit: try again later."""


class SchedulerStopped(Exception):
    """The scheduler is shutting down and takes no new sequences."""


@dataclass(frozen=True)
class Token:
    """A new token of a sequence (stop ids are never sent)."""

    id: int


@dataclass(frozen=True)
class Finished:
    """The sequence is over: ``reason`` is length, stop (a stop id), cancelled or error."""

    reason: FinishReason
    message: str = ""


Event = Union[Token, Finished]


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate: its prompt ids and how to sample it."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: Optional[int] = None
    stop_ids: frozenset[int] = frozenset()


class SequenceHandle:
    """What :meth:`Scheduler.submit` returns: cancel the sequence from any thread."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating; the row is freed before the next step (a no-op once finished)."""
        self.cancelled.set()


class _Running:
    """A sequence in a row of the cache: its tokens, window, sampling state and progress."""

    def __init__(self, request: SequenceRequest, handle: SequenceHandle, on_event: Callable[[Event], None],
                 block_size: int, keep: int, vocab_size: int, device: torch.device):
        self.request = request
        self.handle = handle
        self.on_event = on_event
        self.windows = ContextWindows([request.prompt], block_size, keep)
        self.generator = make_generator(request.seed, device)
        self.seen = (seen_mask(self.windows.windows(), vocab_size, device)
                     if request.sampling.repetition_penalty != 1.0 else None)
        self.length = 0  # cache slots of this row holding its window
        self.produced = 0

    @property
    def last(self) -> int:
        return self.windows.tokens[0][-1]

    def emit(self, event: Event) -> None:
        """Hand an event to the sequence's owner; one whose owner is gone is cancelled."""
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - e.g. its event loop has closed: nobody is listening
            log.debug("dropping a sequence whose listener failed", exc_info=True)
            self.handle.cancel()


class Scheduler:
    """Owns ``model`` and a KV-cache of ``max_batch`` rows; decodes every running sequence per step.

    ``max_queue`` sequences may wait for a row; beyond that :meth:`submit` raises
    :class:`QueueFull`. :meth:`start` starts the decode thread, :meth:`stop` ends it (running
    and waiting sequences finish as ``cancelled``).
    """

    def __init__(self, model: Transformer, *, max_batch: int = 8, max_queue: int = 64,
                 context_keep: Optional[int] = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        check_inference_mode(model)
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.block_size = model.config.block_size
        self.keep = resolve_context_keep(context_keep, self.block_size)
        self.cache = KVCache.for_model(model, max_batch)
        self._scratch = KVCache.for_model(model, 1)  # where a sequence is prefilled alone
        self._rows: list[Optional[_Running]] = [None] * max_batch
        self._waiting: deque[_Running] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.generated = 0  # tokens sampled since start, stop ids included (only this thread writes it)
        self._thread = threading.Thread(target=self._loop, name="mini-transformer-scheduler", daemon=True)

    # -- any thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """End the decode thread; every sequence still running or waiting finishes as cancelled."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: SequenceRequest, on_event: Callable[[Event], None]) -> SequenceHandle:
        """Queue a sequence; ``on_event`` gets its :class:`Token` s and one :class:`Finished`.

        ``on_event`` is called on the scheduler thread: it must be quick and must not block (hand
        the event to another thread or event loop). A prompt longer than the context keeps its
        last ``block_size`` tokens. Raises :class:`~mini_transformer.errors.UserError` for a bad
        prompt, :class:`QueueFull` and :class:`SchedulerStopped`.
        """
        prompt = check_prompts(self.model, [request.prompt[-self.block_size:]], request.max_tokens)[0]
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        request = SequenceRequest(prompt, request.max_tokens, request.sampling, request.seed, request.stop_ids)
        handle = SequenceHandle()
        running = _Running(request, handle, on_event, self.block_size, self.keep, self.model.config.vocab_size,
                           self.model.device)
        with self._wake:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            # Waiting sequences beyond the free rows are the queue.
            if len(self._waiting) >= self.max_queue + self.max_batch - self.running:
                raise QueueFull(f"{self.max_batch} sequences are running and {len(self._waiting)} are waiting")
            self._waiting.append(running)
            self._wake.notify()
        return handle

    @property
    def waiting(self) -> int:
        """Sequences waiting for a row."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences in a row of the cache."""
        return sum(row is not None for row in self._rows)

    # -- the scheduler thread ----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self.running:
                        self._wake.wait()
                    if self._stopping:
                        return
                try:
                    self._admit()
                    self._leave_cancelled()
                    if self.running:
                        self._step()
                except Exception as exc:  # noqa: BLE001 - a failed step fails its sequences, not the server
                    log.exception("decode step failed")
                    for i, seq in enumerate(self._rows):
                        if seq is not None:
                            self._finish(i, Finished("error", f"{type(exc).__name__}: {exc}"))
        finally:
            with self._wake:
                waiting, self._waiting = list(self._waiting), deque()
            for seq in waiting:
                seq.emit(Finished("cancelled", "the server is shutting down"))
            for i, seq in enumerate(self._rows):
                if seq is not None:
                    self._finish(i, Finished("cancelled", "the server is shutting down"))

    def _admit(self) -> None:
        """Waiting sequences take the free rows: each is prefilled alone and samples its first token."""
        for row in range(self.max_batch):
            if self._rows[row] is not None:
                continue
            with self._wake:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            if seq.handle.cancelled.is_set():
                seq.emit(Finished("cancelled"))
                continue
            self._rows[row] = seq
            self._sample(row, self._prefill(row, seq))

    def _leave_cancelled(self) -> None:
        for row, seq in enumerate(self._rows):
            if seq is not None and seq.handle.cancelled.is_set():
                self._finish(row, Finished("cancelled"))

    @torch.no_grad()
    def _prefill(self, row: int, seq: _Running) -> torch.Tensor:
        """Write the sequence's window into its row (a full window slides first); returns (1, V) logits."""
        seq.windows.slide()
        window = seq.windows.windows()[0]
        n = len(window)
        device = self.model.device
        logits = prefill(self.model, self._scratch, torch.tensor([window], device=device),
                         torch.arange(n, device=device))
        for mine, scratch in zip(self.cache.layers, self._scratch.layers):
            mine.k[row, :, :n] = scratch.k[0, :, :n]
            mine.v[row, :, :n] = scratch.v[0, :, :n]
        seq.length = n
        return logits

    @torch.no_grad()
    def _step(self) -> None:
        """One token for every running sequence: a batched decode step over all rows (fixed shape)."""
        full = [row for row, seq in enumerate(self._rows) if seq is not None and seq.length >= self.cache.max_len]
        tokens = [0] * self.max_batch
        slots = [0] * self.max_batch  # an empty row decodes token 0 at its slot 0: written, never read
        decoding = []
        for row, seq in enumerate(self._rows):
            if seq is not None and row not in full:
                tokens[row], slots[row] = seq.last, seq.length
                decoding.append(row)
        if decoding:
            device = self.model.device
            out = self.model(torch.tensor(tokens, device=device)[:, None], kv_cache=self.cache,
                             input_pos=torch.tensor(slots, device=device)[:, None])
            logits = out.logits[:, -1]  # (max_batch, V)
            for row in decoding:
                self._rows[row].length += 1
                self._sample(row, logits[row:row + 1])
        for row in full:  # the window slides: prefilled again, alone
            self._sample(row, self._prefill(row, self._rows[row]))

    def _sample(self, row: int, logits: torch.Tensor) -> None:
        """Pick the row's next token from its (1, V) logits and send it; finish the row when done."""
        seq = self._rows[row]
        request = seq.request
        token = int(sample_next_token(logits, request.sampling, seq.seen, seq.generator)[0])
        self.generated += 1
        if seq.seen is not None:
            seq.seen[0, token] = True
        seq.windows.append([token])
        if token in request.stop_ids:
            self._finish(row, Finished("stop"))
            return
        seq.produced += 1
        seq.emit(Token(token))
        if seq.produced >= request.max_tokens:
            self._finish(row, Finished("length"))

    def _finish(self, row: int, event: Finished) -> None:
        seq, self._rows[row] = self._rows[row], None
        seq.emit(event)
