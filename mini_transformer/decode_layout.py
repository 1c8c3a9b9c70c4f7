"""The decode layout: ``nn.Linear`` weights stored column-major, for one-row products on the CPU.

Why: ``F.linear(x, W)`` multiplies by ``W.t()``. With ``W`` stored row-major (out, in), as
PyTorch stores it, ``W.t()`` is a transposed view, and for the one-row inputs of decoding the
CPU kernel reads that layout well below memory bandwidth; with ``W`` stored column-major, the
same ``W.t()`` is a contiguous (in, out) matrix, which the kernel streams at close to full
bandwidth (BENCHMARKS.md: "The decode layout").

:func:`to_decode_layout` is an explicit conversion, done once, like quantization: each weight
keeps its shape (out, in), its values, its ``Parameter`` object (so tied weights stay tied) and
its state-dict key; only its memory layout changes, and the old copy is freed. Nothing else
differs: the model still trains (though its backward products are then slower) and saves
(checkpoint writers make tensors contiguous). It applies to float32 weights on the CPU; other
dtypes and devices, and quantized layers, keep their own kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _converts(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and weight.device.type == "cpu" and weight.dtype == torch.float32
            and not is_column_major(weight))


def is_column_major(weight: torch.Tensor) -> bool:
    """Whether a (out, in) matrix is stored as its contiguous transpose."""
    return weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


@torch.no_grad()
def to_decode_layout(model: nn.Module) -> nn.Module:
    """Store every CPU float32 ``nn.Linear`` weight of ``model`` column-major, in place; returns
    ``model``. Tied weights are converted once and stay shared."""
    for module in model.modules():
        if _converts(module):
            # (out, in) values over (in, out)-contiguous memory; .data keeps the Parameter object.
            module.weight.data = module.weight.data.t().contiguous().t()
    return model
