"""AdamW with decoupled weight decay on weight matrices only."""

from __future__ import annotations

import inspect

import torch

from ..config import TrainingConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two parameter groups.

    Every parameter with 2 or more dimensions decays: the attention and feed-forward matrices,
    and the token embedding (which, tied, is also the LM head), as in GPT-2 and nanoGPT. Norm
    weights and biases (1-D) do not. Only trainable parameters are given to the optimizer, so a
    LoRA run holds state for its adapters alone. The fused kernel is used where the device has it
    (CUDA, and CPU in recent PyTorch), otherwise the multi-tensor ``foreach`` one.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)
