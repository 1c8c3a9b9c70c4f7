"""Generation: sampling, the prefill/decode engine, streaming text, batches, speculative decoding,
attention maps. Works on token ids; only the streaming helpers take a ``decode`` callable.

Modules: :mod:`.sampling` (logits -> token), :mod:`.engine` (prefill, decode_one_token, the
iterators), :mod:`.streaming` (incremental detokenizer, stop strings), :mod:`.speculative`
(draft/target decoding), :mod:`.attention` (attention weights to .npz; the PNG grid is drawn by
:mod:`mini_transformer.plot`).
"""

from .attention import attention_weights, save_attention
from .engine import (
    CachedDecoder, ContextWindows, KVCachePool, PromptTruncatedWarning, check_inference_mode, check_prompts,
    compiled_decode_one_token, decode_one_token, generate, generate_batch, generate_batch_stream,
    generate_stream, prefill, resolve_context_keep,
)
from .sampling import (
    SamplingParams, apply_repetition_penalty, make_generator, min_p_filter, next_token_probs,
    process_logits, sample_next_token, top_k_filter, top_p_filter,
)
from .speculative import (
    SpeculativeStats, speculative_accept, speculative_generate, speculative_generate_stream,
)
from .streaming import StopStrings, TextStreamer, stream_text, truncate_at_stop

__all__ = [
    "CachedDecoder", "ContextWindows", "KVCachePool", "PromptTruncatedWarning", "SamplingParams",
    "SpeculativeStats", "StopStrings", "TextStreamer",
    "apply_repetition_penalty", "attention_weights", "check_inference_mode", "check_prompts",
    "compiled_decode_one_token", "decode_one_token", "generate", "generate_batch",
    "generate_batch_stream", "generate_stream", "make_generator", "min_p_filter", "next_token_probs",
    "prefill", "process_logits", "resolve_context_keep", "sample_next_token", "save_attention",
    "speculative_accept", "speculative_generate", "speculative_generate_stream", "stream_text",
    "top_k_filter", "top_p_filter", "truncate_at_stop",
]
