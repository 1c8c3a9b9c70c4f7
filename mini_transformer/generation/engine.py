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
compilation on first use and pays back on long generations (BENCHMARKS.md). On CUDA the step is
also captured as a CUDA graph (``DECODE_COMPILE_MODES``), since launches, not arithmetic, are
what a small model's token costs there.

The KV-cache lives in the model (``setup_kv_cache``), from the first ``next()`` until the stream
ends or is closed, so run one generation per model at a time. The model is put in eval mode for
the duration and restored afterwards.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserError
from ..model import Transformer
from .sampling import SamplingParams, make_generator, sample_next_token, seen_mask


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the model's context and lost its first tokens."""


# -- the two steps ----------------------------------------------------------------------------

@torch.no_grad()
def prefill(model: Transformer, idx: torch.Tensor, input_pos: torch.Tensor,
            position_ids: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run ``idx`` (B, T) into cache slots ``input_pos`` (T,); return last-position logits (B, V)."""
    out = model(idx, input_pos=input_pos, position_ids=position_ids, attn_mask=attn_mask, logits_to_keep=1)
    return out.logits[:, -1]


def _next_logits(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor,
                 position_ids: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    out = model(token, input_pos=input_pos, position_ids=position_ids, attn_mask=attn_mask)
    return out.logits[:, -1]


@torch.no_grad()
def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor,
                     position_ids: Optional[torch.Tensor] = None,
                     attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row, ``token`` (B, 1) at slot ``input_pos`` (1,); returns logits (B, V).

    Static shapes: ``position_ids`` (B, 1) and ``attn_mask`` (B, cache_len) never change size.
    """
    return _next_logits(model, token, input_pos, position_ids, attn_mask)


# Inductor's mode per device type. On a GPU a decode step of a small model is a few hundred
# short kernels, so launch overhead dominates: "reduce-overhead" replays them as one CUDA graph
# (the KV-cache is a module buffer written in place, and kept between generations, so that its
# address stays the one the graph was recorded with).
DECODE_COMPILE_MODES: dict[str, str] = {"cuda": "reduce-overhead"}
# The modes whose compiled step reads the KV-cache at recorded addresses (see _SPARE_CACHES).
CACHE_KEEPING_MODES: frozenset[str] = frozenset({"reduce-overhead"})


@functools.cache
def _compiled_next_logits(mode: str = "default") -> Callable[..., torch.Tensor]:
    # Compiled once per process and mode, on our own undecorated function: Dynamo keys its cache
    # on the code object, and a decorated function would share the cache (and its limit of 8
    # entries) with every other function behind torch.no_grad's wrapper. The model is an
    # argument, not captured: its weights and cache buffers become graph inputs, so models of
    # the same shapes share one graph and no compiled function keeps a model alive. Not
    # fullgraph: past the entry limit (many batch sizes or model shapes in one process) Dynamo
    # then runs the step eagerly with a warning instead of failing.
    return torch.compile(_next_logits, dynamic=False, mode=mode)


def compiled_decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor,
                              position_ids: Optional[torch.Tensor] = None,
                              attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`decode_one_token` through ``torch.compile`` with static shapes.

    One graph per model shape, dtype, batch size and padding layout (padded batches carry
    per-row positions and a key mask); the slot is a tensor, so tokens never recompile. A
    compiler failure (no C++ compiler, say) is reported as a :class:`UserError`. On CUDA the
    returned logits live in the CUDA graph's memory, which the next call overwrites: use them
    (sample) before the next step, or clone them.
    """
    mode = DECODE_COMPILE_MODES.get(token.device.type, "default")
    try:
        with torch.no_grad():
            return _compiled_next_logits(mode)(model, token, input_pos, position_ids, attn_mask)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        raise UserError(f"compiling the decode step failed ({type(error.inner_exception).__name__}: "
                        f"{str(error.inner_exception).splitlines()[0][:200]}); generate without "
                        "--compile (generation.compile_decode: false)") from None


# -- rows and their windows -----------------------------------------------------------------

class _Rows:
    """Each row's tokens (prompt + generated) and where its visible window starts."""

    def __init__(self, prompts: list[list[int]], block_size: int, context_keep: int):
        self.tokens = [list(p) for p in prompts]
        # A long prompt keeps as much context as fits: its last block_size tokens.
        self.starts = [max(0, len(p) - block_size) for p in prompts]
        self.block_size = block_size
        self.context_keep = context_keep

    def append(self, tokens: list[int]) -> None:
        for row, token in zip(self.tokens, tokens):
            row.append(token)

    def slide(self) -> None:
        """Rows whose window outgrew block_size keep only their last ``context_keep`` tokens."""
        for i, row in enumerate(self.tokens):
            if len(row) - self.starts[i] > self.block_size:
                self.starts[i] = len(row) - self.context_keep

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
    if bool(pads.any()):
        position_ids = (torch.arange(width, device=device)[None] - pads[:, None]).clamp(min=0)
    return _Padded(idx, pads, position_ids)


def key_mask(pads: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: True for the key slots a row may see (everything after its padding)."""
    return torch.arange(length, device=pads.device)[None] >= pads[:, None]


# -- steppers: how the next logits are computed ---------------------------------------------

# The KV-caches of decoding replayed as a CUDA graph, kept between generations per model and
# (batch size, cache length). A graph reads the cache at the addresses it was recorded with: a
# new cache per generation would make every generation record the graph again, and the recorded
# graphs pile up. Weak keys: a model that is gone takes its caches along; release_decode_caches
# frees them sooner.
_SPARE_CACHES: weakref.WeakKeyDictionary[Transformer, dict[tuple[int, int], list]] = weakref.WeakKeyDictionary()


def release_decode_caches(model: Transformer) -> None:
    """Free the KV-caches that compiled decoding keeps for ``model`` between generations."""
    _SPARE_CACHES.pop(model, None)


class _CachedStepper:
    """Prefill once (and again after a slide), then one decode step per token."""

    def __init__(self, model: Transformer, batch_size: int, pad_id: int, compile: bool = False):
        self.model = model
        decode = compiled_decode_one_token if compile else decode_one_token
        self.decode_step = functools.partial(decode, model)
        self.pad_id = pad_id
        self.cache_len = model.config.block_size
        self.device = model.tok_emb.weight.device
        # Decoding through a CUDA graph keeps its caches between generations, one set per batch
        # size; a set of another dtype or device (the model was moved) is dropped.
        keeps = compile and DECODE_COMPILE_MODES.get(self.device.type, "default") in CACHE_KEEPING_MODES
        self.keep_cache_as = (batch_size, self.cache_len) if keeps else None
        spare = _SPARE_CACHES.get(model, {}).pop(self.keep_cache_as, ()) if keeps else ()
        model.setup_kv_cache(batch_size, self.cache_len, reuse=spare)
        self.slot: Optional[int] = None  # next cache slot to write; None before the prefill
        self.pads: Optional[torch.Tensor] = None  # (B,) or None when no row is padded
        self.mask: Optional[torch.Tensor] = None  # (B, cache_len)

    def next_logits(self, rows: _Rows) -> torch.Tensor:
        if self.slot is None or self.slot >= self.cache_len:
            rows.slide()
            return self._prefill(rows.windows())
        return self._decode([row[-1] for row in rows.tokens])

    def _prefill(self, windows: list[list[int]]) -> torch.Tensor:
        padded = left_pad(windows, self.pad_id, self.device)
        width = padded.idx.shape[1]
        padded_rows = bool(padded.pads.any())
        self.pads = padded.pads if padded_rows else None
        self.mask = key_mask(padded.pads, self.cache_len) if padded_rows else None
        logits = prefill(self.model, padded.idx, torch.arange(width, device=self.device),
                         padded.position_ids, self.mask)
        self.slot = width
        return logits

    def _decode(self, last: list[int]) -> torch.Tensor:
        token = torch.tensor(last, device=self.device)[:, None]  # (B, 1)
        input_pos = torch.tensor([self.slot], device=self.device)  # (1,)
        position_ids = None if self.pads is None else (self.slot - self.pads)[:, None]  # (B, 1)
        logits = self.decode_step(token, input_pos, position_ids, self.mask)
        self.slot += 1
        return logits

    def close(self) -> None:
        caches = self.model.clear_kv_cache()
        if self.keep_cache_as is not None:
            _SPARE_CACHES.setdefault(self.model, {})[self.keep_cache_as] = caches


class _UncachedStepper:
    """The whole window through the model at every step: the reference for the cached path."""

    def __init__(self, model: Transformer, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.device = model.tok_emb.weight.device

    @torch.no_grad()
    def next_logits(self, rows: _Rows) -> torch.Tensor:
        rows.slide()
        padded = left_pad(rows.windows(), self.pad_id, self.device)
        mask = key_mask(padded.pads, padded.idx.shape[1]) if padded.position_ids is not None else None
        out = self.model(padded.idx, position_ids=padded.position_ids, attn_mask=mask, logits_to_keep=1)
        return out.logits[:, -1]

    def close(self) -> None:
        pass


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
) -> Iterator[list[Optional[int]]]:
    """Generate for several prompts at once; yields, per step, one new token id per row.

    A row that has produced a token of ``stop_ids`` (which is not yielded) or finished earlier
    gets ``None``. Iteration ends after ``max_new_tokens`` steps or when every row has stopped.
    ``generator`` (or ``seed``) makes sampling reproducible. See the module docstring for the
    context window, ``context_keep`` and ``use_cache``, and for ``compile`` (the compiled decode
    step; needs ``use_cache``).
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    rows_in = _check_prompts(model, prompts, max_new_tokens)
    block_size = model.config.block_size
    keep = _check_keep(context_keep, block_size)
    # The generator lives on the model's device: CUDA sampling refuses a CPU generator.
    generator = generator or make_generator(seed, model.tok_emb.weight.device)
    if compile and not use_cache:
        raise UserError("compiling the decode step needs the KV-cache; drop use_cache=False or compile")
    return _generate(model, rows_in, max_new_tokens, params, generator,
                     frozenset(stop_ids), use_cache, compile, keep, pad_id)


def _generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
              generator: torch.Generator, stop_ids: frozenset[int], use_cache: bool, compile: bool,
              keep: int, pad_id: int) -> Iterator[list[Optional[int]]]:
    batch = len(prompts)
    rows = _Rows(prompts, model.config.block_size, keep)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = seen_mask(rows.windows(), model.config.vocab_size, model.tok_emb.weight.device)
    finished = [False] * batch
    was_training = model.training
    model.eval()
    restore_math = _avoid_math_attention_with_padding(model, prompts)
    # Under torch.compile the matmuls are Inductor's; the eager layout trick would only add copies.
    restore_linears = _decode_friendly_linears(model) if not compile else (lambda: None)
    stepper = _CachedStepper(model, batch, pad_id, compile) if use_cache else _UncachedStepper(model, pad_id)
    try:
        for _ in range(max_new_tokens):
            logits = stepper.next_logits(rows)  # (B, V)
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
        restore_math()
        restore_linears()
        model.train(was_training)


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
    ``generator``, ``stop_ids``, ``use_cache``, ``compile``, ``context_keep``).
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
        steps.close()  # release the KV-cache now, not when the garbage collector gets to it


def generate(model: Transformer, prompt_ids: Sequence[int], **kwargs) -> list[int]:
    """The new token ids for one prompt (:func:`generate_stream`, collected)."""
    return list(generate_stream(model, prompt_ids, **kwargs))


# -- checks -----------------------------------------------------------------------------------

def _check_prompts(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    if max_new_tokens < 0:
        raise UserError(f"--max_tokens must be >= 0, got {max_new_tokens}")
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
                            "the tokenizer does not match the checkpoint")
        if len(row) > block:
            warnings.warn(f"prompt {i} has {len(row)} tokens, more than the context of {block}; "
                          f"only its last {block} tokens are used", PromptTruncatedWarning, stacklevel=4)
    return rows


def _check_keep(context_keep: Optional[int], block_size: int) -> int:
    keep = block_size // 2 if context_keep is None else context_keep
    if not 1 <= keep < block_size:
        raise UserError(f"generation.context_keep must be in [1, {block_size}) (below block_size), got {keep}; "
                        "leave it unset for block_size // 2")
    return keep


def _avoid_math_attention_with_padding(model: Transformer, prompts: list[list[int]]):
    """The explicit "math" attention path turns fully masked pad rows into NaN, which then leak
    into real rows through the cache; SDPA returns zeros for them. Both compute the same
    attention, so a padded batch temporarily uses SDPA. Returns the function that restores it."""
    # Rows of equal length can still become unequal after a slide, so any batch switches.
    changed = [b.attn for b in model.blocks if b.attn.attention == "math"] if len(prompts) > 1 else []
    for attn in changed:
        attn.attention = "sdpa"

    def restore() -> None:
        for attn in changed:
            attn.attention = "math"

    return restore


def _decode_friendly_linears(model: Transformer):
    """On CPU in fp32, give every ``nn.Linear`` a contiguous (in, out) copy of its weight for the
    duration of generation; returns the function that removes them.

    Why: ``F.linear`` multiplies by the transposed (out, in) weight, and for the one-row inputs of
    decoding PyTorch's CPU kernel reads that layout at about a third of the memory bandwidth;
    ``x @ w_t`` with the weight stored (in, out) runs about twice as fast (BENCHMARKS.md). The
    copies cost one extra set of weights while generating. Quantized and LoRA layers, bf16
    weights and GPUs keep their own path.
    """
    linears = [m for m in model.modules() if type(m) is nn.Linear
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for module in linears:
        weight_t = module.weight.detach().t().contiguous()  # (in, out)
        bias = module.bias

        def forward(x: torch.Tensor, weight_t: torch.Tensor = weight_t, bias=bias) -> torch.Tensor:
            y = x @ weight_t
            return y + bias if bias is not None else y

        module.forward = forward  # an instance attribute: nn.Module.__call__ uses it

    def restore() -> None:
        for module in linears:
            del module.forward  # back to nn.Linear.forward

    return restore
