r"""LoRA: low-rank adapters on the Transformer's Linear layers, trained while the base stays frozen.

A targeted ``nn.Linear`` (or a quantized linear, for QLoRA) is wrapped by :class:`LoRALinear`::

             x (B, T, in)
             |
      +------+--------------------+
      |                           |
      |                      dropout(x)
      |                           |
      |                     +-----------+
      |                     |  A (r,in) |   kaiming-uniform init, trainable
      |                     +-----------+
      |                           |  (B, T, r)
  +--------+                +-----------+
  |  W     |  frozen        |  B (out,r)|   zeros init, trainable
  +--------+                +-----------+
      |                           |
      |                      * alpha / r
      |                           |
      +------------(+)------------+
                    |
              y (B, T, out)

Because B starts at zero, a freshly wrapped model computes exactly what the base did. Only A and
B train (``rank * (in + out)`` numbers per layer instead of ``in * out``); :func:`merge_lora`
folds ``B @ A * alpha / r`` into W afterwards, so a merged model runs at the base's speed.

Targets, by name inside each block: ``attention`` = ``attn.qkv`` (the fused q, k, v projection)
and ``attn.proj``; ``ffn`` = ``ffn.gate_up`` (fused gate and up; ``ffn.up`` in the non-gated
``activation: relu2`` MLP) and ``ffn.down``. The LM head
is never targeted: it is tied to the embedding by default, and an adapter there would have to
untie it to merge.

Adapters are saved apart from the base: ``adapter.safetensors`` (the A and B matrices) and
``adapter.json`` (rank, alpha, dropout, targets, and a fingerprint of the base: the hash of its
architecture, of its layer shapes and of its weights), so an adapter is refused on a base it was
not trained on. The weights are left out of the check where either side is quantized (QLoRA
trains on a quantized base, and its adapter belongs to the full-precision checkpoint too).

LoRA is applied to the model from outside, like quantization: the model never imports this
module, and this module does not import ``quantize`` either (a QLoRA run stacks the two). It
knows quantized layers by duck typing (``in_features``/``out_features``), so either can be
applied first and neither has to know the other's classes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .atomic import atomic_write_text
from .errors import UserError
from .safetensors_io import read_safetensors, write_safetensors
from .weights import architecture, model_fingerprint, tied_names

ADAPTER_WEIGHTS_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter.json"
ADAPTER_FORMAT_VERSION = 1

# Which Linear layers of a block each target names (attribute paths inside ``blocks[i]``). A
# block has ``ffn.gate_up`` (SwiGLU) or ``ffn.up`` (relu2), never both: the one it has is targeted.
TARGET_LAYERS: dict[str, tuple[str, ...]] = {
    "attention": ("attn.qkv", "attn.proj"),
    "ffn": ("ffn.gate_up", "ffn.up", "ffn.down"),
}


@dataclass
class LoRASettings:
    """What an adapter was built with; saved in ``adapter.json``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention"])

    @classmethod
    def from_advanced(cls, advanced: Any) -> "LoRASettings":
        """From an :class:`~mini_transformer.config.AdvancedConfig` (``lora_*`` keys)."""
        return cls(rank=advanced.lora_rank, alpha=advanced.lora_alpha, dropout=advanced.lora_dropout,
                   targets=list(advanced.lora_targets))


# -- the layer -------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """``y = base(x) + dropout(x) @ A^T @ B^T * (alpha / rank)``; ``base`` is frozen.

    ``base`` is an ``nn.Linear`` or any module with ``in_features``/``out_features`` that maps
    (..., in) to (..., out), such as the quantized linears of :mod:`mini_transformer.quantize`.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise UserError(f"LoRA rank must be positive, got {rank}; 8 or 16 is typical")
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = _factory_kwargs(base)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        # The same init as nn.Linear (and litgpt/peft): A random, B zero, so the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T  # (..., out)
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The weight update ``B @ A * scaling``, (out, in), computed in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """The base Linear with the update folded in (the base module is updated in place)."""
        base = self.base
        if type(base) is not nn.Linear:  # bitsandbytes layers subclass nn.Linear but hold int8/4-bit data
            raise UserError(f"cannot merge a LoRA adapter into a {type(base).__name__} base (a quantized "
                            "model); merge into the full-precision base, then quantize the merged model")
        with torch.no_grad():
            base.weight.add_(self.delta_weight().to(base.weight.dtype))
        return base

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, dropout={self.dropout_p:g}")


def _factory_kwargs(base: nn.Module) -> dict[str, Any]:
    """Adapters live on the base's device, in its floating dtype (fp32 for a quantized base)."""
    weight = getattr(base, "weight", None)
    device = weight.device if isinstance(weight, torch.Tensor) else None
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return {"device": device, "dtype": weight.dtype}
    return {"device": device, "dtype": torch.float32}


# -- applying, counting, merging ---------------------------------------------------------------

def target_names(model: nn.Module, targets: Iterable[str] = ("attention",)) -> list[str]:
    """Fully qualified names of the layers the targets select, e.g. ``blocks.0.attn.qkv``."""
    targets = list(targets)
    unknown = [t for t in targets if t not in TARGET_LAYERS]
    if unknown or not targets:
        raise UserError(f"unknown LoRA target {unknown[0] if unknown else '(none)'}; "
                        f"use one or more of {', '.join(TARGET_LAYERS)}")
    paths = [p for t in TARGET_LAYERS if t in targets for p in TARGET_LAYERS[t]]  # each layer once
    return [f"blocks.{i}.{path}" for i, block in enumerate(model.blocks) for path in paths
            if _has_submodule(block, path)]


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Iterable[str] = ("attention",)) -> nn.Module:
    """Wrap the targeted layers in :class:`LoRALinear` and freeze everything else. Returns ``model``.

    Every base parameter (embedding, norms, LM head included) gets ``requires_grad=False``, so an
    optimizer built from ``p.requires_grad`` parameters trains the adapters alone.
    """
    if lora_layers(model):
        raise UserError("this model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    names = target_names(model, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        if not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            raise TypeError(f"{name} is a {type(base).__name__}, not a Linear layer")
        model.set_submodule(name, LoRALinear(base, rank, alpha, dropout), strict=True)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_settings(model: nn.Module) -> Optional[LoRASettings]:
    """The settings the model's adapters were built with (None without adapters)."""
    layers = lora_layers(model)
    if not layers:
        return None
    first = next(iter(layers.values()))
    names = set(layers)
    targets = [t for t in TARGET_LAYERS if any(n.endswith(p) for n in names for p in TARGET_LAYERS[t])]
    return LoRASettings(rank=first.rank, alpha=first.alpha, dropout=first.dropout_p, targets=targets)


def lora_parameter_counts(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, trainable / total), for printing. Tied weights count once (as
    ``parameters()`` yields them).

    A quantized base layer counts its logical ``in * out`` weights, though they are buffers.
    """
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    for module in model.modules():
        if _is_quantized_linear(module):
            total += module.in_features * module.out_features
    return trainable, total, trainable / max(total, 1)


def _is_quantized_linear(module: nn.Module) -> bool:
    """A linear-like layer whose weights are not parameters (an Int8Linear/Int4Linear)."""
    return (not isinstance(module, (nn.Linear, LoRALinear)) and hasattr(module, "in_features")
            and hasattr(module, "out_features") and not any(True for _ in module.parameters(recurse=False)))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back. Returns ``model``.

    The merged layers' weights stay frozen as they were; call ``requires_grad_(True)`` to train on.
    """
    for name, layer in lora_layers(model).items():
        model.set_submodule(name, layer.merged(), strict=True)
    return model


# -- adapter state -----------------------------------------------------------------------------

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: ``{"blocks.0.attn.qkv.lora_A": (r, in), ...lora_B: (out, r)}``."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model's LoRA layers; names and shapes must match exactly."""
    layers = lora_layers(model)
    expected = {f"{n}.{p}": getattr(layer, p) for n, layer in layers.items() for p in ("lora_A", "lora_B")}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        which = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise UserError(f"adapter does not fit this model's LoRA layers ({which}); "
                        "apply LoRA with the adapter's targets before loading it")
    for key, param in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise UserError(f"adapter tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(param.shape)}; the adapter was built with another rank or base")
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))


# -- the base's fingerprint --------------------------------------------------------------------

def base_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Logical weight shapes of the base, by the names of a plain model.

    Names ignore LoRA wrapping (``qkv.base`` -> ``qkv``) and quantization (an Int4Linear reports
    (out, in)), so an adapter trained on a quantized base (QLoRA) fits the full-precision base.
    """
    wrapped = {f"{name}.base": name for name in lora_layers(model)}
    shapes: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            continue
        clean = wrapped.get(name, name)
        if hasattr(module, "num_embeddings"):  # nn.Embedding or a quantized embedding
            shapes[clean] = [module.num_embeddings, module.embedding_dim]
        elif hasattr(module, "in_features") and hasattr(module, "out_features"):
            shapes[clean] = [module.out_features, module.in_features]
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
            shapes[clean] = list(module.weight.shape)
    return shapes


def base_fingerprint(model: nn.Module) -> dict[str, str]:
    """``{"config_hash": ..., "shapes_hash": ...}`` of the base model (adapters excluded).

    ``config_hash`` is :func:`~mini_transformer.weights.model_fingerprint`, the value a
    checkpoint's ``checkpoint.json`` records; the key keeps the name adapters have always had.
    """
    shapes = json.dumps(base_shapes(model), sort_keys=True)
    return {"config_hash": model_fingerprint(model.config),
            "shapes_hash": hashlib.sha256(shapes.encode()).hexdigest()[:16]}


def base_weights_hash(model: nn.Module) -> Optional[str]:
    """sha256 of the base's weights (names, shapes, values rounded to bf16), adapters excluded.

    Rounded to bf16 so that the fp32 checkpoint and its bf16 copy hash alike. None for a
    quantized base, whose integer weights are not those of the checkpoint it came from. A weight
    shared by two names (tied embeddings) is hashed once.
    """
    aliases = tied_names(model)
    state = {}
    for name, tensor in model.state_dict().items():
        if name in aliases or name.endswith((".lora_A", ".lora_B")):
            continue
        if not tensor.is_floating_point():
            return None
        state[name.replace(".base.", ".")] = tensor  # a LoRA-wrapped layer's base: the plain name
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        data = tensor.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{name}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy())  # raw bytes: numpy has no bf16
    return digest.hexdigest()[:16]


# -- saving and loading adapters -----------------------------------------------------------------

def save_adapter(directory: str | os.PathLike, model: nn.Module, settings: Optional[LoRASettings] = None,
                 fingerprint: Optional[dict[str, str]] = None, weights_hash: Optional[str] = None) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` into ``directory`` (each atomically).

    ``settings``, ``fingerprint`` and ``weights_hash`` default to those of ``model`` (a trainer
    saving often passes the frozen base's hash, computed once). The weights file is written
    first, so ``adapter.json`` (what :func:`load_adapter` reads first) only names complete weights.
    """
    directory = Path(directory)
    settings = settings or lora_settings(model)
    if settings is None:
        raise UserError("the model has no LoRA adapters to save; enable advanced.use_lora")
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    meta = {
        "format_version": ADAPTER_FORMAT_VERSION,
        "lora": asdict(settings),
        "base": fingerprint or base_fingerprint(model),
        "base_architecture": architecture(model.config),
        "base_shapes": base_shapes(model),
        "base_weights_hash": weights_hash or base_weights_hash(model),
    }
    write_safetensors(directory / ADAPTER_WEIGHTS_FILE, tensors, {"format": "mini-transformer-lora"})
    atomic_write_text(directory / ADAPTER_CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter.json`` of an adapter directory."""
    path = Path(directory) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path} not found; pass the directory that finetune wrote the adapter to")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        LoRASettings(**meta["lora"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a valid adapter config ({exc}); "
                        "re-run finetune to write it again") from None
    return meta


def load_adapter(directory: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load an adapter into ``model`` (applying LoRA first if it has none). Returns ``model``.

    Raises :class:`UserError` if the adapter was trained on a base of another architecture or
    other layer shapes, or if the model already has adapters built with other settings.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    check_adapter_base(meta, model)
    settings = LoRASettings(**meta["lora"])
    current = lora_settings(model)
    if current is None:
        apply_lora(model, settings.rank, settings.alpha, settings.dropout, settings.targets)
    elif (current.rank, sorted(current.targets)) != (settings.rank, sorted(settings.targets)):
        raise UserError(f"the model's adapters (rank {current.rank}, {'+'.join(current.targets)}) differ from "
                        f"the saved ones (rank {settings.rank}, {'+'.join(settings.targets)}); "
                        "load into a model without adapters")
    state = read_safetensors(directory / ADAPTER_WEIGHTS_FILE, "adapter weights", "re-run finetune")
    load_lora_state_dict(model, state)
    return model


def check_adapter_base(meta: dict[str, Any], model: nn.Module) -> None:
    """Raise a one-line :class:`UserError` naming the first difference if the bases differ."""
    saved, current = meta.get("base", {}), base_fingerprint(model)
    if saved == current:
        saved_weights = meta.get("base_weights_hash")  # absent in adapters of older versions
        current_weights = base_weights_hash(model) if saved_weights else None
        if current_weights is not None and current_weights != saved_weights:
            raise UserError(f"adapter was trained on other weights of this architecture (base weights "
                            f"{saved_weights} vs {current_weights}); load it onto the checkpoint it was "
                            "fine-tuned from")
        return
    detail = _first_difference(meta.get("base_architecture", {}), architecture(model.config))
    if detail is None:
        detail = _first_difference(meta.get("base_shapes", {}), base_shapes(model)) or \
            f"fingerprint {saved.get('config_hash')} vs {current['config_hash']}"
    raise UserError(f"adapter was trained on a different base: {detail}; "
                    "load it onto the checkpoint it was fine-tuned from")


def _first_difference(saved: dict[str, Any], current: dict[str, Any]) -> Optional[str]:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"{key} {saved.get(key)} (adapter) vs {current.get(key)} (this model)"
    return None
