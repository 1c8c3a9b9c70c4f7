"""Import a Hugging Face Llama-family directory as a model of ours, exactly or not at all.

Accepted: ``LlamaForCausalLM`` (MHA/GQA/MQA, tied or untied head, any ``rope_theta``,
``rms_norm_eps`` and vocabulary size, biases on every projection or on none) and
``StableLmForCausalLM`` as our export writes it (full rotary, sequential residual, no q/k norms,
no q/k/v-only bias, zero LayerNorm biases). A config that asks for anything our model does not
compute (RoPE scaling, a sliding window, another activation, biases on some projections only,
a head size other than ``hidden_size / num_attention_heads``, quantized weights, ...) is
refused in one line naming the setting: nothing is imported that would compute another function.

Weights come from ``model.safetensors`` or the shards that ``model.safetensors.index.json``
lists; ``pytorch_model.bin`` is refused (loading it would unpickle). The names and the fused
rows follow :mod:`.layout`. Memory: the model is built on the meta device and given the tensors
themselves (``assign``); each HF tensor is copied out of a memory map that is closed at once, and
the pieces of a fused ``qkv``/``gate_up`` are joined and dropped one weight at a time, so the
peak is about one copy of the model (measured in BENCHMARKS.md), not two.

The tokenizer is the directory's ``tokenizer.json`` (:func:`.tokenizer.load_hf_tokenizer`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from ...checkpoint import check_output_directory, load_weights_into, save_inference_checkpoint
from ...config import Config, ModelConfig, default_ffn_hidden_size
from ...errors import SettingError, UserError, first_line
from ...model import Transformer
from ...tokenizer import Tokenizer
from .layout import (GENERATION_CONFIG_FILE, HF_CONFIG_FILE, HF_WEIGHTS_FILE, HF_WEIGHTS_INDEX_FILE, LLAMA,
                     MODEL_TYPE, NORM_EPS_KEY, STABLELM, TOP_LEVEL_KEYS, from_hf_state_dict)
from .tokenizer import (HF_SPECIAL_TOKENS_MAP_FILE, HF_TOKENIZER_CONFIG_FILE, HF_TOKENIZER_FILE, load_hf_tokenizer,
                        read_json_object)

ACCEPTED = "LlamaForCausalLM, or StableLmForCausalLM with full rotary and a sequential residual"
# hidden_act values that are SiLU in transformers' ACT2FN.
SILU = ("silu", "swish")
# What each class assumes for a key that config.json leaves out (their config classes' defaults).
DEFAULTS: dict[str, dict[str, Any]] = {
    LLAMA: {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "partial_rotary_factor": 1.0},
    # StableLmConfig's partial_rotary_factor defaults to 0.25: absent means partial rotary.
    STABLELM: {"layer_norm_eps": 1e-5, "tie_word_embeddings": False, "partial_rotary_factor": 0.25},
}
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings")
# Config keys asking for something this model does not compute (refused unless absent, null or
# false) -> why.
UNSUPPORTED: dict[str, str] = {
    "quantization_config": "the weights are quantized; import the full-precision model",
    "sliding_window": "attention over a window; this model attends to the whole context",
    "use_sliding_window": "attention over a window; this model attends to the whole context",
    "qk_layernorm": "this model has no norms on q and k",
    "use_parallel_residual": "this model adds attention and MLP one after the other",
}
# ORG/NAME on the Hugging Face Hub.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# -- recognising and reading a directory --------------------------------------------------------

def is_hf_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model directory: a ``config.json`` that names
    ``architectures`` (our checkpoints have ``config.yaml`` instead)."""
    config_file = Path(path) / HF_CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        return "architectures" in read_json_object(config_file)
    except (UserError, OSError):
        return False


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The directory's ``config.json`` as a dict."""
    if not Path(directory).is_dir():
        raise UserError(f"Hugging Face model directory {str(directory)!r} not found; check the path")
    path = Path(directory) / HF_CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{directory} has no {HF_CONFIG_FILE}; it is not a Hugging Face model directory")
    return read_json_object(path)


# -- config: refuse what we do not compute, map the rest -------------------------------------------

def architecture_of(hf: Mapping[str, Any], source: str) -> str:
    """``LlamaForCausalLM`` or ``StableLmForCausalLM``; anything else is refused."""
    architectures = hf.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise UserError(f"{source}: architectures is {architectures!r}; importable: {ACCEPTED}")
    architecture = architectures[0]
    if architecture not in MODEL_TYPE:
        raise UserError(f"{source}: architecture {architecture} is not supported; importable: {ACCEPTED}")
    model_type = hf.get("model_type", MODEL_TYPE[architecture])
    if model_type != MODEL_TYPE[architecture]:
        raise UserError(f"{source}: model_type {model_type!r} does not match architecture {architecture} "
                        f"(expected {MODEL_TYPE[architecture]!r}); the config is inconsistent: fix model_type in "
                        f"{HF_CONFIG_FILE} or download the model again")
    return architecture


def _refuse(source: str, setting: str, value: Any, why: str) -> UserError:
    return UserError(f"{source}: {setting}={json.dumps(value)} is not supported ({why}); nothing was imported")


def _rope(hf: Mapping[str, Any], architecture: str, source: str) -> float:
    """``rope_theta`` of plain (unscaled, full) RoPE; any other RoPE is refused.

    transformers 4.x writes ``rope_theta`` and ``rope_scaling`` at the top level, 5.x a
    ``rope_parameters`` dict (``rope_type``, ``rope_theta``, perhaps ``partial_rotary_factor``);
    a ``rope_scaling`` wins over ``rope_parameters`` there, as it does here.
    """
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        raise _refuse(source, "rope_scaling", scaling, "this model computes plain RoPE only")
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise _refuse(source, "rope_parameters", params, "RoPE per layer type; this model has one plain RoPE")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise _refuse(source, "rope_parameters.rope_type", rope_type, "this model computes plain RoPE only")
    factor = params.get("partial_rotary_factor",
                        hf.get("partial_rotary_factor", DEFAULTS[architecture]["partial_rotary_factor"]))
    if factor != 1:
        raise _refuse(source, "partial_rotary_factor", factor, "this model rotates every dimension of a head")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 0:
        raise _refuse(source, "rope_theta", theta, "it must be a positive number")
    return float(theta)


def _bias(hf: Mapping[str, Any], architecture: str, source: str) -> bool:
    """Whether every projection has a bias (``True``) or none (``False``); a mix is refused."""
    if architecture == STABLELM:
        if hf.get("use_qkv_bias", False):
            raise _refuse(source, "use_qkv_bias", True, "a bias on q/k/v only; this model has a bias on "
                          "every projection or on none")
        return False
    attention, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention != mlp:
        raise _refuse(source, "attention_bias", attention, f"with mlp_bias={json.dumps(mlp)}: biases on some "
                      "projections only; this model has a bias on every projection or on none")
    return attention


def _positive_int(hf: Mapping[str, Any], key: str, source: str) -> int:
    value = hf.get(key)
    if value is None:
        raise UserError(f"{source} has no {key}; the config is incomplete: download the model again")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{source}: {key}={json.dumps(value)} must be a positive integer; the config is damaged: "
                        "download the model again")
    return value


def model_config_from_hf(hf: Mapping[str, Any], source: str = HF_CONFIG_FILE, *,
                         block_size: Optional[int] = None) -> ModelConfig:
    """Our :class:`ModelConfig` computing exactly what ``hf`` (a ``config.json``) describes.

    ``block_size`` (default ``max_position_embeddings``) is the context length we allow: RoPE
    depends on the position only, so a shorter one computes the same function on what it accepts;
    a longer one (positions the model was never trained on) is refused.
    Dropout is 0: HF's dropouts (``attention_dropout``, ``hidden_dropout``) act in training only,
    and a training run sets its own.
    """
    architecture = architecture_of(hf, source)
    for key, why in UNSUPPORTED.items():
        if hf.get(key) is not None and hf[key] is not False:
            raise _refuse(source, key, hf[key], why)
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(kind != "full_attention" for kind in layer_types):
        raise _refuse(source, "layer_types", sorted(set(layer_types)), "every layer here attends to the whole context")
    act = hf.get("hidden_act", "silu")
    if act not in SILU:
        raise _refuse(source, "hidden_act", act, "this model's MLP is SwiGLU, with silu")
    rope_base = _rope(hf, architecture, source)
    bias = _bias(hf, architecture, source)
    tie = hf.get("tie_word_embeddings", DEFAULTS[architecture]["tie_word_embeddings"])
    if not isinstance(tie, bool):
        raise _refuse(source, "tie_word_embeddings", tie, "it must be true or false")

    vocab, d_model, hidden, n_layers, n_heads, max_positions = (_positive_int(hf, key, source) for key in SHAPE_KEYS)
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    if not isinstance(n_kv_heads, int) or n_heads % n_kv_heads:
        raise _refuse(source, "num_key_value_heads", n_kv_heads, f"it must divide num_attention_heads ({n_heads})")
    if d_model % n_heads:
        raise _refuse(source, "num_attention_heads", n_heads, f"it must divide hidden_size ({d_model})")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != d_model // n_heads:
        raise _refuse(source, "head_dim", head_dim, f"this model's heads are hidden_size / num_attention_heads = "
                      f"{d_model // n_heads} wide")
    eps_key = NORM_EPS_KEY[architecture]
    eps = hf.get(eps_key, DEFAULTS[architecture][eps_key])
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise _refuse(source, eps_key, eps, "it must be a positive number")
    if block_size is not None and block_size <= 0:
        raise SettingError(f"block_size must be positive, got {block_size}", setting="block_size")
    if block_size is not None and block_size > max_positions:
        raise SettingError(f"block_size {block_size} is longer than the model's context (max_position_embeddings "
                           f"{max_positions} in {source}); use at most {max_positions}", setting="block_size")
    init_std = hf.get("initializer_range", 0.02)
    return ModelConfig(
        vocab_size=vocab, d_model=d_model, n_heads=n_heads,
        # The defaults' own form (None) where the value is what the default gives.
        n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
        ffn_hidden_size=None if hidden == default_ffn_hidden_size(d_model) else hidden,
        n_layers=n_layers, block_size=block_size or max_positions, dropout=0.0,
        norm="rmsnorm" if architecture == LLAMA else "layernorm", norm_eps=float(eps), rope_base=rope_base,
        tie_embeddings=tie, bias=bias,
        init_std=float(init_std) if isinstance(init_std, (int, float)) and init_std >= 0 else 0.02,
    )


# -- weights ---------------------------------------------------------------------------------------

class HFWeights(Mapping[str, torch.Tensor]):
    """The tensors of an HF directory's safetensors file(s), by HF name, each read when asked for.

    Reading a tensor opens its file memory-mapped, copies the tensor out (cast to ``dtype`` if
    given) and closes the map. Pages read through a map stay resident as long as it is open, so
    one map held over the whole import would add the file's size to the peak; this way the peak
    is what the caller keeps. Each read gives a new tensor: read a name once.
    """

    def __init__(self, directory: str | os.PathLike, dtype: Optional[torch.dtype] = None):
        self.directory = Path(directory)
        self.dtype = dtype
        self._file_of: dict[str, Path] = {}
        for path in _weight_files(self.directory):
            for name in _open(path, lambda f: list(f.keys())):
                if name in self._file_of:
                    raise UserError(f"{self.directory}: weight {name} is in both {self._file_of[name].name} and "
                                    f"{path.name}; the directory is damaged: download the model again")
                self._file_of[name] = path

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._file_of[name]

        def read(f) -> torch.Tensor:
            tensor = f.get_tensor(name)
            return tensor.to(self.dtype or tensor.dtype, copy=True)

        return _open(path, read)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of  # without reading the tensor, as Mapping's default would

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding the weights: the index's shards, or ``model.safetensors``."""
    index = directory / HF_WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(read_json_object(index)["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is damaged (no valid weight_map); re-download or re-save the model") from None
        files = [directory / name for name in names]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise UserError(f"{directory} lacks the shard {missing[0]} that {HF_WEIGHTS_INDEX_FILE} lists; "
                            "the download is incomplete: download the model again")
        return files
    single = directory / HF_WEIGHTS_FILE
    if single.is_file():
        return [single]
    if any(directory.glob("pytorch_model*.bin")):
        raise UserError(f"{directory} has pytorch_model.bin but no model.safetensors, and a .bin file is a pickle "
                        "that we never load; convert it with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
                        ".save_pretrained(NEW_DIR) (safetensors is its default)")
    raise UserError(f"{directory} has no {HF_WEIGHTS_FILE} (or {HF_WEIGHTS_INDEX_FILE}); "
                    "the directory holds no weights: download them (model.safetensors) into it")


def _open(path: Path, use):
    """``use(handle)`` on the safetensors file ``path``, open only for that call."""
    try:
        with safe_open(path, framework="pt") as handle:
            return use(handle)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"weights {path} are corrupt ({first_line(exc)}); re-download or re-save the model") from None


def read_hf_weights(directory: str | os.PathLike, config: ModelConfig,
                    dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The directory's weights under our names, fused rows joined (:func:`.layout.from_hf_state_dict`).

    Floating-point tensors are cast to ``dtype``, or, when the file mixes precisions, to the
    widest of them (exact; narrowing would not be).
    """
    weights = HFWeights(directory, dtype)
    state = from_hf_state_dict(weights, config)
    # A tied config with its own, different head in the file: transformers 4.x ties (the head is
    # the embedding), 5.x unties and uses the file's head. Two readings: refused.
    head = TOP_LEVEL_KEYS["lm_head.weight"]
    if config.tie_embeddings and head in weights and not torch.equal(weights[head], state["tok_emb.weight"]):
        raise UserError(f"{directory}: tie_word_embeddings=true but the weights hold a {head} that differs "
                        "from the embedding, which transformers versions read differently; set "
                        "tie_word_embeddings to false in config.json to import the separate head")
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) > 1:
        widest = functools.reduce(torch.promote_types, dtypes)  # bf16 with fp16: fp32
        for name, tensor in state.items():
            if tensor.is_floating_point():
                state[name] = tensor.to(widest)
    return state


# -- the model, its config and tokenizer -------------------------------------------------------------

def read_hf_tokenizer(directory: str | os.PathLike, vocab_size: Optional[int] = None) -> Tokenizer:
    """The directory's ``tokenizer.json`` as a tokenizer of ours; its ids must fit ``vocab_size``."""
    tokenizer = load_hf_tokenizer(directory)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise UserError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                        f"{vocab_size} embedding rows; the tokenizer belongs to another model")
    return tokenizer


def load_hf_model(directory: str | os.PathLike, *, block_size: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None) -> tuple[Transformer, Config, Tokenizer]:
    """``(model, config, tokenizer)`` from a Hugging Face directory, on the CPU, in eval mode.

    The model is built on the meta device and takes the read tensors themselves; its dtype is
    the file's (or ``dtype``). ``block_size``: see :func:`model_config_from_hf`. A weight whose
    shape the config does not imply is refused, naming it (:func:`.checkpoint.load_weights_into`).
    """
    directory = Path(directory)
    model_config = hf_model_config(directory, block_size)
    config = Config(model=model_config)
    config.validate()
    tokenizer = read_hf_tokenizer(directory, model_config.vocab_size)  # before the slow part: fail fast
    state = read_hf_weights(directory, model_config, dtype)
    with torch.device("meta"):
        model = Transformer(model_config)
    model = model.to(next(iter(state.values())).dtype)  # on meta: no memory
    load_weights_into(model, state, directory, assign=True)
    model.eval()
    return model, config, tokenizer


def hf_model_config(directory: str | os.PathLike, block_size: Optional[int] = None) -> ModelConfig:
    """:func:`model_config_from_hf` of the directory's ``config.json``."""
    return model_config_from_hf(read_hf_config(directory), str(Path(directory) / HF_CONFIG_FILE),
                                block_size=block_size)


def hf_provenance(directory: str | os.PathLike) -> dict[str, Any]:
    """``checkpoint.json`` entries (:data:`.checkpoint.PROVENANCE_KEYS`) of a checkpoint made from
    this directory: where it came from, its class, and its context, which export writes back."""
    hf, source = read_hf_config(directory), str(Path(directory) / HF_CONFIG_FILE)
    return {"imported_from": str(directory), "hf_architecture": architecture_of(hf, source),
            "max_position_embeddings": _positive_int(hf, "max_position_embeddings", source)}


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, block_size: Optional[int] = None,
              dtype: Optional[torch.dtype] = None) -> Path:
    """Write the Hugging Face model in ``hf_dir`` as a checkpoint of ours (weights, config.yaml,
    tokenizer) at ``out_dir``, ready for generate, finetune, quantize, bench and export."""
    check_output_directory(out_dir, hf_dir)  # before reading gigabytes of weights
    model, config, tokenizer = load_hf_model(hf_dir, block_size=block_size, dtype=dtype)
    return save_inference_checkpoint(out_dir, model, config, tokenizer, source=hf_dir,
                                     extra_meta=hf_provenance(hf_dir))


# -- the Hub ----------------------------------------------------------------------------------------

def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` has the form ``ORG/NAME`` of a Hugging Face Hub repository."""
    return bool(REPO_ID.match(name))


def download_hf(repo_id: str) -> Path:
    """Download the files an import reads from the Hub (needs ``huggingface_hub`` and network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{repo_id} is not a local directory, and downloading it needs huggingface_hub "
                        "(pip install huggingface_hub); or download the model yourself and pass its directory") from None
    patterns = [HF_CONFIG_FILE, GENERATION_CONFIG_FILE, "model*.safetensors", HF_WEIGHTS_INDEX_FILE,
                HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG_FILE, HF_SPECIAL_TOKENS_MAP_FILE]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - network, authentication, unknown repository: all one line
        raise UserError(f"could not download {repo_id} from the Hugging Face Hub ({first_line(exc, 200)}); "
                        "check the name and your network, or download it yourself and pass its directory") from None
