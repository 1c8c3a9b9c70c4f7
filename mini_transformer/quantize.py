r"""Weight-only int8 and int4 quantization, by swapping ``nn.Linear`` for a quantized module.

The gpt-fast shape: :func:`quantize_model` walks the model and replaces every ``nn.Linear`` with
an :class:`Int8Linear` or :class:`Int4Linear` holding the compact weights as buffers; the model
code does not change. Activations stay in floating point; only weights are compressed.

Schemes
-------
int8   symmetric, one scale per output channel (row): ``scale = max|w_row| / 127``,
       ``q = round(w / scale)`` in [-127, 127]; ``w ~ q * scale``. Error <= scale / 2.
int4   asymmetric (min-max), one (scale, zero) per group of ``group_size`` consecutive input
       columns of a row: ``scale = (max - min) / 15``, ``zero = min + 8 * scale`` and
       ``q = round((w - zero) / scale + 8)`` in [0, 15]; ``w ~ (q - 8) * scale + zero``. This is
       the "tinygemm" layout that PyTorch's int4 CPU kernel takes (a float zero point, not an
       integer one). Asymmetric because min-max uses all 16 levels on skewed groups; symmetric
       int4 wastes one level and most of the range of a one-sided group. Scale and zero are
       rounded to bf16 (as gpt-fast and torchao store them) before ``q`` is computed, so the
       error stays <= scale / 2 plus a bf16 rounding of the zero point.

Storage (what ``state_dict`` holds, and what safetensors saves)
-------
Int8Linear: ``weight`` int8 (out, in), ``scales`` (out,), ``bias`` or none.
Int4Linear: ``weight`` uint8 (out, in / 2): two 4-bit values a byte, the even input column in
the low nibble (portable, unlike the kernel's CPU-specific packing); ``scales`` and ``zeros``
(out, in / group_size), saved as bf16 (they are bf16 values), held in the model's float dtype.

The tied LM head and embedding
------------------------------
With weight tying (the default) ``lm_head.weight`` *is* ``tok_emb.weight``.
``include_embedding=False`` (default): both stay in full precision; only the blocks' linears are
quantized. The embedding is small next to the blocks (vocab 65 x 256 vs ~4.8M in the small
preset; it matters for BPE vocabularies: 50257 x 768 is a third of GPT-2 small).
``include_embedding=True``: the LM head is quantized once, and the embedding becomes a
:class:`QuantizedEmbedding` that looks rows up in *that same* quantized weight and dequantizes
only the rows it needs. One copy on disk and in memory; tying survives. Both schemes quantize
row-wise (an LM-head output row is an embedding row), so this fits without a second scheme.
An untied model gets its own quantized table for the embedding.

Kernels (measured with ``benchmarks/quantize.py`` on this 2-core AVX-512/AMX CPU, one thread)
-------
* bf16/fp16 activations, few rows (decode; B*T <= ``KERNEL_MAX_ROWS[mode]``): PyTorch's CPU
  kernels ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``. One token
  through a 2304x768 layer: 99 us for either, vs 160 us bf16 and 164 us fp32; a whole GPT-2-sized
  decode step: 28 ms int8, 22 ms int4 (16 ms with the embedding/head quantized) vs 39 ms bf16.
* Many rows (prefill, training): dequantize to the activation dtype, then one ``F.linear``. The
  kernels are GEMV-shaped (cost linear in rows): at 256 rows the int8 kernel takes 2.6x and the
  int4 kernel 1.6x the time of dequantize + bf16 matmul.
* fp32 activations: dequantize + ``F.linear``. The kernels in fp32 are 2-40x slower still, and
  casting activations to bf16 behind the caller's back would change the numerics the caller
  asked for. So fp32 int8/int4 saves memory, not time (decode ~1.9x slower than fp32 on the
  GPT-2 shape); run the model in bf16 (``dtype: auto`` on AMX CPUs) for the kernel speed.
* CUDA/MPS, an int4 layer whose out_features is not a multiple of 16 (the CPU kernel's rule,
  e.g. a 65-token LM head), or autograd through the input (QLoRA): dequantize + ``F.linear``.
* Optional bitsandbytes on CUDA (``backend="bitsandbytes"``, or ``"auto"`` when the model is on
  CUDA and the package imports): its Linear8bitLt / Linear4bit (nf4). Inference only, untested
  here (no CUDA); such a model can't be saved with :func:`save_quantized`.

An int4 layer using the CPU kernel also keeps the kernel's packing of its weight (built on the
first such call, 0.5 byte a weight), so int4 holds ~1 byte a weight in memory, 0.5 on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from .atomic import atomic_write_text
from .config import ModelConfig
from .errors import SettingError, UserError
from .model import Transformer
from .safetensors_io import read_safetensors, write_safetensors
from .weights import assign_weights, missing_weights, weights_state_dict

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 CPU kernel accepts
# Rows (B*T) up to which the CPU kernels beat dequantize + bf16 matmul (benchmarks/quantize.py:
# a kernel's cost grows linearly with rows, a matmul's much more slowly). int8 dequantizes
# cheaply, so its crossover comes early (16-32 rows); unpacking int4 costs 2-3x more (32-256).
KERNEL_MAX_ROWS = {"int8": 16, "int4": 64}
QUANTIZED_WEIGHTS_FILE = "model.safetensors"
QUANTIZATION_FILE = "quantization.json"
FORMAT_VERSION = 1
_FAST_DTYPES = (torch.bfloat16, torch.float16)


# -- int8: symmetric, per output channel -------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and fp32 scales (out,), ``w ~ q * scale``."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,); an all-zero row gets q = 0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(dtype) * scales.to(dtype)[:, None]  # (out, in)


# -- int4: asymmetric, group-wise along the input dimension -------------------------------------

def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> packed uint8 (out, in/2), scales and zeros (out, in/group) as bf16."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (out, groups)
    # Rounded to bf16 first (how they are stored), then q is computed against the rounded values.
    scales = ((hi - lo) / 15.0).clamp(min=1e-6).to(torch.bfloat16)
    zeros = (lo + 8.0 * scales.float()).to(torch.bfloat16)
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None] + 8.0).clamp_(0, 15)
    return pack_int4(q.to(torch.uint8).reshape(out_features, in_features)), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], (out, in) -> (out, in/2); even column in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., in/2) uint8 -> (..., in) uint8 in [0, 15]."""
    return _unpack_into(packed, torch.uint8)


def _unpack_into(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Nibbles written straight into the interleaved columns of a ``dtype`` tensor (..., in).

    Measured (benchmarks/quantize.py): 2-3x faster than stacking two nibble tensors, a 256-entry
    lookup table or a broadcast shift, because nothing is materialised twice.
    """
    out = torch.empty(*packed.shape, 2, dtype=dtype, device=packed.device)  # (..., in/2, 2)
    out[..., 0] = packed & 15
    out[..., 1] = packed >> 4
    return out.flatten(-2)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_int4`: (..., in/2) -> (..., in) in ``dtype``; rows may be gathered.

    ``(q - 8) * scale + zero`` computed as ``q * scale + (zero - 8 * scale)``, one fused multiply-add
    in place, with the offset formed in fp32.
    """
    q = _unpack_into(packed, dtype)  # (..., in)
    groups = q.shape[-1] // group_size
    q = q.view(*q.shape[:-1], groups, group_size)  # (..., groups, group)
    offset = (zeros.float() - 8.0 * scales.float()).to(dtype)  # (..., groups)
    return q.mul_(scales.to(dtype)[..., None]).add_(offset[..., None]).flatten(-2)


# -- the modules -------------------------------------------------------------------------------

class _QuantizedLinear(nn.Module):
    """Shared by the int8 and int4 linears: shape bookkeeping, bias, and the kernel dispatch."""

    mode: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: Optional[torch.device]):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # A buffer, not a Parameter: the quantized model is frozen (QLoRA trains adapters only).
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of this layer's scales: what it dequantizes to by default."""
        return self.scales.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in), N = B*T
        if self._kernel_applies(x2):
            y = self._kernel_mm(x2.contiguous())
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def _kernel_applies(self, x2: torch.Tensor) -> bool:
        return (x2.device.type == "cpu" and x2.dtype in _FAST_DTYPES
                and x2.shape[0] <= KERNEL_MAX_ROWS[self.mode]
                and not (torch.is_grad_enabled() and x2.requires_grad))  # the kernels have no backward

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        raise NotImplementedError

    def _kernel_mm(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantizedLinear):
    """``y = x @ (q * scale)^T + b`` with q int8 (out, in) and one scale per output row."""

    mode = "int8"
    group_size: Optional[int] = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "Int8Linear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, weight.dtype, weight.device)
        q, scales = quantize_int8(weight)
        layer.weight.copy_(q)
        layer.scales.copy_(scales)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales, dtype or self.dtype)  # (out, in)

    def dequantize_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (...) of the dequantized weight, (..., in): the quantized embedding lookup."""
        return self.weight[idx].to(self.dtype) * self.scales[idx][..., None]

    def _kernel_mm(self, x2: torch.Tensor) -> torch.Tensor:
        # (N, in) x int8 (out, in) -> (N, out); the kernel wants the scales in x's dtype.
        return torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(x2.dtype))


class Int4Linear(_QuantizedLinear):
    """``y = x @ W^T + b`` with W in 4-bit groups: ``W = (q - 8) * scale + zero`` per group."""

    mode = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        super().__init__(in_features, out_features, bias, dtype, device)
        check_group_size(group_size, {"layer": in_features})
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))
        self._kernel_cache: Optional[tuple[tuple, torch.Tensor, torch.Tensor]] = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    group_size: int = 128) -> "Int4Linear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, group_size, weight.dtype, weight.device)
        packed, scales, zeros = quantize_int4(weight, group_size)
        layer.weight.copy_(packed)
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_int4(self.weight, self.scales, self.zeros, self.group_size, dtype or self.dtype)

    def dequantize_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(self.weight[idx], self.scales[idx], self.zeros[idx], self.group_size, self.dtype)

    def _kernel_applies(self, x2: torch.Tensor) -> bool:
        return self.out_features % 16 == 0 and super()._kernel_applies(x2)  # the CPU kernel's N rule

    def _kernel_mm(self, x2: torch.Tensor) -> torch.Tensor:
        packed, scales_and_zeros = self._kernel_tensors(x2.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, scales_and_zeros)

    def _kernel_tensors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's packing of the weight and its (groups, out, 2) scales-and-zeros, cached.

        The key includes the buffers' versions, so a ``load_state_dict`` (an in-place copy)
        rebuilds them.
        """
        key = (dtype, self.weight.device, self.weight.data_ptr(), self.weight._version,
               self.scales._version, self.zeros._version)
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            q = _unpack_into(self.weight, torch.int32)  # (out, in), values 0..15
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)  # inner_k_tiles: unused on CPU
            scales_and_zeros = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous()
            self._kernel_cache = (key, packed, scales_and_zeros.to(dtype))  # (groups, out, 2)
        return self._kernel_cache[1], self._kernel_cache[2]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Scales and zeros are bf16 values (see quantize_int4): save them at 2 bytes, losslessly,
        # whatever float dtype the model runs in. load_state_dict's copy_ casts them back.
        for name in ("scales", "zeros"):
            destination[prefix + name] = destination[prefix + name].to(torch.bfloat16)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


QuantizedLinear = _QuantizedLinear  # for isinstance checks


class QuantizedEmbedding(nn.Module):
    """An embedding that dequantizes only the rows it looks up from a quantized (vocab, C) table.

    ``tied=True``: the table is the quantized LM head, owned (and saved) by ``lm_head``; this
    module holds a plain reference, so it adds no state-dict keys and no second copy.
    """

    def __init__(self, table: _QuantizedLinear, tied: bool):
        super().__init__()
        self.tied = tied
        if tied:
            self.__dict__["_tied_table"] = table  # bypasses nn.Module registration on purpose
        else:
            self.table = table
        self.num_embeddings = table.out_features
        self.embedding_dim = table.in_features

    @property
    def quantized_table(self) -> _QuantizedLinear:
        return self.__dict__["_tied_table"] if self.tied else self.table

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized copy of the table (vocab, C), for code written for ``nn.Embedding`` that
        reads ``.weight``. It costs a full dequantization: read the model's ``device``/``dtype``
        instead of this to learn those. Writing to it changes nothing.
        """
        return self.quantized_table.dequantize()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.quantized_table.dequantize_rows(idx)  # (B, T) -> (B, T, C)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.quantized_table.mode}, tied={self.tied}"


# -- validation -------------------------------------------------------------------------------

def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise UserError(f"unknown quantization mode {mode!r}; use int8 or int4")
    return mode


def check_group_size(group_size: int, widths: dict[str, int]) -> None:
    """``group_size`` must be one the kernel takes and divide every quantized layer's input width."""
    if group_size not in INT4_GROUP_SIZES:
        raise UserError(f"int4 group size {group_size} is not supported; use one of "
                        f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    for name, width in widths.items():
        if width % group_size:
            fits = [g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths.values())]
            problem = f"int4 group size {group_size} does not divide the input width {width} of {name}"
            if not fits:
                raise UserError(f"{problem}; no supported group size divides every width; use int8")
            raise SettingError(f"{problem}; use group size {max(fits)}", fixes=[{"group_size": str(max(fits))}])


def valid_group_sizes(model: nn.Module, include_embedding: bool = False) -> list[int]:
    """The int4 group sizes that fit every layer :func:`quantize_model` would quantize."""
    widths = {name: layer.in_features for name, layer in _layers_to_quantize(model, include_embedding)}
    return [g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths.values())]


# -- the handler ------------------------------------------------------------------------------

def quantize_model(model: nn.Module, mode: str, group_size: int = 128, include_embedding: bool = False,
                   backend: str = "auto") -> nn.Module:
    """Swap every ``nn.Linear`` (and optionally the embedding) for a quantized module; in place.

    Returns ``model``. Raises :class:`UserError` for an unknown mode, an int4 group size that
    doesn't divide a layer's input width, or a model that is already quantized. Nothing is
    changed when it raises. ``backend``: ``"auto"`` (ours; bitsandbytes when the model is on CUDA
    and the package imports), ``"native"`` or ``"bitsandbytes"``.
    """
    check_mode(mode)
    existing = quantization_meta(model)
    if existing is not None:
        raise UserError(f"the model is already quantized ({existing['mode']}); quantize the "
                        "full-precision checkpoint instead")
    layers = _layers_to_quantize(model, include_embedding)
    if mode == "int4":
        check_group_size(group_size, {name: layer.in_features for name, layer in layers})
    if _use_bitsandbytes(model, backend):
        return _quantize_bitsandbytes(model, mode, layers)

    def convert(linear: nn.Linear) -> _QuantizedLinear:
        if mode == "int8":
            return Int8Linear.from_weight(linear.weight, linear.bias)
        return Int4Linear.from_weight(linear.weight, linear.bias, group_size)

    with torch.no_grad():
        _swap(model, layers, include_embedding, convert)
    return model


def _layers_to_quantize(model: nn.Module, include_embedding: bool) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` by name, less a tied LM head when the embedding stays full precision."""
    tied_head = _tied_head(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
              and not (m is tied_head and not include_embedding)]
    if include_embedding and tied_head is None and isinstance(getattr(model, "tok_emb", None), nn.Embedding):
        emb = model.tok_emb
        layers.append(("tok_emb", _embedding_as_linear(emb)))
    return layers


def _tied_head(model: nn.Module) -> Optional[nn.Linear]:
    head, emb = getattr(model, "lm_head", None), getattr(model, "tok_emb", None)
    if isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding) and head.weight is emb.weight:
        return head
    return None


def _embedding_as_linear(emb: nn.Embedding) -> nn.Linear:
    """A Linear view of an embedding table (vocab, C): out_features = vocab, in_features = C."""
    linear = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
    linear.weight = emb.weight
    return linear


def _swap(model: nn.Module, layers: list[tuple[str, nn.Linear]], include_embedding: bool,
          convert: Callable[[nn.Linear], _QuantizedLinear]) -> None:
    tied_head = _tied_head(model)
    for name, linear in layers:
        quantized = convert(linear)
        if name == "tok_emb":  # an untied embedding gets its own quantized table
            model.set_submodule("tok_emb", QuantizedEmbedding(quantized, tied=False), strict=True)
            continue
        model.set_submodule(name, quantized, strict=True)
        if include_embedding and linear is tied_head:  # the embedding reads the head's table
            model.set_submodule("tok_emb", QuantizedEmbedding(quantized, tied=True), strict=True)


def quantization_meta(model: nn.Module) -> Optional[dict[str, Any]]:
    """``{"format_version", "mode", "group_size", "include_embedding", "backend"}``, or None.

    Read from the modules themselves, so it can't disagree with them.
    """
    layers = [m for m in model.modules() if isinstance(m, _QuantizedLinear)]
    bnb = [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")]
    if not layers and not bnb:
        return None
    if bnb:
        return {"format_version": FORMAT_VERSION, "mode": getattr(model, "_bnb_mode", "int8"),
                "group_size": None, "include_embedding": False, "backend": "bitsandbytes"}
    first = layers[0]
    return {"format_version": FORMAT_VERSION, "mode": first.mode,
            "group_size": first.group_size if first.mode == "int4" else None,
            "include_embedding": isinstance(getattr(model, "tok_emb", None), QuantizedEmbedding),
            "backend": "native"}


def is_quantized(model: nn.Module) -> bool:
    return quantization_meta(model) is not None


# -- building and storing quantized models ------------------------------------------------------

def build_quantized_model(config: ModelConfig, meta: dict[str, Any]) -> Transformer:
    """A ``Transformer`` with empty quantized layers laid out as ``meta`` says, ready for
    ``load_state_dict`` of a quantized state dict (the tied LM head appears once, as ``lm_head``).
    Built inside ``torch.device("meta")``, it takes no memory (see :func:`quantized_state_dict_to_model`).
    """
    mode = check_mode(meta.get("mode"))
    include_embedding = bool(meta.get("include_embedding", False))
    group_size = int(meta.get("group_size") or 128)
    model = Transformer(config)
    layers = _layers_to_quantize(model, include_embedding)
    if mode == "int4":
        check_group_size(group_size, {name: layer.in_features for name, layer in layers})

    def empty(linear: nn.Linear) -> _QuantizedLinear:
        bias = linear.bias is not None
        if mode == "int8":
            return Int8Linear(linear.in_features, linear.out_features, bias)
        return Int4Linear(linear.in_features, linear.out_features, bias, group_size)

    _swap(model, layers, include_embedding, empty)
    return model


def quantized_state_dict_to_model(config: ModelConfig, state: dict[str, torch.Tensor],
                                  meta: dict[str, Any]) -> Transformer:
    """Rebuild a quantized model from its state dict (:func:`~mini_transformer.weights.weights_state_dict`
    of a quantized model, as :func:`save_quantized` writes it). The model is built on the meta
    device and takes ``state``'s tensors themselves.
    """
    with torch.device("meta"):
        model = build_quantized_model(config, meta)
    expected = model.state_dict()
    missing = missing_weights(model, state)
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        which = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                 else f"{wrong_shape[0]} has shape {tuple(state[wrong_shape[0]].shape)}")
        raise UserError(f"quantized weights do not fit the model ({which}); the checkpoint's config "
                        "or quantization.json does not match its weights, re-run quantize")
    assign_weights(model, state)
    return model


def save_quantized(directory: str | os.PathLike, model: Transformer) -> Path:
    """Write ``model.safetensors`` (compact weights) and ``quantization.json`` into ``directory``.

    ``quantization.json`` holds the quantization meta and the model config; the same meta also
    goes in the safetensors header, so either file alone says the weights are quantized. Each
    file is written atomically, the weights first.
    """
    meta = quantization_meta(model)
    if meta is None:
        raise UserError("the model is not quantized; call quantize_model first")
    if meta["backend"] != "native":
        raise UserError("bitsandbytes-quantized models can't be saved; quantize with backend='native'")
    directory = Path(directory)
    header = {"quantization_meta": json.dumps(meta), "format": "mini-transformer-quantized"}
    write_safetensors(directory / QUANTIZED_WEIGHTS_FILE, weights_state_dict(model), header)
    record = {**meta, "model": dataclasses.asdict(model.config)}
    atomic_write_text(directory / QUANTIZATION_FILE, json.dumps(record, indent=2) + "\n")
    return directory


def read_quantization_meta(path: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The quantization meta of a directory (``quantization.json``, else the header of its
    ``model.safetensors``) or of a safetensors file; None when the weights are full precision.
    """
    path = Path(path)
    if path.is_dir():
        record = path / QUANTIZATION_FILE
        if record.is_file():
            try:
                return json.loads(record.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError(f"{record} is corrupt ({exc}); re-run quantize") from None
        path = path / QUANTIZED_WEIGHTS_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is corrupt, not a readable safetensors file ({exc}); use another checkpoint") from None
    text = header.get("quantization_meta")
    return json.loads(text) if text else None


def refuse_if_quantized(path: str | os.PathLike) -> None:
    """For a ``quantize`` command: a one-line UserError if the checkpoint is already quantized."""
    meta = read_quantization_meta(path)
    if meta is not None:
        group = f", group size {meta['group_size']}" if meta.get("group_size") else ""
        raise UserError(f"{path} is already quantized ({meta['mode']}{group}); quantize the "
                        "full-precision checkpoint it came from instead")


def load_quantized(directory: str | os.PathLike, config: Optional[ModelConfig] = None) -> Transformer:
    """Load a model written by :func:`save_quantized` (config from ``quantization.json`` if not given)."""
    directory = Path(directory)
    meta = read_quantization_meta(directory)
    if meta is None:
        raise UserError(f"{directory} holds no quantized model; run quantize first")
    if config is None:
        if "model" not in meta:
            raise UserError(f"{directory / QUANTIZATION_FILE} lacks the model config; pass the config")
        try:
            config = ModelConfig(**meta["model"])
        except TypeError as exc:
            raise UserError(f"{directory / QUANTIZATION_FILE} has a model config this version can't read "
                            f"({exc}); re-run quantize") from None
    state = read_safetensors(directory / QUANTIZED_WEIGHTS_FILE, "quantized weights", "re-run quantize")
    return quantized_state_dict_to_model(config, state, meta)


# -- optional: bitsandbytes on CUDA -------------------------------------------------------------

def _use_bitsandbytes(model: nn.Module, backend: str) -> bool:
    if backend not in ("auto", "native", "bitsandbytes"):
        raise UserError(f"unknown quantization backend {backend!r}; use auto, native or bitsandbytes")
    on_cuda = any(p.is_cuda for p in model.parameters())
    if backend == "native" or (backend == "auto" and not on_cuda):
        return False
    try:
        import bitsandbytes  # noqa: F401  (lazy: an optional CUDA-only dependency)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        if backend == "bitsandbytes":
            raise UserError("backend bitsandbytes needs `pip install bitsandbytes` and a CUDA device") from None
        return False
    if not on_cuda:
        raise UserError("backend bitsandbytes needs the model on a CUDA device; move it there or use native")
    return True


def _quantize_bitsandbytes(model: nn.Module, mode: str, layers: list[tuple[str, nn.Linear]]) -> nn.Module:
    """Linear8bitLt (LLM.int8) or Linear4bit (nf4) in place of each Linear; the embedding stays."""
    import bitsandbytes as bnb

    for name, linear in layers:
        if name == "tok_emb":
            continue
        device, bias = linear.weight.device, linear.bias is not None
        if mode == "int8":
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
            new.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, quant_type="nf4",
                                    compute_dtype=torch.bfloat16)
            new.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if bias:
            new.bias = nn.Parameter(linear.bias.data.cpu(), requires_grad=False)
        model.set_submodule(name, new.to(device), strict=True)  # .to(device) quantizes
    model._bnb_mode = mode
    return model
