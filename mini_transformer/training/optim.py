"""The optimizer: AdamW, or Muon for the blocks' weight matrices with AdamW for the rest."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Union

import torch

from ..config import Config, TrainingConfig
from ..errors import UserError
from ..model import CausalSelfAttention, SwiGLU

if TYPE_CHECKING:
    from .muon import MuonWithAdamW


def muon_available() -> bool:
    return hasattr(torch.optim, "Muon")  # PyTorch >= 2.9


def check_optimizer_supported(config: Config) -> None:
    """Refuse, before anything is built, ``training.optimizer muon`` where it cannot run.

    (Under FSDP it is refused by :func:`~.distributed.check_fsdp_supported`.)
    """
    if config.training.optimizer != "muon":
        return
    if not muon_available():
        raise UserError(f"training.optimizer muon needs torch.optim.Muon (PyTorch >= 2.9; this is "
                        f"{torch.__version__}); upgrade PyTorch or set training.optimizer adamw")
    if config.advanced.use_lora:
        # Muon orthogonalises whole weight matrices; a LoRA adapter is a rank-r factor of an
        # update, where that has no clear meaning. Refused rather than quietly given to AdamW.
        raise UserError("training.optimizer muon trains whole weight matrices, not LoRA adapters; set "
                        "training.optimizer adamw for LoRA, or train all the weights without LoRA")


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> Union[torch.optim.AdamW, MuonWithAdamW]:
    """AdamW over every trainable parameter, or (``optimizer: muon``) a
    :class:`~.muon.MuonWithAdamW` with Muon for the 2-D matrices inside ``model.blocks``.

    AdamW has two groups. Every parameter it holds with 2 or more dimensions decays: the
    attention and feed-forward matrices, and the token embedding (which, tied, is also the LM
    head), as in GPT-2 and nanoGPT. Norm weights and biases (1-D) do not. Only trainable
    parameters are given to the optimizer, so a LoRA run holds state for its adapters alone. The
    fused kernel is used where the device has it (CUDA, and CPU in recent PyTorch), otherwise the
    multi-tensor ``foreach`` one. Muon's Newton-Schulz runs in bf16 (as PyTorch's) when the run
    trains in bf16 (``dtype``), in fp32 otherwise (see :mod:`.muon`).
    """
    muon_params = muon_parameters(model) if cfg.optimizer == "muon" else []
    in_muon = {id(p) for p in muon_params}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in in_muon]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    adamw = torch.optim.AdamW(groups, **kwargs)
    if cfg.optimizer != "muon":
        return adamw
    from .muon import BlockwiseMuon, MuonWithAdamW  # torch.optim.Muon exists (check_optimizer_supported)

    muon = BlockwiseMuon(muon_params, row_blocks=fused_row_blocks(model) if cfg.muon_split_fused else {},
                         ns_dtype=torch.bfloat16 if dtype is torch.bfloat16 else torch.float32,
                         lr=cfg.muon_learning_rate, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum)
    return MuonWithAdamW(adamw, muon)


def muon_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable 2-D weight matrices inside ``model.blocks`` (attention's qkv and proj,
    the feed-forward's): the hidden layers Muon is made for. The embedding and the LM head,
    whose rows are tokens rather than features, stay with AdamW, as do norms and biases."""
    return [p for p in model.blocks.parameters() if p.requires_grad and p.dim() == 2]


def fused_row_blocks(model: torch.nn.Module) -> dict[torch.Tensor, tuple[int, ...]]:
    """The row blocks of the blocks' fused matrices: qkv's (q, k, v) rows, as the attention's
    forward splits its output, and SwiGLU gate_up's (gate, up) halves."""
    blocks: dict[torch.Tensor, tuple[int, ...]] = {}
    for module in model.blocks.modules():
        if isinstance(module, CausalSelfAttention):
            q, kv = module.n_heads * module.head_dim, module.n_kv_heads * module.head_dim
            blocks[module.qkv.weight] = (q, kv, kv)
        elif isinstance(module, SwiGLU):
            blocks[module.gate_up.weight] = (module.hidden_size, module.hidden_size)
    return blocks


def set_learning_rates(optimizer: Any, lr: float, cfg: TrainingConfig) -> None:
    """Set this step's learning rates: ``lr`` (the schedule's, at ``cfg.learning_rate`` peak) for
    AdamW's groups, and the same fraction of ``cfg.muon_learning_rate`` for Muon's, so that
    warmup, decay and ``min_lr`` shape both alike. Taken from the config at every step (not from
    the optimizer's state), so a resumed run with other rates uses them, as it does for AdamW."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    muon = getattr(optimizer, "muon", None)
    if muon is not None:
        for group in muon.param_groups:
            group["lr"] = lr / cfg.learning_rate * cfg.muon_learning_rate
