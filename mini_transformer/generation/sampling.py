"""Turning next-token logits into a token: penalties, temperature, top-k, top-p, min-p.

The order is fixed and documented, because the filters do not commute:

1. **repetition penalty** (CTRL, Keskar et al. 2019) on the raw logits: for every token already
   in the context, a positive logit is divided by the penalty and a negative one multiplied by it;
2. **temperature**: logits / T. T = 0 means greedy (argmax of the penalised logits; the filters
   below cannot change the argmax, so they are skipped);
3. **top-k**: keep the k largest logits;
4. **top-p** (nucleus): keep the smallest set of most likely tokens whose probability reaches p
   (always at least the most likely one);
5. **min-p**: keep tokens whose probability is at least ``min_p`` times the top token's.

Every filter works on a (B, V) batch and sets removed logits to ``-inf``. Sampling draws from a
``torch.Generator`` so that a seed fixes the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError


_TYPICAL = {"temperature": "use 0 for greedy, 0.8 for balanced", "top_p": "try 0.9", "min_p": "try 0.05",
            "repetition_penalty": "1.0 disables it, try 1.1"}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. ``temperature=0`` is greedy decoding."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        # Library terms; the command line names its own flags when it reports these.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # nan passes every comparison below
                raise UserError(f"{name} must be a finite number, got {value}; "
                                f"{_TYPICAL[name]}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}; use 0 for greedy, 0.8 for balanced")
        if self.top_k is not None and self.top_k <= 0:
            raise UserError(f"top_k must be a positive integer, got {self.top_k}; try 50, or leave it unset")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}; try 0.9")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise UserError(f"min_p must be in [0, 1], got {self.min_p}; try 0.05")
        if self.repetition_penalty <= 0:
            raise UserError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}; 1.0 disables it, try 1.1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# -- filters on (B, V) logits ---------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty. ``seen`` is a (B, V) bool mask of the tokens already in each row's context."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the k-th value are all kept)."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches ``p``.

    The running sum is taken in float64 (float32 on Apple's MPS, which has no float64) from the
    most likely token, so a set that reaches ``p`` exactly (three equal tokens and p = 2/3) keeps
    two, not one too many or too few. Tokens of
    exactly equal probability rank by id (a stable sort), so where a cut falls inside a tied
    group, the lower ids survive.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (B, V)
    exact = torch.float32 if logits.device.type == "mps" else torch.float64
    probs = torch.softmax(sorted_logits.to(exact), dim=-1)
    # The probability of the tokens ranked above each one (an exclusive running sum; subtracting
    # each token's own probability from an inclusive one would add a rounding error).
    mass_before = torch.cat([torch.zeros_like(probs[..., :1]), probs[..., :-1].cumsum(dim=-1)], dim=-1)
    # A token is needed while the tokens above it have not yet reached p; the first always is.
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times that of the most likely token."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams,
                   seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Penalty, temperature, top-k, top-p, min-p, in that order. (B, V) -> (B, V) float32.

    With ``temperature == 0`` only the penalty is applied (the caller takes the argmax).
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    # Each row's maximum is subtracted first (the same distribution), and the temperature kept
    # above float32's smallest normal number: a tiny temperature then sends the other logits to
    # -inf, near-greedy, instead of the top ones to inf or 0/0 (NaN probabilities).
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p is not None:
        logits = min_p_filter(logits, params.min_p)
    return logits


def next_token_probs(logits: torch.Tensor, params: SamplingParams,
                     seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The distribution a token is drawn from, (B, V); one-hot on the argmax when greedy.

    Speculative decoding needs the distribution itself, not only a sample.
    """
    processed = process_logits(logits, params, seen)
    if params.greedy:
        return torch.nn.functional.one_hot(processed.argmax(dim=-1), logits.size(-1)).float()
    return torch.softmax(processed, dim=-1)


def sample_next_token(logits: torch.Tensor, params: SamplingParams,
                      seen: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one token per row from (B, V) logits; returns (B,) int64."""
    processed = process_logits(logits, params, seen)
    if params.greedy:
        return processed.argmax(dim=-1)
    probs = torch.softmax(processed, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def seen_mask(rows: list[list[int]], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, V) bool: which tokens occur in each row (the context of the repetition penalty)."""
    mask = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        if row:
            mask[i, torch.tensor(row, device=device)] = True
    return mask


def make_generator(seed: Optional[int] = None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with ``seed``, or from fresh entropy when ``seed`` is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
