"""Our model as a llama.cpp architecture: which one, its metadata keys and its tensors.

Which architecture. ``norm: rmsnorm`` is ``llama`` (``bias: true`` too: llama.cpp reads the
optional q/k/v, output and FFN biases). ``norm: layernorm`` is ``stablelm`` with full rotary, a
sequential residual and no q/k norms; its norm biases and ``output.weight`` are required, so they
are written as zeros and as a copy of the embedding when ours has none or ties it. ``stablelm``
has no bias on ``attn_output`` or the FFN, so ``layernorm`` with ``bias: true`` is refused: the
same models the Hugging Face export holds (``LlamaForCausalLM`` / ``StableLmForCausalLM``).

Weights. The Hugging Face layout (:mod:`..hf.layout`) splits our fused ``qkv`` and ``gate_up``
rows; the ``gguf`` package's own name map (what llama.cpp's ``convert_hf_to_gguf.py`` uses) turns
those names into GGUF's (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``).

RoPE. We rotate halves (dimension ``i`` with ``i + D/2``, like HF); llama.cpp's ``llama`` rotates
neighbouring pairs (``2i`` with ``2i + 1``). So, as ``convert_hf_to_gguf.py`` does, the rows of
each Q and K head (weights and biases) are reordered ``[0, D/2, 1, D/2+1, ...]``: the dot
products q.k are unchanged, since both sides move alike. ``stablelm`` rotates halves (NEOX
style): nothing is permuted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...config import ModelConfig
from ...errors import UserError
from ..hf.layout import TOP_LEVEL_KEYS, option_without_counterpart, to_hf_state_dict

LLAMA = "llama"
STABLELM = "stablelm"
ARCHITECTURE_OF_NORM = {"rmsnorm": LLAMA, "layernorm": STABLELM}
EXPORTABLE = "norm: rmsnorm (llama, bias true or false) or norm: layernorm with bias: false (stablelm)"

# The two matrices with a row per token (the padding rows of an added end-of-text token go here).
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"


def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture that holds ``config`` (call :func:`check_gguf_exportable` first)."""
    return ARCHITECTURE_OF_NORM[config.norm]


def check_gguf_exportable(config: ModelConfig) -> None:
    """Raise a one-line :class:`UserError` unless a llama.cpp architecture computes what ``config`` does."""
    if config.vocab_size is None:
        raise UserError("the model config has no vocab_size; export a trained checkpoint")
    option = option_without_counterpart(config)
    if option is not None:
        raise UserError(f"{option} has no llama.cpp architecture to export to (llama and stablelm lack it); "
                        "export a model trained without it, or run this one with mini-transformer generate or serve")
    reason = None
    if config.norm not in ARCHITECTURE_OF_NORM:
        reason = f"norm {config.norm!r} has no llama.cpp architecture"
    elif config.norm == "layernorm" and config.bias:
        reason = ("norm: layernorm with bias: true has no llama.cpp architecture (stablelm has no bias on "
                  "attn_output and the FFN)")
    if reason is not None:
        raise UserError(f"{reason}; exportable: {EXPORTABLE}")


# -- metadata --------------------------------------------------------------------------------------

def architecture_metadata(config: ModelConfig, context_length: int) -> dict[str, Any]:
    """The ``{arch}.*`` keys (without the prefix) of the model equal to ``config``.

    ``context_length`` is the export's context (``block_size``, or the longer one of a model
    imported from Hugging Face; see :func:`..hf.export.exported_context`).
    """
    architecture = gguf_architecture(config)
    out: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "context_length": context_length,
        "embedding_length": config.d_model,
        "block_count": config.n_layers,
        "feed_forward_length": config.hidden_size,
        "attention.head_count": config.n_heads,
        "attention.head_count_kv": config.kv_heads,
        "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim,
        "rope.dimension_count": config.head_dim,  # full rotary
        "rope.freq_base": float(config.rope_base),
    }
    eps_key = "attention.layer_norm_rms_epsilon" if architecture == LLAMA else "attention.layer_norm_epsilon"
    out[eps_key] = float(config.norm_eps)
    return out


# -- weights ---------------------------------------------------------------------------------------

def rope_permute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Q or K projection (weight or bias) from rotate-half order to llama.cpp's pairs."""
    head_dim = rows.shape[0] // n_heads
    return (rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2)
            .reshape(rows.shape).contiguous())


def rope_unpermute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`rope_permute`: llama.cpp's pair order back to rotate-half."""
    head_dim = rows.shape[0] // n_heads
    return (rows.reshape(n_heads, head_dim // 2, 2, *rows.shape[1:]).transpose(1, 2)
            .reshape(rows.shape).contiguous())


def _heads_of(hf_name: str, config: ModelConfig) -> int:
    """Heads whose rows a ``llama`` export permutes in this tensor (0: none)."""
    if ".self_attn.q_proj." in hf_name:
        return config.n_heads
    if ".self_attn.k_proj." in hf_name:
        return config.kv_heads
    return 0


def gguf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig, *,
                    extra_token_rows: int = 0) -> dict[str, torch.Tensor]:
    """Our plain state dict (no LoRA, not quantized) as float32 tensors under GGUF's names.

    ``extra_token_rows``: rows appended to the token embedding and the output matrix for tokens
    the file's vocabulary adds after ours (:mod:`.vocab`: the end-of-text token of a ``char``
    vocabulary). Each is the mean of the matrix's rows: as an output row its logit is the mean
    of the real logits, never above the largest, so greedy decoding never picks it.
    """
    import gguf

    check_gguf_exportable(config)
    architecture = gguf_architecture(config)
    hf_state = to_hf_state_dict(state, config)  # fused rows split; StableLM's zero norm biases
    lm_head = TOP_LEVEL_KEYS["lm_head.weight"]
    if architecture == STABLELM and lm_head not in hf_state:  # stablelm has no tied output
        hf_state[lm_head] = hf_state[TOP_LEVEL_KEYS["tok_emb.weight"]].clone()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], config.n_layers)
    out: dict[str, torch.Tensor] = {}
    for hf_name, tensor in hf_state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AssertionError(f"gguf has no name for {hf_name}")
        tensor = tensor.detach().to(torch.float32)
        heads = _heads_of(hf_name, config) if architecture == LLAMA else 0
        if heads:
            tensor = rope_permute(tensor, heads)
        if extra_token_rows and name in (TOKEN_EMBD, OUTPUT):
            tensor = torch.cat([tensor, tensor.mean(dim=0, keepdim=True).expand(extra_token_rows, -1)])
        out[name] = tensor.contiguous()
    return out
