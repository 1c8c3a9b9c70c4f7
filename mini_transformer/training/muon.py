"""Muon for the blocks' weight matrices next to AdamW for the rest, as one optimizer.

Muon (https://kellerjordan.github.io/posts/muon/) replaces each weight matrix's momentum update
by its nearest semi-orthogonal matrix, approximated by five Newton-Schulz iterations.
PyTorch's :class:`torch.optim.Muon` (2.9 and later: import this module only where it exists, see
``optim.muon_available``) is the base; this module adds:

* :class:`BlockwiseMuon`, ``torch.optim.Muon`` with two choices its step does not offer:

  - our attention's ``qkv`` and SwiGLU's ``gate_up`` are each one fused ``nn.Linear`` (one
    matmul instead of three, or two), while the modded-nanoGPT speedrun orthogonalises q, k and v
    (and the MLP's matrices) as separate matrices. ``torch.optim.Muon`` orthogonalises a whole
    2-D gradient; this does the same math on each row block of a fused matrix, with the
    learning-rate adjustment of the block's own shape;
  - PyTorch runs Newton-Schulz in bf16, fast on GPUs and on CPUs with AMX or AVX-512 BF16, but
    slow on other CPUs, which emulate bf16 matmuls: there the CPU recipe's Muon step took 1.1 s
    in bf16 and 0.09 s in fp32 (its forward and backward 0.15-0.3 s). A run that trains in bf16
    computes it in bf16; one that trains in fp32 (or fp16) in fp32.

  Both call PyTorch's private helpers ``_zeropower_via_newtonschulz`` and ``_adjust_lr``, so
  that the math stays PyTorch's; tests/test_muon.py checks the result against an explicit one.

* :class:`MuonWithAdamW`: the two optimizers behind the one interface the training loop, the
  grad scaler and the checkpoints use (``param_groups``, ``step``, ``zero_grad``,
  ``state_dict``, ``load_state_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """``torch.optim.Muon``'s orthogonalisation of ``grad``, computed in ``dtype``: PyTorch's own
    function for bf16, the same lines in another dtype otherwise."""
    if dtype is torch.bfloat16:
        return _zeropower_via_newtonschulz(grad, coefficients, steps, eps)
    a, b, c = coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.to(dtype).T if tall else grad.to(dtype)
    x = x / x.norm().clamp(min=eps)  # the spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class BlockwiseMuon(torch.optim.Muon):
    """:class:`torch.optim.Muon` with fused matrices orthogonalised per row block, in ``ns_dtype``.

    ``row_blocks`` maps a parameter to the heights of its blocks, top to bottom (a qkv weight:
    ``(q rows, k rows, v rows)``); other parameters are orthogonalised whole. With no row blocks
    and ``ns_dtype`` bf16 it is ``torch.optim.Muon`` exactly (tested bit for bit): the step follows
    ``torch.optim._muon._single_tensor_muon`` line by line. The momentum buffer is the whole
    matrix's either way, so the state (and a checkpoint) is ``torch.optim.Muon``'s, and a resumed
    run may change either choice.
    """

    def __init__(self, params: Any, row_blocks: Mapping[torch.Tensor, Sequence[int]],
                 ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        self.row_blocks = {id(p): tuple(heights) for p, heights in row_blocks.items()}
        for group in self.param_groups:
            for p in group["params"]:
                heights = self.row_blocks.get(id(p), (p.shape[0],))
                if sum(heights) != p.shape[0]:
                    raise ValueError(f"row blocks {heights} do not add up to the {p.shape[0]} rows of a parameter")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            for param, grad, buf in zip(params, grads, buffers):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                param.mul_(1 - lr * group["weight_decay"])
                heights = self.row_blocks.get(id(param), (param.shape[0],))
                for rows, block in zip(param.split(heights), update.split(heights)):
                    ortho = newton_schulz(block, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                          self.ns_dtype)
                    rows.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], block.shape))
        return loss


class MuonWithAdamW:
    """AdamW and Muon stepping together, with one optimizer's interface.

    ``param_groups`` lists AdamW's groups, then Muon's (the same dicts: setting a group's
    ``lr`` sets the optimizer's). :class:`torch.amp.GradScaler` takes it as it takes any
    optimizer: it unscales the gradients of every group and calls :meth:`step` unless one is
    not finite. The state dict holds each optimizer's own under ``"adamw"`` and ``"muon"``.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Optimizer):
        self.adamw = adamw
        self.muon = muon

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises KeyError for a state without both parts (an AdamW-only checkpoint's)."""
        adamw, muon = state["adamw"], state["muon"]
        self.adamw.load_state_dict(adamw)
        self.muon.load_state_dict(muon)
