"""Multi-process training under ``torchrun``: process group, rank, and wrapping the model.

The model itself stays single-device; DDP or FSDP2 is applied here, from outside.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import TrainingConfig
from ..errors import UserError


@dataclass
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(cfg: TrainingConfig, device_type: str, timeout_s: float = 300.0) -> DistributedContext:
    """Join the process group when started by torchrun; a no-op for a single process."""
    if not launched_by_torchrun() or cfg.distributed == "none":
        return DistributedContext()
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    mode = "ddp" if cfg.distributed == "auto" else cfg.distributed
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise UserError("training.backend nccl needs CUDA devices; use --training.backend gloo on CPU")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # A timeout on every collective: a rank that dies makes the others fail, not hang.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, mode=mode)


def all_reduce_mean(value: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def shutdown(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
