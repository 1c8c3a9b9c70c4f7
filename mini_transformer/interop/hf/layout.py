"""The map between our model and Hugging Face's ``LlamaForCausalLM`` / ``StableLmForCausalLM``,
as data: the model's file names, which HF class holds which of our configs, the config keys, and
the weight names.

Both directions use these tables (export, and import of our own exports and of Llama models),
so a name is written in one place only (torchtitan's ``state_dict_adapter`` habit).

Weights. Our blocks fuse two projections that HF keeps apart: ``attn.qkv`` holds the rows
``[q: n_heads*head_dim | k: kv_heads*head_dim | v: kv_heads*head_dim]`` and ``ffn.gate_up`` the
rows ``[gate: hidden | up: hidden]``. Exporting splits those rows, importing concatenates them.
Nothing is permuted: our RoPE rotates halves (``x[..., :D/2]`` against ``x[..., D/2:]``) exactly
as HF's ``rotate_half`` does.

Which class. ``norm: rmsnorm`` is Llama (``attention_bias`` and ``mlp_bias`` for ``bias: true``:
every projection has a bias then, as ours). ``norm: layernorm`` is StableLM with full rotary
(``partial_rotary_factor`` 1.0), a sequential residual and no q/k norms; its LayerNorms always
have a bias, written as zeros when ours has none, and its ``o_proj`` and MLP never have one, so
``layernorm`` with ``bias: true`` has no exact HF class and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from ...config import ModelConfig
from ...errors import UserError

# The model's files in a Hugging Face directory (the tokenizer's are :mod:`.tokenizer`'s).
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # lists the shards of a sharded model
GENERATION_CONFIG_FILE = "generation_config.json"

LLAMA = "LlamaForCausalLM"
STABLELM = "StableLmForCausalLM"
# Our norm -> the HF class that holds it; the class's model_type and its norm-eps key.
ARCHITECTURE_OF_NORM = {"rmsnorm": LLAMA, "layernorm": STABLELM}
MODEL_TYPE = {LLAMA: "llama", STABLELM: "stablelm"}
NORM_EPS_KEY = {LLAMA: "rms_norm_eps", STABLELM: "layer_norm_eps"}

EXPORTABLE = ("norm: rmsnorm (LlamaForCausalLM, bias true or false) or norm: layernorm with bias: false "
              "(StableLmForCausalLM)")

# Whole-model weights: our name -> HF name.
TOP_LEVEL_KEYS: dict[str, str] = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "norm.bias": "model.norm.bias",
    "lm_head.weight": "lm_head.weight",
}

# Weights of block i: our name inside ``blocks.{i}`` -> the HF names inside ``model.layers.{i}``
# its rows are split into, in row order (one name: a plain rename). Llama and StableLM share them.
BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "attn_norm.bias": ("input_layernorm.bias",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.proj.weight": ("self_attn.o_proj.weight",),
    "attn.proj.bias": ("self_attn.o_proj.bias",),
    "ffn_norm.weight": ("post_attention_layernorm.weight",),
    "ffn_norm.bias": ("post_attention_layernorm.bias",),
    "ffn.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "ffn.gate_up.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "ffn.down.weight": ("mlp.down_proj.weight",),
    "ffn.down.bias": ("mlp.down_proj.bias",),
}

# Norm biases that StableLM always has and a model of ours with bias: false lacks (zeros there).
NORM_BIAS_KEYS = ("attn_norm.bias", "ffn_norm.bias")

# Buffers some HF checkpoints carry that hold no weights (recomputed from the config).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_architecture(config: ModelConfig) -> str:
    """The HF class name that holds ``config`` exactly (call :func:`check_exportable` first)."""
    return ARCHITECTURE_OF_NORM[config.norm]


def option_without_counterpart(config: ModelConfig) -> Optional[str]:
    """The first model option that neither Llama nor StableLM computes (in HF or llama.cpp), as
    ``key value``; None if there is none. ``zero_init_projections`` is only an initialisation.

    An export is exact or refused: Llama has no q/k norms (Qwen3 does), no logit softcap (Gemma 2
    does) and a gated MLP only.
    """
    if config.qk_norm:
        return "model.qk_norm true"
    if config.activation != "swiglu":
        return f"model.activation {config.activation}"
    if config.logit_softcap is not None:
        return f"model.logit_softcap {config.logit_softcap:g}"
    return None


def check_exportable(config: ModelConfig) -> None:
    """Raise a one-line :class:`UserError` unless an HF class computes exactly what ``config`` does.

    Dropout and the attention kernel do not change the function and are not checked.
    """
    if config.vocab_size is None:
        raise UserError("the model config has no vocab_size; export a trained checkpoint")
    option = option_without_counterpart(config)
    if option is not None:
        raise UserError(f"{option} has no Hugging Face class to export to (Llama and StableLM lack it); "
                        "export a model trained without it, or run this one with mini-transformer generate or serve")
    if config.norm not in ARCHITECTURE_OF_NORM:
        raise UserError(f"norm {config.norm!r} has no Hugging Face class; exportable: {EXPORTABLE}")
    if config.norm == "layernorm" and config.bias:
        raise UserError("norm: layernorm with bias: true has no exact Hugging Face class (StableLM has no "
                        f"bias on o_proj and the MLP); exportable: {EXPORTABLE}")


# -- config ----------------------------------------------------------------------------------------

def hf_config(config: ModelConfig, *, bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
              pad_token_id: Optional[int] = None, dtype: str = "float32",
              max_position_embeddings: Optional[int] = None) -> dict[str, Any]:
    """The ``config.json`` of the HF model equal to ``config``.

    ``max_position_embeddings`` defaults to ``block_size``; it may be longer (an imported model
    fine-tuned on shorter windows keeps its own context: RoPE depends on the position only, so
    the function is the same), never shorter.

    RoPE is written both ways transformers has read it: ``rope_parameters`` (5.x) and the older
    top-level ``rope_theta`` (and, for StableLM, ``partial_rotary_factor``), which 5.x folds into
    ``rope_parameters``. Token ids are written even when None: the classes' defaults (Llama's
    bos 1 / eos 2) would be wrong for our tokenizers.
    """
    check_exportable(config)
    if max_position_embeddings is not None and max_position_embeddings < config.block_size:
        raise ValueError(f"max_position_embeddings {max_position_embeddings} is below block_size {config.block_size}")
    architecture = hf_architecture(config)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rope_base)}
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": MODEL_TYPE[architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.hidden_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings or config.block_size,
        "initializer_range": config.init_std,
        NORM_EPS_KEY[architecture]: config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": float(config.rope_base),
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the key transformers 4.x reads
    }
    if architecture == LLAMA:
        out.update(head_dim=config.head_dim, attention_bias=config.bias, mlp_bias=config.bias,
                   pretraining_tp=1)
    else:
        rope["partial_rotary_factor"] = 1.0
        out.update(partial_rotary_factor=1.0, use_qkv_bias=False, qk_layernorm=False,
                   use_parallel_residual=False, hidden_dropout=0.0)
    return out


# -- weights ---------------------------------------------------------------------------------------

def row_splits(block_key: str, config: ModelConfig) -> list[int]:
    """Row counts of the HF tensors that our ``block_key`` (a :data:`BLOCK_KEYS` key) is split into."""
    n = len(BLOCK_KEYS[block_key])
    if n == 1:
        return []  # a plain rename
    if block_key.startswith("attn.qkv."):
        d = config.head_dim
        return [config.n_heads * d, config.kv_heads * d, config.kv_heads * d]
    if block_key.startswith("ffn.gate_up."):
        return [config.hidden_size, config.hidden_size]
    raise AssertionError(f"no row split known for {block_key}")


def hf_module_names(our_module: str) -> tuple[str, ...]:
    """HF module names (inside a layer) that our Linear ``our_module`` (``attn.qkv``) becomes."""
    return tuple(name.removesuffix(".weight") for name in BLOCK_KEYS[f"{our_module}.weight"])


def _expected_keys(config: ModelConfig) -> list[str]:
    """Our state-dict names for ``config`` (tied LM head left out: it is the embedding)."""
    norm_bias = config.norm == "layernorm" and config.bias  # RMSNorm has none
    top = ["tok_emb.weight", "norm.weight"] + (["norm.bias"] if norm_bias else [])
    if not config.tie_embeddings:
        top.append("lm_head.weight")
    block = [key for key in BLOCK_KEYS
             if not key.endswith(".bias") or (norm_bias if key in NORM_BIAS_KEYS else config.bias)]
    return top + [f"blocks.{i}.{key}" for i in range(config.n_layers) for key in block]


def _zero_norm_biases(config: ModelConfig) -> list[str]:
    """HF names of the StableLM LayerNorm biases that ours lacks (written as zeros)."""
    if config.norm != "layernorm" or config.bias:
        return []
    per_layer = [f"model.layers.{i}.{BLOCK_KEYS[key][0]}" for i in range(config.n_layers) for key in NORM_BIAS_KEYS]
    return [TOP_LEVEL_KEYS["norm.bias"], *per_layer]


def _hf_names(our_key: str) -> tuple[tuple[str, ...], Optional[str]]:
    """The HF names of one of our keys and, for a block key, its :data:`BLOCK_KEYS` entry."""
    if our_key in TOP_LEVEL_KEYS:
        return (TOP_LEVEL_KEYS[our_key],), None
    _, index, block_key = our_key.split(".", 2)
    return tuple(f"model.layers.{index}.{name}" for name in BLOCK_KEYS[block_key]), block_key


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our plain state dict (no LoRA, not quantized) under HF's names, fused rows split.

    Every tensor is its own contiguous copy (safetensors refuses tensors that share memory). A
    tied LM head is not written (``tie_word_embeddings`` ties it on loading).
    """
    check_exportable(config)
    unknown = sorted(set(state) - set(_expected_keys(config)) - {"lm_head.weight"})
    if unknown:
        raise ValueError(f"{unknown[0]} is not a weight of a plain model of this config (LoRA merged or "
                         "split off, not quantized?)")
    out: dict[str, torch.Tensor] = {}
    for key in _expected_keys(config):
        tensor = state[key]
        names, block_key = _hf_names(key)
        pieces = tensor.split(row_splits(block_key, config)) if len(names) > 1 else (tensor,)
        for name, piece in zip(names, pieces, strict=True):
            out[name] = piece.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    embedding = state["tok_emb.weight"]
    for name in _zero_norm_biases(config):
        out[name] = torch.zeros(config.d_model, dtype=embedding.dtype)
    return out


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF state dict (names as :func:`to_hf_state_dict` writes them) as ours, fused rows joined.

    StableLM's LayerNorm biases must be zero when ``config`` has ``bias: false`` (else the model
    would compute something else: refused). A tied config ignores an ``lm_head.weight`` in the
    file; an untied one needs it. Keys missing or left over raise a one-line :class:`UserError`.
    """
    check_exportable(config)
    used = set()
    out: dict[str, torch.Tensor] = {}
    for key in _expected_keys(config):
        names, _ = _hf_names(key)
        missing = [name for name in names if name not in hf_state]
        if missing:
            raise UserError(f"the Hugging Face weights lack {missing[0]}; the directory is incomplete or "
                            "of another architecture: download the model again, or import a Llama-like one")
        pieces = [hf_state[name] for name in names]
        out[key] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        used.update(names)
    for name in _zero_norm_biases(config):
        if name in hf_state:
            if torch.count_nonzero(hf_state[name]):
                raise UserError(f"{name} is not zero, and a model with bias: false has no LayerNorm bias; "
                                "this model cannot be imported exactly")
            used.add(name)
    if config.tie_embeddings:
        used.add(TOP_LEVEL_KEYS["lm_head.weight"])
    left = sorted(name for name in hf_state if name not in used and not name.endswith(IGNORED_HF_SUFFIXES))
    if left:
        raise UserError(f"the Hugging Face weights have {left[0]}, which the model does not; the config and "
                        "the weights disagree: download the model again")
    return out
