r"""The decoder-only Transformer: RoPE, pre-norm, SwiGLU, MHA/GQA/MQA attention, a KV-cache.

Options from the modded-nanogpt speedrun, each off by default: ``qk_norm`` (RMSNorm of each
head's q and k), ``activation: relu2`` (a non-gated MLP), ``logit_softcap`` and
``zero_init_projections``.

This module knows nothing of training, data, generation or the command line.

Shapes in comments: B batch, T new tokens in this call, L keys visible (cache length),
H query heads, K key/value heads, D head dim, C = d_model.

Attention variants, by how many query heads share one key/value head::

    MHA (n_kv_heads = n_heads)   GQA (1 < n_kv_heads < n_heads)   MQA (n_kv_heads = 1)
    q: | | | | | | | |           q: | | | | | | | |                q: | | | | | | | |
    kv:| | | | | | | |           kv: \_/ \_/ \_/ \_/               kv: \_____________/
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .errors import UserError

try:  # FlashAttention-2: CUDA only, optional.
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


# ``attention: auto`` trains with the explicit path on CPU in bf16 up to this many query tokens;
# under torch.compile, which fuses its softmax and masking, up to the second figure.
EXPLICIT_ATTENTION_MAX_LEN = 128
EXPLICIT_ATTENTION_MAX_LEN_COMPILED = 256


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


class TransformerOutput(NamedTuple):
    """What :meth:`Transformer.forward` returns; unpacks as ``logits, loss, hidden_states``."""

    logits: torch.Tensor  # (B, T, vocab) or (B, logits_to_keep, vocab)
    loss: Optional[torch.Tensor]  # mean cross-entropy when targets are given
    hidden_states: torch.Tensor  # (B, T, C): the final hidden states, after the final norm


# -- rotary embeddings ----------------------------------------------------------------------

def rope_cache(max_positions: int, head_dim: int, base: float, device=None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (max_positions, head_dim), in the "rotate half" layout of Llama/HF."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    positions = torch.arange(max_positions, device=device, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)  # (P, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (P, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., D) by position; ``cos``/``sin`` broadcast against it: (T, 1, D) or
    (B, T, 1, D) for x of (B, T, heads, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


# -- KV-cache -------------------------------------------------------------------------------

class LayerKVCache(nn.Module):
    """Preallocated keys and values of one attention layer, written at the given slots."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        # Buffers, so that a compiled decode step taking the cache as an argument treats them as
        # static inputs (what a CUDA graph needs to replay its in-place writes).
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at ``input_pos``: the same slots for every row (T,), or each
        row's own (B, T); return the whole cache (B, K, L, D)."""
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
            self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        else:
            slots = input_pos[:, None, :, None].expand_as(k)  # (B, K, T, D)
            self.k.scatter_(2, slots, k.to(self.k.dtype))
            self.v.scatter_(2, slots, v.to(self.v.dtype))
        return self.k, self.v


class KVCache(nn.Module):
    """The keys and values of every layer for a batch of sequences, passed to
    :meth:`Transformer.forward`.

    The model keeps no state between calls: whoever generates owns the cache (one per running
    generation), so several generations can use one model at the same time. Slots are written
    where ``input_pos`` says; which slots hold valid tokens is the owner's bookkeeping (the
    model masks the slots after each query's own). With a (B, T) ``input_pos`` each row has
    slots of its own, so rows at different lengths decode together (continuous batching).
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.layers = nn.ModuleList(LayerKVCache(batch_size, max_len, n_kv_heads, head_dim, dtype, device)
                                    for _ in range(n_layers))

    @classmethod
    def for_model(cls, model: "Transformer", batch_size: int, max_len: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None) -> "KVCache":
        """A zeroed cache of ``max_len`` (default block_size) slots in the model's dtype and device."""
        config = model.config
        max_len = max_len or config.block_size
        if max_len > config.block_size:
            raise ValueError(f"KV-cache length {max_len} exceeds block_size {config.block_size}")
        return cls(config.n_layers, batch_size, max_len, config.kv_heads, config.head_dim,
                   dtype or model.dtype, model.device)

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].k.device

    def fits(self, model: "Transformer", batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None) -> bool:
        """Whether this cache has the shape, dtype and device ``for_model`` would give."""
        config = model.config
        return (len(self.layers) == config.n_layers and self.layers[0].k.shape
                == (batch_size, config.kv_heads, max_len, config.head_dim)
                and self.dtype == (dtype or model.dtype) and self.device == model.device)

    def zero_(self) -> "KVCache":
        """Clear every slot in place (the tensors keep their addresses)."""
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()
        return self


# -- layers ---------------------------------------------------------------------------------

def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm over each head's dimensions (qk_norm), in the input's dtype: under autocast q and k
    arrive in bf16 while the weight stays fp32, which would leave the fused kernel unused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE; ``n_kv_heads`` selects MHA, GQA or MQA."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.attention = config.attention
        if self.attention == "flash" and not flash_attn_available():
            raise UserError("model.attention flash needs the flash-attn package (pip install flash-attn) "
                            "and a CUDA device; use attention: auto or sdpa")
        # One fused projection for q, k and v: a single matmul instead of three.
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_out, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        # qk_norm: each head's q and k normalised over head_dim (one weight shared by the heads,
        # as Qwen3's q_norm / k_norm), so attention logits cannot grow with the weights' scale.
        self.q_norm = HeadRMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = HeadRMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Optional[LayerKVCache] = None,
        input_pos: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``cache``: this layer's KV-cache, written at slots ``input_pos`` (T,). ``mask`` (bool,
        broadcastable to (B, H, T, L), True = may attend) replaces the plain causal mask;
        :meth:`Transformer._run` builds it once for all layers."""
        B, T, C = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * K, D)
        qk = qkv[:, :, : H + K]  # (B, T, H + K, D)
        if self.q_norm is not None:  # before RoPE: the cache holds normalised, rotated keys
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        # Rotate q and k together: one set of elementwise kernels instead of two.
        qk = apply_rope(qk, cos, sin)  # (B, T, H + K, D)
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, D)
        k = qk[:, :, H:].transpose(1, 2)  # (B, K, T, D)
        v = qkv[:, :, H + K:].transpose(1, 2)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, K, L, D), L = cache length

        is_causal = mask is None
        dropout_p = self.attn_dropout.p if self.training else 0.0
        weights = None
        if need_weights or self.attention == "math" or self._explicit_is_faster(q):
            y, weights = self._math_attention(q, k, v, mask, is_causal, dropout_p)
        elif self._use_flash(x, mask):
            y = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 dropout_p=dropout_p, causal=True).transpose(1, 2)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=is_causal, enable_gqa=K != H)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y)), weights

    def _explicit_is_faster(self, q: torch.Tensor) -> bool:
        """``auto`` on CPU: the explicit path for a compiled decode step, and to train on short bf16
        sequences.

        Why: PyTorch's CPU flash-attention backward is slow in bf16 for short sequences (3.3 ms
        vs 1.0 ms in fp32 for 12 x 4 heads x 64 tokens), while at T <= 128 the explicit
        matmuls and softmax stay in cache. Measured (BENCHMARKS.md): 1.3-1.5x faster training
        steps at T = 64 and 128 in bf16, no gain in fp32, slower at T = 256 in eager mode but
        9% faster there under torch.compile.
        """
        if not (self.attention == "auto" and q.device.type == "cpu"):
            return False
        compiled = torch.compiler.is_compiling()
        if compiled and q.shape[2] == 1 and not torch.is_grad_enabled():
            # A compiled decode step: Inductor fuses the explicit q k^T, softmax and weights v of
            # one query into the step's own loops; SDPA's CPU kernel stays a separate call that
            # cost the small preset ~80 us per layer (BENCHMARKS.md, "Levers and what each measured").
            return True
        if not (q.dtype == torch.bfloat16 and torch.is_grad_enabled()):
            return False
        return q.shape[2] <= (EXPLICIT_ATTENTION_MAX_LEN_COMPILED if compiled else EXPLICIT_ATTENTION_MAX_LEN)

    def _use_flash(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> bool:
        if self.attention not in ("auto", "flash") or _flash_attn_func is None:
            return False
        return x.is_cuda and attn_mask is None and x.dtype in (torch.float16, torch.bfloat16)

    def _math_attention(self, q, k, v, attn_mask, is_causal, dropout_p):
        """Explicit softmax(q k^T / sqrt(D)) v. Returns the output and the weights (B, H, T, L)."""
        H, K = q.shape[1], k.shape[1]
        if K != H:
            k = k.repeat_interleave(H // K, dim=1)
            v = v.repeat_interleave(H // K, dim=1)
        # Scaling q rather than the scores touches T x D elements instead of T x L.
        scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, T, L)
        # Softmax in at least fp32 (bf16/fp16 scores are upcast; float64 stays float64).
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if is_causal:
            T, L = scores.shape[-2:]
            # An additive -inf above the diagonal: one fused add instead of a mask inversion
            # and a masked_fill. Query t sees keys up to L - T + t.
            causal_bias = torch.full((T, L), float("-inf"), dtype=scores.dtype, device=q.device).triu(L - T + 1)
            weights = torch.softmax(scores + causal_bias, dim=-1).type_as(q)
        else:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
            # A query row with every key masked (a padding row) gives NaN; make it attend to nothing.
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0).type_as(q)
        y = F.dropout(weights, p=dropout_p, training=dropout_p > 0) @ v
        return y, weights


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.hidden_size
        self.hidden_size = hidden
        self.gate_up = nn.Linear(config.d_model, 2 * hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.dropout(self.down(F.silu(gate) * up))


class ReLU2MLP(nn.Module):
    """The speedrun's non-gated feed-forward: down(relu(up(x))^2), two matrices instead of three."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.hidden_size
        self.hidden_size = hidden
        self.up = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.relu(self.up(x)).square()))


FEED_FORWARD = {"swiglu": SwiGLU, "relu2": ReLU2MLP}  # by ModelConfig.activation


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = make_norm(config)
        self.ffn = FEED_FORWARD[config.activation](config)

    def forward(self, x, cos, sin, cache=None, input_pos=None, mask=None, need_weights=False):
        attn_out, weights = self.attn(self.attn_norm(x), cos, sin, cache, input_pos, mask, need_weights)
        x = x + attn_out
        x = x + self.ffn(self.ffn_norm(x))
        return x, weights


# -- the model ------------------------------------------------------------------------------

class Transformer(nn.Module):
    """Token embedding, ``n_layers`` pre-norm blocks, a final norm and the (tied) LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_rope()
        self.gradient_checkpointing = False
        self.reset_parameters()

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE tables on ``device`` (default: where the parameters are). They
        are buffers that checkpoints do not hold, since they follow from the config; a model
        built on the meta device calls this once its weights are loaded."""
        config = self.config
        if device is None:
            device = self.norm.weight.device
        cos, sin = rope_cache(config.block_size, config.head_dim, config.rope_base, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- initialisation -----------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 style init; residual output projections scaled by 1/sqrt(2 * n_layers), or zero
        with ``zero_init_projections`` (each block then starts as the identity, as in the speedrun)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            for projection in (block.attn.proj.weight, block.ffn.down.weight):
                if self.config.zero_init_projections:
                    nn.init.zeros_(projection)
                else:
                    nn.init.normal_(projection, mean=0.0, std=residual_std)

    # -- where and how it runs -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device of the weights (read off the final norm: cheap even when quantized)."""
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype the model computes in (its norms', even when quantized)."""
        return self.norm.weight.dtype

    # -- forward --------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        kv_cache: Optional[KVCache] = None,
        input_pos: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        logits_to_keep: int = 0,
    ) -> TransformerOutput:
        """Run the model on token ids ``idx`` (B, T).

        Args:
            targets: (B, T) next-token ids for the loss; -1 marks positions to ignore.
            kv_cache: the caller's :class:`KVCache`; these tokens' keys and values are written
                at slots ``input_pos`` and each query sees the slots up to its own. Without
                it, the call is a plain causal forward over ``idx``.
            input_pos: cache slots of these tokens (needed with ``kv_cache``): (T,), the same
                for every row, or (B, T), each row's own (rows of different lengths).
            position_ids: (B, T) rotary positions per row, when they differ from the slots
                (left-padded batches). Defaults to ``input_pos`` or ``0..T-1``.
            attn_mask: (B, L) bool, False for key slots a row must not see (its padding).
            logits_to_keep: compute logits only for the last N positions (0: all).
        """
        if kv_cache is not None and input_pos is None:
            raise ValueError("a forward with kv_cache needs input_pos, the cache slots of the tokens")
        x, _ = self._run(idx, kv_cache, input_pos, position_ids, attn_mask, need_weights=False)
        hidden = x
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if cap is not None:  # a smooth bound: every path to logits (decoding too) comes through here
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return TransformerOutput(logits, loss, hidden)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every layer, each (B, H, T, T), through the explicit math path."""
        _, weights = self._run(idx, None, None, None, None, need_weights=True)
        return weights

    def _run(self, idx, kv_cache, input_pos, position_ids, attn_mask, need_weights):
        B, T = idx.shape
        if kv_cache is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        positions = position_ids if position_ids is not None else input_pos
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, D) or (B, T, D)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, D) or (B, T, 1, D): over heads
        mask = self._attention_mask(T, idx.device, kv_cache, input_pos, attn_mask)
        x = self.emb_dropout(self.tok_emb(idx))  # (B, T, C)
        all_weights = []
        for i, block in enumerate(self.blocks):
            if kv_cache is not None:
                x, weights = block(x, cos, sin, kv_cache.layers[i], input_pos, mask, need_weights)
            elif self.gradient_checkpointing and self.training:
                x, weights = checkpoint(block, x, cos, sin, None, None, mask, need_weights, use_reentrant=False)
            else:
                x, weights = block(x, cos, sin, None, None, mask, need_weights)
            all_weights.append(weights)
        return self.norm(x), all_weights

    @staticmethod
    def _attention_mask(T: int, device, kv_cache: Optional[KVCache], input_pos: Optional[torch.Tensor],
                        attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The boolean mask every layer uses (True = may attend), or None for plain causal."""
        if kv_cache is not None:
            # Query t sits at cache slot input_pos[t] (of its row, for a (B, T) input_pos): it
            # sees the slots up to its own. Later slots hold stale keys from an earlier sequence.
            slots = torch.arange(kv_cache.max_len, device=device)
            mask = slots <= input_pos[..., None]  # (T, L) or (B, T, L)
            mask = mask[None, None] if input_pos.dim() == 1 else mask[:, None]  # (1 or B, 1, T, L)
        elif attn_mask is not None:
            mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, T)
        else:
            return None
        if attn_mask is not None:
            mask = mask & attn_mask[:, None, None, :]  # per-row key padding: (B, 1, T, L)
        return mask

    # -- introspection --------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights counted once); optionally without the embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:  # the embedding's own parameters (a quantized table has none to read)
            n -= sum(p.numel() for p in self.tok_emb.parameters())
        return n

    def dropout_modules(self) -> list[nn.Dropout]:
        return [m for m in self.modules() if isinstance(m, nn.Dropout)]

    def set_dropout(self, p: float) -> None:
        """Set the rate of every dropout in the model (used for dropout annealing)."""
        for module in self.dropout_modules():
            module.p = p
