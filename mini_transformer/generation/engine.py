"""The decoding engine: prefill the prompt once, then decode one token per step through the KV-cache.

Works on token ids only. The base API is an iterator (:func:`generate_batch_stream`, and
:func:`generate_stream` for one prompt); :func:`generate` and :func:`generate_batch` collect it.

Two steps, as in gpt-fast, so that ``torch.compile`` can wrap :func:`decode_one_token` alone:

* :func:`prefill`: the whole (left-padded) prompt batch in one forward, writing cache slots
  ``0..T-1``;
* :func:`decode_one_token`: one token per row at one slot. Its shapes never change: the token is
  (B, 1), the slot (1,), the cache is preallocated at ``block_size`` slots and the key mask is
  (B, block_size).

**Batches.** Prompts of different lengths are left-padded to the longest one. Each row gets its
own rotary positions (``position_ids``: the first real token is position 0) and a key mask that
hides its pad slots, so a row sees exactly what it would see alone: greedy batch output equals
generating each prompt alone, token for token.

**The context window.** The model has rotary tables and was trained for at most ``block_size``
positions, so each row sees a window of its most recent tokens:

* a prompt longer than ``block_size`` is cropped from the left to its last ``block_size`` tokens
  (with a :class:`PromptTruncatedWarning`);
* generation may run past ``block_size``. When a row's window would exceed ``block_size``, it
  slides: the row keeps only its last ``context_keep`` tokens (default ``block_size // 2``) and
  the batch is prefilled again from slot 0. Why re-prefill rather than shift the cache: the
  cached keys carry the rotary angle of their old positions, and re-rotating them would give
  positions the model never saw at the window start; a fresh prefill is exact. Why keep only
  half: each slide costs one prefill of ``context_keep`` tokens and buys ``block_size -
  context_keep`` cheap decode steps, so half a window keeps the slide cost to about one token's
  worth of compute per step while every token still sees at least ``block_size // 2`` tokens.
* ``use_cache=False`` runs the full window through the model at every step with the same
  window rule, so cached and uncached decoding produce the same tokens even past
  ``block_size`` (it exists for tests and the benchmark).

**Compiling the decode step** (``compile=True``): :func:`decode_one_token` goes through
``torch.compile`` with static shapes: the slot is a tensor, not a Python int, so tokens never
recompile; a new batch size, padding layout or model shape does, once. It fuses the norms,
rotary embedding and SwiGLU of a token into a few kernels, costs several seconds of
compilation on first use and pays back on long generations (BENCHMARKS.md). On the CPU the
one-row products become reductions Inductor fuses with the rest
(:func:`~mini_transformer.decode_layout.one_row_products`) and attention takes the explicit
path, so a small model's whole step is one C++ kernel. On CUDA the step is also captured as a
CUDA graph (``DECODE_COMPILE_MODES``), since launches, not arithmetic, are what a small model's
token costs there.

**State.** The engine never changes the model it is given: each generation owns a
:class:`~mini_transformer.model.KVCache` (taken from a :class:`KVCachePool` when the caller
passes one) from the first ``next()`` until the stream ends or is closed, and passes it to
``forward``. Several generations can therefore run on one model at the same time. The model's
mode is left alone too: a model in training mode whose dropout is active is refused (call
``model.eval()`` first), since dropout would perturb every token.

The pieces that :mod:`.speculative` shares with the plain loop are public here:
:func:`check_prompts`, :func:`resolve_context_keep`, :class:`ContextWindows` (each row's
sliding window) and :class:`CachedDecoder` (a model, its cache and the valid slots in it).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from ..decode_layout import one_row_products
from ..errors import UserError, first_line
from ..model import KVCache, Transformer
from .sampling import SamplingParams, make_generator, sample_next_token, seen_mask


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the model's context and lost its first tokens."""


# -- the two steps ----------------------------------------------------------------------------

@torch.no_grad()
def prefill(model: Transformer, kv_cache: KVCache, idx: torch.Tensor, input_pos: torch.Tensor,
            position_ids: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run ``idx`` (B, T) into cache slots ``input_pos`` (T,); return last-position logits (B, V)."""
    out = model(idx, kv_cache=kv_cache, input_pos=input_pos, position_ids=position_ids,
                attn_mask=attn_mask, logits_to_keep=1)
    return out.logits[:, -1]


def _next_logits(model: Transformer, kv_cache: KVCache, token: torch.Tensor, input_pos: torch.Tensor,
                 position_ids: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    out = model(token, kv_cache=kv_cache, input_pos=input_pos, position_ids=position_ids, attn_mask=attn_mask)
    return out.logits[:, -1]


@torch.no_grad()
def decode_one_token(model: Transformer, kv_cache: KVCache, token: torch.Tensor, input_pos: torch.Tensor,
                     position_ids: Optional[torch.Tensor] = None,
                     attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row, ``token`` (B, 1) at slot ``input_pos`` (1,); returns logits (B, V).

    Static shapes: ``position_ids`` (B, 1) and ``attn_mask`` (B, cache_len) never change size.
    """
    return _next_logits(model, kv_cache, token, input_pos, position_ids, attn_mask)


# Inductor's mode per device type. On a GPU a decode step of a small model is a few hundred
# short kernels, so launch overhead dominates: "reduce-overhead" replays them as one CUDA graph.
# The graph reads the KV-cache at the addresses it was recorded with; the cache is an
# nn.Module argument, so its buffers are static inputs, and a KVCachePool keeps the same cache
# between generations so that the graph is not recorded again for each one.
DECODE_COMPILE_MODES: dict[str, str] = {"cuda": "reduce-overhead"}
# On the CPU: Inductor's own options. ``size_asserts`` checks every input's sizes and strides in
# Python on each call (40 checks a step for the tiny preset, ~50 us of its ~450); Dynamo's guards
# already check the inputs' shapes before the graph runs.
CPU_DECODE_OPTIONS: dict[str, Any] = {"size_asserts": False}


def _next_logits_cpu(model: Transformer, kv_cache: KVCache, token: torch.Tensor, input_pos: torch.Tensor,
                     position_ids: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    # One-row products as reductions Inductor fuses with the rest of the step (decode_layout).
    with one_row_products():
        return _next_logits(model, kv_cache, token, input_pos, position_ids, attn_mask)


@functools.cache
def _compiled_next_logits_cpu() -> Callable[..., torch.Tensor]:
    # As _compiled_next_logits; a function of its own, so that its graphs are cached apart.
    return torch.compile(_next_logits_cpu, dynamic=False, options=CPU_DECODE_OPTIONS)


@functools.cache
def _compiled_next_logits(mode: str = "default") -> Callable[..., torch.Tensor]:
    # Compiled once per process and mode, on our own undecorated function: Dynamo keys its cache
    # on the code object, and a decorated function would share the cache (and its limit of 8
    # entries) with every other function behind torch.no_grad's wrapper. The model and cache
    # are arguments, not captured: their tensors become graph inputs, so models of the same
    # shapes share one graph and no compiled function keeps a model alive. Not fullgraph: past
    # the entry limit (many batch sizes or model shapes in one process) Dynamo then runs the
    # step eagerly with a warning instead of failing.
    return torch.compile(_next_logits, dynamic=False, mode=mode)


def compiled_decode_one_token(model: Transformer, kv_cache: KVCache, token: torch.Tensor,
                              input_pos: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                              attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`decode_one_token` through ``torch.compile`` with static shapes.

    One graph per model shape, dtype, weight layout, batch size and padding layout (padded batches carry
    per-row positions and a key mask); the slot is a tensor, so tokens never recompile. A
    compiler failure (no C++ compiler, say) is reported as a :class:`UserError`. On CUDA the
    returned logits live in the CUDA graph's memory, which the next call overwrites: use them
    (sample) before the next step, or clone them.
    """
    if token.device.type == "cpu":
        step = _compiled_next_logits_cpu()
    else:
        step = _compiled_next_logits(DECODE_COMPILE_MODES.get(token.device.type, "default"))
    try:
        with torch.no_grad():
            return step(model, kv_cache, token, input_pos, position_ids, attn_mask)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        raise UserError(f"compiling the decode step failed ({type(error.inner_exception).__name__}: "
                        f"{first_line(error.inner_exception, 200)}); generate without "
                        "compiling the decode step") from None


# -- KV-caches ------------------------------------------------------------------------------

class KVCachePool:
    """KV-caches kept between generations; each running generation borrows one of its own.

    Why keep them: a decode step replayed as a CUDA graph reads the cache at the addresses it
    was recorded with, so a fresh cache per generation would record the graph again every time
    (and the recorded graphs pile up); elsewhere it saves an allocation. A cache is lent to one
    generation at a time, never shared, so generations on one model may run concurrently (the
    pool is thread-safe). At most ``max_spare`` idle caches are kept; :meth:`clear` frees them.
    """

    def __init__(self, max_spare: int = 4):
        self.max_spare = max_spare
        self._spare: list[KVCache] = []
        self._lock = threading.Lock()

    def take(self, model: Transformer, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        """A zeroed cache for ``model`` (a kept one when one fits, else a new one)."""
        max_len = max_len or model.config.block_size
        with self._lock:
            for i, cache in enumerate(self._spare):
                if cache.fits(model, batch_size, max_len):
                    return self._spare.pop(i).zero_()
        return KVCache.for_model(model, batch_size, max_len)

    def give(self, cache: KVCache) -> None:
        """Return a borrowed cache; the oldest idle one is dropped past ``max_spare``."""
        with self._lock:
            self._spare.append(cache)
            del self._spare[:-self.max_spare or len(self._spare)]

    def clear(self) -> None:
        """Free every idle cache."""
        with self._lock:
            self._spare.clear()

    def __len__(self) -> int:
        return len(self._spare)


# -- rows, their windows and the cache they are decoded through -------------------------------

class ContextWindows:
    """Each row's tokens (prompt + generated) and where its visible window starts.

    A row sees at most ``block_size`` tokens; :meth:`slide` moves a full row's window to its last
    ``context_keep`` tokens (see the module docstring for why).
    """

    def __init__(self, prompts: list[list[int]], block_size: int, context_keep: int):
        self.tokens = [list(p) for p in prompts]
        # A long prompt keeps as much context as fits: its last block_size tokens.
        self.starts = [max(0, len(p) - block_size) for p in prompts]
        self.block_size = block_size
        self.context_keep = context_keep

    def append(self, tokens: Sequence[int]) -> None:
        """One new token per row."""
        for row, token in zip(self.tokens, tokens):
            row.append(token)

    def slide(self) -> bool:
        """Rows whose window outgrew block_size keep only their last ``context_keep`` tokens;
        returns whether any row slid."""
        slid = False
        for i, row in enumerate(self.tokens):
            if len(row) - self.starts[i] > self.block_size:
                self.starts[i] = len(row) - self.context_keep
                slid = True
        return slid

    def windows(self) -> list[list[int]]:
        return [row[start:] for row, start in zip(self.tokens, self.starts)]


@dataclass
class _Padded:
    idx: torch.Tensor  # (B, M) left-padded token ids
    pads: torch.Tensor  # (B,) pad slots per row
    position_ids: Optional[torch.Tensor]  # (B, M) rotary positions; None when nothing is padded


def left_pad(rows: list[list[int]], pad_id: int = 0, device: torch.device | str = "cpu") -> _Padded:
    """Left-pad token rows to one width, with per-row rotary positions starting at 0."""
    width = max(len(r) for r in rows)
    pads = torch.tensor([width - len(r) for r in rows], device=device)
    idx = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    position_ids = None
    if any(len(r) != width for r in rows):
        position_ids = (torch.arange(width, device=device)[None] - pads[:, None]).clamp(min=0)
    return _Padded(idx, pads, position_ids)


def key_mask(pads: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: True for the key slots a row may see (everything after its padding)."""
    return torch.arange(length, device=pads.device)[None] >= pads[:, None]


class CachedDecoder:
    """A model, the KV-cache it writes to, and how many slots hold valid tokens.

    :meth:`prefill` writes a (left-padded) batch from slot 0; :meth:`extend` appends tokens at
    the next slots, one-token steps going through :func:`decode_one_token` (compiled when
    asked); :meth:`rewind` forgets the slots past a length (speculative decoding's rollback:
    entries past it are masked and later overwritten, never read).
    """

    def __init__(self, model: Transformer, kv_cache: KVCache, compile: bool = False):
        self.model = model
        self.kv_cache = kv_cache
        self.decode_step = compiled_decode_one_token if compile else decode_one_token
        self.device = kv_cache.device
        self.length = 0  # slots 0..length-1 are written (pads included)
        self.pads: Optional[torch.Tensor] = None  # (B,) pad slots per row; None when none is padded
        self.mask: Optional[torch.Tensor] = None  # (B, capacity) key mask; None when none is padded

    @property
    def capacity(self) -> int:
        return self.kv_cache.max_len

    def prefill(self, windows: list[list[int]], pad_id: int = 0) -> torch.Tensor:
        """Write each row's window from slot 0 (left-padded); return the last logits (B, V)."""
        padded = left_pad(windows, pad_id, self.device)
        width = padded.idx.shape[1]
        padded_rows = padded.position_ids is not None
        self.pads = padded.pads if padded_rows else None
        self.mask = key_mask(padded.pads, self.capacity) if padded_rows else None
        logits = prefill(self.model, self.kv_cache, padded.idx, torch.arange(width, device=self.device),
                         padded.position_ids, self.mask)
        self.length = width
        return logits

    def extend(self, ids: torch.Tensor, keep_logits: int = 1) -> torch.Tensor:
        """Write ``ids`` (B, T) at the next T slots; return the last ``keep_logits`` logits (B, keep, V)."""
        T = ids.shape[1]
        if self.length + T > self.capacity:
            raise ValueError(f"{T} tokens after {self.length} overflow the cache of {self.capacity} slots")
        input_pos = torch.arange(self.length, self.length + T, device=self.device)  # (T,)
        position_ids = None if self.pads is None else input_pos[None] - self.pads[:, None]  # (B, T)
        if T == 1 and keep_logits == 1:
            logits = self.decode_step(self.model, self.kv_cache, ids, input_pos, position_ids, self.mask)[:, None]
        else:
            with torch.no_grad():
                logits = self.model(ids, kv_cache=self.kv_cache, input_pos=input_pos, position_ids=position_ids,
                                    attn_mask=self.mask, logits_to_keep=keep_logits).logits
        self.length += T
        return logits

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` slots as valid."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length}: the cache holds {self.length} slots")
        self.length = length


# -- steppers: how the next logits are computed ---------------------------------------------

class _CachedStepper:
    """Prefill once (and again after a slide), then one decode step per token."""

    def __init__(self, model: Transformer, batch_size: int, pad_id: int, compile: bool,
                 cache_pool: Optional[KVCachePool]):
        self.cache_pool = cache_pool
        cache = cache_pool.take(model, batch_size) if cache_pool else KVCache.for_model(model, batch_size)
        self.decoder = CachedDecoder(model, cache, compile)
        self.pad_id = pad_id

    def next_logits(self, rows: ContextWindows) -> torch.Tensor:
        decoder = self.decoder
        if decoder.length == 0 or decoder.length >= decoder.capacity:
            rows.slide()
            return decoder.prefill(rows.windows(), self.pad_id)
        last = torch.tensor([row[-1] for row in rows.tokens], device=decoder.device)[:, None]  # (B, 1)
        return decoder.extend(last)[:, -1]

    def close(self) -> None:
        if self.cache_pool is not None:
            self.cache_pool.give(self.decoder.kv_cache)


class _UncachedStepper:
    """The whole window through the model at every step: the reference for the cached path."""

    def __init__(self, model: Transformer, pad_id: int):
        self.model = model
        self.pad_id = pad_id

    @torch.no_grad()
    def next_logits(self, rows: ContextWindows) -> torch.Tensor:
        rows.slide()
        padded = left_pad(rows.windows(), self.pad_id, self.model.device)
        mask = key_mask(padded.pads, padded.idx.shape[1]) if padded.position_ids is not None else None
        out = self.model(padded.idx, position_ids=padded.position_ids, attn_mask=mask, logits_to_keep=1)
        return out.logits[:, -1]

    def close(self) -> None:
        pass


# -- profiling ------------------------------------------------------------------------------

SAMPLING_REGION = "sampling"  # what a profiler's trace calls the sampler's part of a step


def profiled_region(name: str) -> contextlib.AbstractContextManager:
    """A region named ``name`` in a running profiler's trace (``bench --profile decode`` reads
    :data:`SAMPLING_REGION`); nothing when no profiler runs. Why the check: ``record_function``
    costs ~20 us a call even then, 1% of a small model's token on a CPU; the check ~0.1 us."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


# -- public API -------------------------------------------------------------------------------

def generate_batch_stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    stop_ids: Iterable[int] = (),
    use_cache: bool = True,
    compile: bool = False,
    context_keep: Optional[int] = None,
    pad_id: int = 0,
    cache_pool: Optional[KVCachePool] = None,
) -> Iterator[list[Optional[int]]]:
    """Generate for several prompts at once; yields, per step, one new token id per row.

    A row that has produced a token of ``stop_ids`` (which is not yielded) or finished earlier
    gets ``None``. Iteration ends after ``max_new_tokens`` steps or when every row has stopped.
    ``generator`` (or ``seed``) makes sampling reproducible. See the module docstring for the
    context window, ``context_keep`` and ``use_cache``, and for ``compile`` (the compiled decode
    step; needs ``use_cache``). ``cache_pool``: where the KV-cache is borrowed from and returned
    to (keep one pool per model for compiled decoding on CUDA); without it each generation
    allocates its own.
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    rows_in = check_prompts(model, prompts, max_new_tokens)
    keep = resolve_context_keep(context_keep, model.config.block_size)
    check_inference_mode(model)
    # The generator lives on the model's device: CUDA sampling refuses a CPU generator.
    generator = generator or make_generator(seed, model.device)
    if compile and not use_cache:
        raise UserError("compiling the decode step needs the KV-cache; drop use_cache=False or compile")
    return _generate(model, rows_in, max_new_tokens, params, generator, frozenset(stop_ids), use_cache,
                     compile, keep, pad_id, cache_pool)


def _generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
              generator: torch.Generator, stop_ids: frozenset[int], use_cache: bool, compile: bool,
              keep: int, pad_id: int, cache_pool: Optional[KVCachePool]) -> Iterator[list[Optional[int]]]:
    batch = len(prompts)
    rows = ContextWindows(prompts, model.config.block_size, keep)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = seen_mask(rows.windows(), model.config.vocab_size, model.device)
    finished = [False] * batch
    stepper = (_CachedStepper(model, batch, pad_id, compile, cache_pool) if use_cache
               else _UncachedStepper(model, pad_id))
    try:
        for _ in range(max_new_tokens):
            logits = stepper.next_logits(rows)  # (B, V)
            with profiled_region(SAMPLING_REGION):
                tokens = sample_next_token(logits, params, seen, generator)  # (B,)
            if seen is not None:
                seen[torch.arange(batch), tokens] = True
            ids = tokens.tolist()
            rows.append(ids)  # finished rows keep growing too, so the batch stays aligned
            out: list[Optional[int]] = []
            for i, token in enumerate(ids):
                finished[i] = finished[i] or token in stop_ids
                out.append(None if finished[i] else token)
            if any(t is not None for t in out):
                yield out
            if all(finished):
                return
    finally:
        stepper.close()


def generate_batch(model: Transformer, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """Collect :func:`generate_batch_stream`: the new tokens of each row (stop ids excluded)."""
    results: list[list[int]] = [[] for _ in prompts]
    for step in generate_batch_stream(model, prompts, **kwargs):
        for row, token in zip(results, step):
            if token is not None:
                row.append(token)
    return results


def generate_stream(model: Transformer, prompt_ids: Sequence[int], **kwargs) -> Iterator[int]:
    """Generate for one prompt, yielding each new token id as soon as it is sampled.

    Takes the keyword arguments of :func:`generate_batch_stream` (``max_new_tokens``,
    ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``seed`` or
    ``generator``, ``stop_ids``, ``use_cache``, ``compile``, ``context_keep``, ``cache_pool``).
    """
    # Not a generator itself: the prompt is checked (and a crop warned about) at call time.
    return _first_row(generate_batch_stream(model, [prompt_ids], **kwargs))


def _first_row(steps: Iterator[list[Optional[int]]]) -> Iterator[int]:
    try:
        for step in steps:
            if step[0] is None:
                return
            yield step[0]
    finally:
        steps.close()  # return the KV-cache now, not when the garbage collector gets to it


def generate(model: Transformer, prompt_ids: Sequence[int], **kwargs) -> list[int]:
    """The new token ids for one prompt (:func:`generate_stream`, collected)."""
    return list(generate_stream(model, prompt_ids, **kwargs))


# -- checks -----------------------------------------------------------------------------------

def check_prompts(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Prompts as lists of ints, checked against the model's vocabulary; warns
    (:class:`PromptTruncatedWarning`) about one longer than the context."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}; 0 returns the prompts unchanged")
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    rows = [p.tolist() if isinstance(p, torch.Tensor) else [int(t) for t in p] for p in prompts]
    if not rows:
        raise UserError("no prompts given; pass at least one prompt")
    vocab, block = model.config.vocab_size, model.config.block_size
    for i, row in enumerate(rows):
        if not row:
            raise UserError(f"prompt {i} has no tokens; start it with at least one token (a newline or eos)")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise UserError(f"prompt {i} has token ids {bad[:5]} outside the model's vocabulary of {vocab}; "
                            "the tokenizer does not match the checkpoint: encode with the tokenizer saved with it")
        if len(row) > block:
            warnings.warn(f"prompt {i} has {len(row)} tokens, more than the context of {block}; "
                          f"only its last {block} tokens are used", PromptTruncatedWarning, stacklevel=4)
    return rows


def resolve_context_keep(context_keep: Optional[int], block_size: int) -> int:
    """How many tokens a full window keeps when it slides (default ``block_size // 2``)."""
    keep = block_size // 2 if context_keep is None else context_keep
    if not 1 <= keep < block_size:
        raise UserError(f"generation.context_keep must be in [1, {block_size}) (below block_size), got {keep}; "
                        "leave it unset for block_size // 2")
    return keep


def check_inference_mode(model: nn.Module) -> None:
    """Refuse a model whose dropout is active: it would perturb every generated token.

    Generation leaves the model's mode alone (a running training step, or a second generation,
    may depend on it), so the caller switches: ``model.eval()``.
    """
    active = [m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0]
    if active:
        raise UserError(f"the model is in training mode with dropout {max(active)}, which would perturb "
                        "every generated token; call model.eval() before generating")
