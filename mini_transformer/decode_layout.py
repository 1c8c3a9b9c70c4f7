"""How decoding multiplies one row by a weight on the CPU: the weights' layout and the product.

**Eager decoding** (:func:`to_decode_layout`): ``nn.Linear`` weights stored column-major.

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

**Compiled decoding** (:class:`OneRowProducts`): inside a ``torch.compile``-d decode step,
``F.linear`` of one row becomes ``(x * W).sum(-1)`` over the plain row-major weight. Why: Inductor
then writes that product itself, as a loop over the weight's rows split across the threads,
and fuses it with the norms, RoPE, attention and SiLU around it: the whole decode step of a
small model becomes one C++ kernel instead of two dozen BLAS calls (which run single-threaded
at this size) between the fused pieces. Measured (BENCHMARKS.md, "Levers and what each
measured"): the small preset's compiled step 2-3x faster than with BLAS products. It wants the
plain layout (each output's weights contiguous), so a model decoded compiled keeps it:
``to_decode_layout(model, compiled=True)``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _converts(module: nn.Module, compiled: bool = False) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and weight.device.type == "cpu" and weight.dtype == torch.float32
            and is_column_major(weight) == compiled)


def is_column_major(weight: torch.Tensor) -> bool:
    """Whether a (out, in) matrix is stored as its contiguous transpose."""
    return weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


@torch.no_grad()
def to_decode_layout(model: nn.Module, compiled: bool = False) -> nn.Module:
    """Store every CPU float32 ``nn.Linear`` weight of ``model`` in the layout its decode step
    reads fastest, in place; returns ``model``. Eager (``compiled=False``): column-major.
    Compiled: row-major, PyTorch's own (a column-major weight is stored back). Tied weights
    are converted once and stay shared."""
    for module in model.modules():
        if _converts(module, compiled):
            # .data keeps the Parameter object. Column-major: (out, in) values over
            # (in, out)-contiguous memory; row-major: plain contiguous (out, in).
            weight = module.weight.data
            module.weight.data = weight.contiguous() if compiled else weight.t().contiguous().t()
    return model


class OneRowProducts(TorchFunctionMode):
    """Within it, ``F.linear`` of a single row by a row-major float weight on the CPU is computed as
    ``(x * W).sum(-1)``: for a decode step under ``torch.compile`` (see the module docstring).

    Anything else (several rows, a column-major weight, another device, a bias of another dtype)
    goes to ``F.linear`` unchanged, and so does everything when the mode's code runs eagerly
    (where the reduction would materialise ``x * W``, slower than BLAS): enter it only while
    Dynamo traces (:func:`one_row_products`). Several rows stay on BLAS because the reduction
    would read the weight once per row (measured 3-6x slower at batch 4). A quantized layer
    whose kernel falls back to ``F.linear`` over its dequantized weight gets the reduction too.
    """

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _one_row_product(x, weight, bias):
                # (..., 1, in) * (out, in) summed over in: (..., out), accumulated in fp32 by Inductor.
                y = (x.unsqueeze(-2) * weight).sum(-1)
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def one_row_products() -> contextlib.AbstractContextManager:
    """:class:`OneRowProducts` while Dynamo traces; nothing when the same code runs eagerly (past
    Dynamo's recompile limit), where every torch call through a Python mode would cost ~25% of
    a tiny model's step. Dynamo reads the check as a constant, so its graphs keep the mode."""
    return OneRowProducts() if torch.compiler.is_compiling() else contextlib.nullcontext()


def _one_row_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    # Only while Dynamo traces: eagerly, BLAS is the faster product (and the mode is normally
    # not entered there at all).
    return (torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]
            and weight.dim() == 2 and weight.is_floating_point() and weight.dtype == x.dtype
            and weight.is_contiguous() and (bias is None or bias.dtype == x.dtype))
