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
slots goes back (:meth:`~.engine.CachedDecoder.rewind`). Batch size 1. Windows past
``block_size`` slide as in :mod:`.engine`, through the same :class:`~.engine.ContextWindows`
(both caches are then prefilled again from the last ``context_keep`` tokens). The draft tokens
stay on the device, and each round reads back to the host once, after the accept step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError
from ..model import KVCache, Transformer
from .engine import CachedDecoder, ContextWindows, check_inference_mode, check_prompts, resolve_context_keep
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


def speculative_accept(drafts: Sequence[int] | torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> tuple[list[int], int]:
    """The accept/reject rule for one round, vectorised: one read back to the host.

    Args:
        drafts: the gamma draft tokens d_1..d_gamma (a list, or a (gamma,) tensor on the device).
        draft_probs: (gamma, V) q_i, the distributions the drafts were drawn from.
        target_probs: (gamma + 1, V) p_i, the target's distributions at the same positions.
    Returns:
        the tokens to emit (accepted drafts, then one corrected or bonus token) and the number
        of drafts accepted.
    """
    device = target_probs.device
    drafts = torch.as_tensor(drafts, dtype=torch.long, device=device).view(-1)  # (gamma,)
    gamma = drafts.numel()
    # Row i of `corrections` is what to sample from if d_i is the first rejected draft:
    # normalize(max(0, p_i - q_i)); row gamma is the bonus distribution p_{gamma+1}.
    corrections = target_probs[gamma:gamma + 1]  # (1, V)
    accepted = torch.zeros((), dtype=torch.long, device=device)
    if gamma:
        uniforms = torch.rand(gamma, generator=generator, device=device)
        rows = torch.arange(gamma, device=device)
        p, q = target_probs[rows, drafts], draft_probs[rows, drafts]  # (gamma,) each
        accept = (q > 0) & (uniforms < p / q)  # u < min(1, p/q), as u < 1
        accepted = accept.long().cumprod(0).sum()  # the drafts before the first rejection
        residuals = (target_probs[:gamma] - draft_probs).clamp(min=0)  # (gamma, V)
        corrections = torch.cat([residuals, corrections])  # (gamma + 1, V)
    dist = corrections[accepted]  # (V,)
    # p == q up to rounding leaves no residual mass: that rejection was rounding noise.
    dist = torch.where(dist.sum() > 0, dist, target_probs[accepted])
    token = torch.multinomial(dist / dist.sum(), 1, generator=generator)  # (1,)
    n, last, *drafted = torch.cat([accepted.view(1), token, drafts]).tolist()  # the one host read
    return [*drafted[:n], last], n


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
        raise UserError("the draft model is the target itself, which gains nothing; pass a smaller model as the draft")
    if gamma < 1:
        raise UserError(f"speculative gamma must be >= 1, got {gamma}; 4 is a good start")
    (prompt,) = check_prompts(target, [prompt_ids], max_new_tokens)
    window = min(target.config.block_size, draft.config.block_size)
    keep = resolve_context_keep(context_keep, window)
    check_inference_mode(target)
    check_inference_mode(draft)
    generator = generator or make_generator(seed, target.device)
    return _speculate(target, draft, prompt, max_new_tokens, gamma, params, generator, frozenset(stop_ids),
                      window, keep, stats if stats is not None else SpeculativeStats())


def _speculate(target: Transformer, draft: Transformer, prompt: list[int], max_new_tokens: int, gamma: int,
               params: SamplingParams, generator: torch.Generator, stop_ids: frozenset[int], window: int,
               keep: int, stats: SpeculativeStats) -> Iterator[int]:
    rows = ContextWindows([prompt], window, keep)
    device = target.device
    seen = None
    if params.repetition_penalty != 1.0:
        seen = _with(torch.zeros(1, target.config.vocab_size, dtype=torch.bool, device=device), rows.windows()[0])
    verifier = CachedDecoder(target, KVCache.for_model(target, 1, window))
    drafter = CachedDecoder(draft, KVCache.for_model(draft, 1, window))
    produced = 0
    while produced < max_new_tokens:
        if rows.slide():  # the same slide as the plain engine: both caches start again
            verifier.rewind(0)
            drafter.rewind(0)
        (ctx,) = rows.windows()
        n = len(ctx)
        # The target verifies positions n..n+g, which must stay inside the window, so the
        # output (greedy: token for token) matches plain decoding even past block_size.
        g = min(gamma, window - n, max_new_tokens - produced - 1)
        drafts, q = _draft(drafter, ctx, g, params, seen, generator)  # (g,), (g, V)
        new_ids = torch.cat([_ids(ctx[verifier.length:], device), drafts])
        logits = verifier.extend(new_ids[None], keep_logits=g + 1)[0]  # (g+1, V)
        p = _probs_along(logits, drafts, params, seen)  # (g+1, V)
        new, accepted = speculative_accept(drafts, q, p, generator)
        # Roll back: valid entries are the context and the accepted drafts each cache holds.
        verifier.rewind(n + accepted)
        drafter.rewind(min(drafter.length, n + accepted))
        stats.rounds += 1
        stats.drafted += g
        stats.accepted += accepted
        stats.emitted += len(new)
        for token in new:
            if token in stop_ids:
                return
            rows.append([token])
            if seen is not None:
                seen[0, token] = True
            produced += 1
            yield token


def _ids(tokens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.long, device=device)


def _draft(drafter: CachedDecoder, ctx: list[int], gamma: int, params: SamplingParams,
           seen: Optional[torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample gamma draft tokens, kept on the device; return them (gamma,) and their
    distributions q (gamma, V)."""
    drafts = torch.empty(0, dtype=torch.long, device=drafter.device)
    if gamma == 0:
        return drafts, torch.empty(0, drafter.model.config.vocab_size, device=drafter.device)
    dists: list[torch.Tensor] = []
    logits = drafter.extend(_ids(ctx[drafter.length:], drafter.device)[None])[0]  # (1, V)
    for i in range(gamma):
        q = next_token_probs(logits, params, None if seen is None else _with(seen, drafts))  # (1, V)
        token = torch.multinomial(q, 1, generator=generator)  # (1, 1)
        drafts = torch.cat([drafts, token[0]])
        dists.append(q[0])
        if i + 1 < gamma:
            logits = drafter.extend(token)[0]
    return drafts, torch.stack(dists)


def _probs_along(logits: torch.Tensor, drafts: torch.Tensor, params: SamplingParams,
                 seen: Optional[torch.Tensor]) -> torch.Tensor:
    """Target distributions at each verified position; the penalty sees the drafts before it."""
    if seen is None:
        return next_token_probs(logits, params)
    masks = torch.stack([_with(seen, drafts[:i])[0] for i in range(len(drafts) + 1)])  # (g+1, V)
    return next_token_probs(logits, params, masks)


def _with(seen: torch.Tensor, extra: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``seen`` (1, V) with the tokens of ``extra`` marked too."""
    if len(extra) == 0:
        return seen
    mask = seen.clone()
    mask[0, torch.as_tensor(extra, dtype=torch.long, device=seen.device)] = True
    return mask


def speculative_generate(target: Transformer, draft: Transformer, prompt_ids: Sequence[int],
                         **kwargs) -> tuple[list[int], SpeculativeStats]:
    """Collect :func:`speculative_generate_stream`; returns the new tokens and the stats."""
    stats = kwargs.pop("stats", None) or SpeculativeStats()
    tokens = list(speculative_generate_stream(target, draft, prompt_ids, stats=stats, **kwargs))
    return tokens, stats
