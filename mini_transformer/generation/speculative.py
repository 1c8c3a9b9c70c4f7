"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a draft proposes, the target checks.

One round, for a context ``x`` whose last token is not yet in either cache::

    draft:   q_1 = q(.|x), d_1 ~ q_1;  q_2 = q(.|x,d_1), d_2 ~ q_2; ...   gamma cheap forwards
    target:  p_1 .. p_{gamma+1} = p(.|x), p(.|x,d_1), ..., p(.|x,d_1..d_gamma)   ONE forward
    accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), left to right;
    at the first rejection emit a token from normalize(max(0, p_i - q_i)) and end the round;
    if all gamma are accepted, emit a bonus token from p_{gamma+1}.

Every emitted token is then distributed exactly as the target alone would sample it (with the
same temperature and filters, which are applied to both p and q). With temperature 0 both are
one-hot, a draft token is accepted iff it is the target's argmax, and the output equals greedy
target decoding.

Rolling back after a rejection costs nothing: the caches are indexed by slot and masked past
the newest position, so rejected entries are simply overwritten later; only the count of valid
slots (``_SlotCache.length``) goes back. Batch size 1. Windows past ``block_size`` slide as in
:mod:`.engine` (both caches are prefilled again from the last ``context_keep`` tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError
from ..model import Transformer
from .engine import _check_keep, _check_prompts
from .sampling import SamplingParams, make_generator, next_token_probs


@dataclass
class SpeculativeStats:
    """Counters of one speculative run."""

    rounds: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens produced (accepted + one corrected or bonus token per round)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens per target forward; plain decoding makes exactly 1."""
        return self.emitted / self.rounds if self.rounds else 0.0


def speculative_accept(drafts: Sequence[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> tuple[list[int], int]:
    """The accept/reject rule for one round.

    Args:
        drafts: the gamma draft tokens d_1..d_gamma.
        draft_probs: (gamma, V) q_i, the distributions the drafts were drawn from.
        target_probs: (gamma + 1, V) p_i, the target's distributions at the same positions.
    Returns:
        the tokens to emit (accepted drafts, then one corrected or bonus token) and the number
        of drafts accepted.
    """
    gamma = len(drafts)
    uniforms = torch.rand(gamma, generator=generator, device=target_probs.device).tolist() if gamma else []
    for i, token in enumerate(drafts):
        p, q = target_probs[i, token].item(), draft_probs[i, token].item()
        if q > 0 and uniforms[i] < min(1.0, p / q):
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp(min=0)  # (V,)
        if residual.sum() <= 0:  # p == q up to rounding: any rejection was rounding noise
            residual = target_probs[i]
        corrected = torch.multinomial(residual / residual.sum(), 1, generator=generator).item()
        return [*drafts[:i], corrected], i
    bonus = torch.multinomial(target_probs[gamma], 1, generator=generator).item()
    return [*drafts, bonus], gamma


class _SlotCache:
    """One model with a batch-1 KV-cache and the number of valid slots in it."""

    def __init__(self, model: Transformer, cache_len: int):
        self.model = model
        self.device = model.tok_emb.weight.device
        model.setup_kv_cache(1, cache_len)
        self.length = 0  # slots 0..length-1 hold the first `length` tokens of the window

    @torch.no_grad()
    def feed(self, window: list[int], extra: Sequence[int] = (), keep_logits: int = 1) -> torch.Tensor:
        """Write ``window[length:] + extra`` into the cache; return the last ``keep_logits`` logits."""
        ids = window[self.length:] + list(extra)
        idx = torch.tensor([ids], device=self.device)  # (1, T)
        pos = torch.arange(self.length, self.length + len(ids), device=self.device)  # (T,)
        logits = self.model(idx, input_pos=pos, logits_to_keep=keep_logits).logits[0]  # (keep, V)
        self.length += len(ids)
        return logits


def speculative_generate_stream(
    target: Transformer,
    draft: Transformer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    gamma: int = 4,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    stop_ids: Iterable[int] = (),
    context_keep: Optional[int] = None,
    stats: Optional[SpeculativeStats] = None,
) -> Iterator[int]:
    """Like :func:`~.engine.generate_stream`, with ``draft`` proposing ``gamma`` tokens per round.

    The window is the smaller of the two models' ``block_size``; when the draft's is the smaller,
    the target sees less context than it would alone, so greedy equality with plain decoding
    holds only while the sequence fits the draft's window.

    Pass a :class:`SpeculativeStats` as ``stats`` to read the acceptance rate afterwards.
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    if draft.config.vocab_size != target.config.vocab_size:
        raise UserError(f"draft model vocabulary ({draft.config.vocab_size}) differs from the target's "
                        f"({target.config.vocab_size}); train the draft with the same tokenizer")
    if draft is target:
        raise UserError("the draft model must be a different model object from the target (each needs its own cache)")
    if gamma < 1:
        raise UserError(f"speculative gamma must be >= 1, got {gamma}; 4 is a good start")
    (prompt,) = _check_prompts(target, [prompt_ids], max_new_tokens)
    window = min(target.config.block_size, draft.config.block_size)
    keep = _check_keep(context_keep, window)
    generator = generator or make_generator(seed, target.tok_emb.weight.device)
    return _speculate(target, draft, prompt, max_new_tokens, gamma, params, generator, frozenset(stop_ids),
                      window, keep, stats if stats is not None else SpeculativeStats())


def _speculate(target: Transformer, draft: Transformer, prompt: list[int], max_new_tokens: int, gamma: int,
               params: SamplingParams, generator: torch.Generator, stop_ids: frozenset[int], window: int,
               keep: int, stats: SpeculativeStats) -> Iterator[int]:
    tokens = list(prompt)
    start = max(0, len(tokens) - window)  # a long prompt keeps its last `window` tokens
    penalise = params.repetition_penalty != 1.0
    device = target.tok_emb.weight.device
    seen = None
    if penalise:
        seen = _with(torch.zeros(1, target.config.vocab_size, dtype=torch.bool, device=device), tokens[start:])
    modes = (target.training, draft.training)
    target.eval()
    draft.eval()
    t_cache, d_cache = _SlotCache(target, window), _SlotCache(draft, window)
    produced = 0
    try:
        while produced < max_new_tokens:
            if len(tokens) - start > window:  # the same slide as the plain engine
                start = len(tokens) - keep
                t_cache.length = d_cache.length = 0
            ctx = tokens[start:]
            n = len(ctx)
            # The target verifies positions n..n+g, which must stay inside the window, so the
            # output (greedy: token for token) matches plain decoding even past block_size.
            g = min(gamma, window - n, max_new_tokens - produced - 1)
            drafts, q = _draft(d_cache, ctx, g, params, seen, generator)
            logits = t_cache.feed(ctx, drafts, keep_logits=g + 1)  # (g+1, V)
            p = _probs_along(logits, drafts, params, seen)  # (g+1, V)
            new, accepted = speculative_accept(drafts, q, p, generator)
            # Roll back: valid entries are the context and the accepted drafts each cache holds.
            t_cache.length = n + accepted
            d_cache.length = min(d_cache.length, n + accepted)
            stats.rounds += 1
            stats.drafted += g
            stats.accepted += accepted
            stats.emitted += len(new)
            for token in new:
                if token in stop_ids:
                    return
                tokens.append(token)
                if seen is not None:
                    seen[0, token] = True
                produced += 1
                yield token
    finally:
        target.clear_kv_cache()
        draft.clear_kv_cache()
        target.train(modes[0])
        draft.train(modes[1])


def _draft(cache: _SlotCache, ctx: list[int], gamma: int, params: SamplingParams,
           seen: Optional[torch.Tensor], generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """Sample gamma draft tokens; return them and their distributions q (gamma, V)."""
    drafts: list[int] = []
    dists: list[torch.Tensor] = []
    if gamma == 0:
        return drafts, torch.empty(0)
    logits = cache.feed(ctx)[-1:]  # (1, V)
    for i in range(gamma):
        q = next_token_probs(logits, params, None if seen is None else _with(seen, drafts))  # (1, V)
        token = torch.multinomial(q, 1, generator=generator).item()
        drafts.append(token)
        dists.append(q[0])
        if i + 1 < gamma:
            logits = cache.feed(ctx + drafts)[-1:]
    return drafts, torch.stack(dists)


def _probs_along(logits: torch.Tensor, drafts: list[int], params: SamplingParams,
                 seen: Optional[torch.Tensor]) -> torch.Tensor:
    """Target distributions at each verified position; the penalty sees the drafts before it."""
    if seen is None:
        return next_token_probs(logits, params)
    masks = torch.stack([_with(seen, drafts[:i])[0] for i in range(len(drafts) + 1)])  # (g+1, V)
    return next_token_probs(logits, params, masks)


def _with(seen: torch.Tensor, extra: list[int]) -> torch.Tensor:
    if not extra:
        return seen
    mask = seen.clone()
    mask[0, torch.tensor(extra)] = True
    return mask


def speculative_generate(target: Transformer, draft: Transformer, prompt_ids: Sequence[int],
                         **kwargs) -> tuple[list[int], SpeculativeStats]:
    """Collect :func:`speculative_generate_stream`; returns the new tokens and the stats."""
    stats = kwargs.pop("stats", None) or SpeculativeStats()
    tokens = list(speculative_generate_stream(target, draft, prompt_ids, stats=stats, **kwargs))
    return tokens, stats
