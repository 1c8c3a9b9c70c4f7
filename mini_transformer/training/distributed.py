"""Multi-process training under ``torchrun``: process group, rank, and wrapping the model.

The model itself stays single-device; DDP or FSDP2 is applied here, from outside:

* ``ddp`` (the default under torchrun): every rank holds the whole model, optimizer and
  gradients; gradients are all-reduced (averaged) after the last micro-step of accumulation.
* ``fsdp``: :func:`torch.distributed.fsdp.fully_shard` on every block, then on the root, so
  parameters, gradients and optimizer state are sharded over the ranks and each block's weights
  are all-gathered only while it runs. Checkpoints are gathered into the ordinary single-process
  format (full weights in safetensors, an id-keyed optimizer state), so they load anywhere; a
  resumed run loads them into the sharded model and optimizer, each rank keeping its shard.

The global batch (sequences per optimizer step) is ``batch_size x gradient_accumulation_steps x
world_size``; ``training.global_batch_size`` fixes it and derives the accumulation steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import TrainingConfig
from ..errors import UserError
from ..weights import tied_names


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

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.mode == "fsdp"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def planned_world_size(cfg: TrainingConfig) -> int:
    """How many processes train together: torchrun's ``WORLD_SIZE``, or 1 for a plain process.

    Refuses torchrun with several processes and ``distributed: none``, which would train
    independent copies into one out_dir. Reads the environment only: nothing is joined yet.
    """
    if not launched_by_torchrun():
        return 1
    world_size = int(os.environ["WORLD_SIZE"])
    if cfg.distributed == "none":
        if world_size > 1:
            raise UserError(f"training.distributed is none but torchrun started {world_size} processes, which "
                            "would train independent copies into one out_dir; set training.distributed to auto, "
                            "ddp or fsdp, or run with python instead of torchrun")
        return 1
    return world_size


def resolve_global_batch(cfg: TrainingConfig, world_size: int) -> TrainingConfig:
    """``cfg`` with ``gradient_accumulation_steps`` derived from ``global_batch_size`` (if set).

    Returns a new config where something is derived; ``cfg`` itself is never changed.
    """
    if cfg.global_batch_size is None:
        return cfg
    per_micro_step = cfg.batch_size * world_size
    if cfg.global_batch_size <= 0 or cfg.global_batch_size % per_micro_step:
        fits = max(1, round(cfg.global_batch_size / per_micro_step)) * per_micro_step
        raise UserError(
            f"training.global_batch_size ({cfg.global_batch_size}) must be a positive multiple of "
            f"batch_size x world size = {cfg.batch_size} x {world_size} = {per_micro_step}; "
            f"use global_batch_size {fits}, or another batch_size or number of processes")
    return dataclasses.replace(cfg, gradient_accumulation_steps=cfg.global_batch_size // per_micro_step)


def check_fsdp_supported(device_type: str, backend: str, dtype: str, optimizer: str = "adamw") -> None:
    """Raise :class:`UserError` where FSDP2 cannot run: old PyTorch, device, backend, fp16, Muon."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (PyTorch >= 2.6)
    except ImportError:
        raise UserError(f"training.distributed fsdp needs torch.distributed.fsdp.fully_shard (PyTorch >= 2.6; "
                        f"this is {torch.__version__}); upgrade PyTorch or set training.distributed to ddp") from None
    if device_type not in ("cuda", "cpu"):
        raise UserError(f"training.distributed fsdp runs on CUDA (nccl) or CPU (gloo), not on {device_type}; "
                        "set training.device to cpu or training.distributed to ddp")
    if device_type == "cuda" and backend != "nccl":
        raise UserError(f"training.distributed fsdp on CUDA needs the nccl backend, not {backend} "
                        "(gloo has no CUDA reduce-scatter); set training.backend to nccl (or auto)")
    if dtype == "fp16":
        raise UserError("training.distributed fsdp does not support fp16 (the grad scaler cannot unscale "
                        "sharded gradients); set training.dtype to bf16 or fp32, or training.distributed to ddp")
    if optimizer == "muon":
        # Newton-Schulz orthogonalises a whole matrix; each rank holds only a shard of its rows.
        raise UserError("training.optimizer muon does not work with training.distributed fsdp (it orthogonalises "
                        "whole weight matrices, FSDP shards them); set training.distributed to ddp, or "
                        "training.optimizer to adamw")


def init_distributed(cfg: TrainingConfig, device_type: str,
                     timeout_s: Optional[float] = None) -> DistributedContext:
    """Join the process group when started by torchrun; a no-op for a single process.

    Every check that can fail runs before joining the group, so a bad config fails each rank
    at once with the same one-line error instead of leaving the others waiting. (The global
    batch is checked before this, by :func:`resolve_global_batch`.)
    """
    world_size = planned_world_size(cfg)
    if not launched_by_torchrun() or cfg.distributed == "none":
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    mode = "ddp" if cfg.distributed == "auto" else cfg.distributed
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise UserError("training.backend nccl needs CUDA devices; set training.backend to gloo on CPU")
    if mode == "fsdp":
        check_fsdp_supported(device_type, backend, cfg.dtype, cfg.optimizer)
    timeout_s = cfg.dist_timeout_s if timeout_s is None else timeout_s
    if timeout_s <= 0:
        raise UserError(f"training.dist_timeout_s must be positive, got {timeout_s}; 300 is the default")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # A timeout on every collective: a rank that dies or hangs makes the others fail, not hang.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, mode=mode)


# -- wrapping the model ----------------------------------------------------------------------------

def wrap_model(model: torch.nn.Module, ctx: DistributedContext, device: torch.device, *,
               compile: bool = False, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The module to train with: ``model`` compiled and/or wrapped in DDP, or sharded by FSDP2.

    FSDP shards ``model`` in place (its parameters become DTensors), so an optimizer must be
    built on it *after* this call. Evaluation and checkpoints keep using ``model`` itself.
    """
    if ctx.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if dtype is torch.float16:  # training.dtype auto on a GPU without bf16
            check_fsdp_supported(device.type, "nccl" if device.type == "cuda" else "gloo", "fp16")
        if any(".lora_" in name for name, _ in model.named_parameters()):
            raise UserError("LoRA under training.distributed fsdp is not supported; set training.distributed to ddp "
                            "(the adapters are small, only the frozen base is replicated)")
        mesh = init_device_mesh(device.type, (ctx.world_size,))
        for block in model.blocks:  # one all-gather per block: its weights exist in full only while it runs
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embedding (tied LM head) and the final norm
        return torch.compile(model) if compile else model
    wrapped = torch.compile(model) if compile else model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = DDP(wrapped, device_ids=device_ids)
    return wrapped


@contextlib.contextmanager
def gradient_sync(step_model: torch.nn.Module, ctx: DistributedContext, enabled: bool) -> Iterator[None]:
    """Run a micro-step's backward with (``enabled``) or without the gradient all-reduce.

    Accumulation syncs only on its last micro-step: DDP's ``no_sync()``, FSDP2's
    ``set_requires_gradient_sync(False)`` (gradients accumulate unsharded until then).
    """
    if not ctx.enabled or enabled:
        yield
    elif ctx.fsdp:
        module = getattr(step_model, "_orig_mod", step_model)  # under torch.compile
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with step_model.no_sync():
            yield


def local_scalar(value: torch.Tensor) -> float:
    """``value.item()``, for a plain tensor or a DTensor (FSDP's gradient norm)."""
    full = getattr(value, "full_tensor", None)
    return (full() if full is not None else value).item()


# -- checkpoints --------------------------------------------------------------------------------

class GatheredModel:
    """What :func:`checkpoint.save_checkpoint` needs of a model (``state_dict``, ``config``),
    holding full weights gathered from FSDP shards."""

    def __init__(self, state: dict[str, torch.Tensor], config: Any):
        self._state = state
        self.config = config

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _reshard(model: torch.nn.Module) -> None:
    """Put FSDP's sharded parameters back in place. The root keeps its weights gathered after a
    forward without backward (evaluation), and the state-dict API maps the optimizer's
    parameters by the module's current ones."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def checkpointable_model(model: torch.nn.Module, ctx: DistributedContext) -> Any:
    """The model to save. Under FSDP every rank must call this (it all-gathers the weights onto
    rank 0's CPU); the others get ``None``. Otherwise ``model`` itself."""
    if not ctx.fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    _reshard(model)
    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    if not ctx.is_main:
        return None
    for alias in tied_names(model):  # a tied weight is stored once, like a single process does
        state.pop(alias, None)
    return GatheredModel(state, model.config)


def shard_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor],
                     ctx: DistributedContext) -> dict[str, torch.Tensor]:
    """Full weights (as saved) as ``model.load_state_dict`` takes them: under FSDP each tensor
    is cut to this rank's shard of the parameter it loads into; otherwise ``state`` itself.

    Every rank passes the whole state (each reads the checkpoint itself) and slices its own
    shard, so nothing is sent between ranks.
    """
    if not ctx.fsdp:
        return state
    from torch.distributed.tensor import DTensor, distribute_tensor

    current = model.state_dict()
    sharded = {}
    for name, tensor in state.items():
        target = current.get(name)
        if isinstance(target, DTensor):
            tensor = distribute_tensor(tensor.to(target.device), target.device_mesh, target.placements,
                                       src_data_rank=None)
        sharded[name] = tensor
    return sharded


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order of ``optimizer.state_dict()`` ids."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              ctx: DistributedContext) -> Optional[dict[str, Any]]:
    """The optimizer state as a single process's ``optimizer.state_dict()`` would hold it.

    Under FSDP every rank must call this (the states are all-gathered to rank 0's CPU); ranks
    other than 0 get ``None``. The result has integer parameter ids, so a single process (or
    any world size, DDP or FSDP) can resume from it.
    """
    if not ctx.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _reshard(model)
    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not ctx.is_main:
        return None
    ids = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    # The hyperparameters and ids as the optimizer itself lists them (the same on every rank).
    return {"state": {ids[name]: value for name, value in by_name["state"].items()},
            "param_groups": optimizer.state_dict()["param_groups"]}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any], ctx: DistributedContext) -> None:
    """Load a full, id-keyed optimizer state (as saved) into a possibly FSDP-sharded optimizer.

    Every rank passes the whole state (each reads the checkpoint itself) and keeps its shard.
    """
    if not ctx.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    by_name = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                         for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_options())
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):  # as saved (betas a tuple)
        group.update({key: value for key, value in saved.items() if key != "params"})


# -- collectives --------------------------------------------------------------------------------

def all_reduce_mean(value: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def any_rank(flag: bool, ctx: DistributedContext, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (a decision all ranks must take together)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def shutdown(ctx: DistributedContext) -> None:
    if ctx.mode != "none" and dist.is_initialized():  # a group that init_distributed joined
        dist.destroy_process_group()
