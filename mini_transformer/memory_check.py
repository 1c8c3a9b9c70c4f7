"""Memory estimates, and the refusal of a run that cannot fit before anything is allocated.

The estimates are analytic, from the config alone, so no model is built to make them:
training needs the weights, their gradients, the optimizer's state and the activations a step
keeps for its backward pass (the figures of ``mini-transformer profile``); generation needs the
weights, the RoPE tables and the KV-cache of every sequence generated at once. Each leaves
out what is small or hard to predict (allocator slack, temporaries), so it is a lower bound: a
run refused here would have failed anyway, after allocating until the allocator threw (or the
kernel's OOM killer struck).

What the run may use is the device's free memory on CUDA, and on CPU and MPS (whose memory is
the machine's) the RAM available: ``MemAvailable`` of /proc/meminfo, or less where a container's
memory limit (cgroup) leaves less.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import Config, ModelConfig
from .errors import SettingError
from .training.flops import count_parameters


# -- estimates --------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def estimate_memory(config: ModelConfig, batch_size: int, activation_bytes: int = 4,
                    gradient_checkpointing: bool = False, optimizer: str = "adamw") -> MemoryEstimate:
    """Bytes for fp32 weights, gradients, the optimizer's state and saved activations.

    The optimizer's state: AdamW keeps two fp32 moments per parameter; with ``optimizer: muon``
    the blocks' weight matrices keep one momentum buffer instead, and the rest stays with AdamW.

    The activation figure counts the tensors each block keeps for the backward pass (inputs of
    the norms and projections, q/k/v, the attention output, the SwiGLU gate, up and product or
    relu2's relu and square, q and k before a qk_norm),
    the attention's T x T weights when the math path or attention dropout keeps them, dropout
    masks, and the logits with their fp32 copy for the loss. With gradient checkpointing only
    each block's input is kept, plus the activations of the one block being recomputed.
    """
    counts = count_parameters(config)
    params = counts.total
    B, T, d, h = batch_size, config.block_size, config.d_model, config.hidden_size
    kv = config.kv_heads * config.head_dim
    ffn = 4 * h if config.activation == "swiglu" else 2 * h  # relu2: the relu and square outputs
    qk_norm = d + kv if config.qk_norm else 0  # the norms' inputs: q and k before normalising
    per_layer = activation_bytes * B * T * (9 * d + 2 * kv + ffn + qk_norm)
    if config.dropout > 0:
        per_layer += 2 * B * T * d  # the residual dropouts' masks, one byte per element
    if config.attention == "math" or config.dropout > 0:
        # The T x T weights are kept: by the math path, and by attention dropout, which the
        # fused CPU kernels don't do. Per weight: fp32 scores and probabilities, the dropped
        # probabilities, and a byte mask.
        per_layer += 13 * B * config.n_heads * T * T
    logit_copies = 4 if config.logit_softcap is not None else 3  # the softcap keeps its tanh
    logits = activation_bytes * logit_copies * B * T * (config.vocab_size or 0)
    if gradient_checkpointing:
        activations = config.n_layers * activation_bytes * B * T * d + per_layer + logits
    else:
        activations = config.n_layers * per_layer + logits
    # Muon trains the blocks' matrices (training.optim.muon_parameters); AdamW the rest.
    muon_matrices = counts.block_matrices if optimizer == "muon" else 0
    return MemoryEstimate(
        weights=4 * params,
        gradients=4 * params,
        optimizer=8 * (params - muon_matrices) + 4 * muon_matrices,
        activations=activations,
    )


def kv_cache_bytes(config: ModelConfig, batch_size: int, dtype_bytes: int, max_len: Optional[int] = None) -> int:
    """The keys and values of every layer for ``batch_size`` sequences of ``max_len`` (default
    ``block_size``) slots: what :meth:`~mini_transformer.model.KVCache.for_model` allocates."""
    slots = max_len or config.block_size
    return 2 * config.n_layers * batch_size * config.kv_heads * slots * config.head_dim * dtype_bytes


def rope_table_bytes(config: ModelConfig) -> int:
    """The model's fp32 cos and sin tables, (block_size, head_dim) each."""
    return 2 * config.block_size * config.head_dim * 4


def training_need(config: Config, dtype: torch.dtype, *, shards: int = 1) -> dict[str, int]:
    """What one training process holds, by part: the profile's estimate with activations in the
    training dtype, no gradients or optimizer state for a LoRA run's frozen base (its adapters are
    small), and the parameters' parts divided among ``shards`` FSDP ranks."""
    t = config.training
    estimate = estimate_memory(config.model, t.batch_size, activation_bytes=dtype.itemsize,
                               gradient_checkpointing=t.gradient_checkpointing, optimizer=t.optimizer)
    trains_base = not config.advanced.use_lora
    return {
        "weights": estimate.weights // shards,
        "gradients": estimate.gradients // shards if trains_base else 0,
        "optimizer state": estimate.optimizer // shards if trains_base else 0,
        "activations": estimate.activations,
    }


def training_fix(config: Config, need: Mapping[str, int], available: int) -> str:
    """What to reduce: the model when its parameters' parts alone exceed ``available`` bytes, else
    the part that dominates ``need``."""
    t = config.training
    parameters = need["weights"] + need["gradients"] + need["optimizer state"]
    if parameters <= available and need["activations"] >= parameters:
        fix = ("reduce training.batch_size (more training.gradient_accumulation_steps keep the batch per step) "
               "or model.block_size")
        return fix if t.gradient_checkpointing else fix + ", or turn on training.gradient_checkpointing"
    if t.init_from and not config.advanced.use_lora:
        return "fine-tune with LoRA (advanced.use_lora), which trains small adapters only"
    if t.init_from:
        return "fine-tune a smaller base model"
    return "reduce model.d_model or model.n_layers"


def generation_need(config: ModelConfig, batch_size: int, dtype_bytes: int,
                    weights_file: Optional[Path] = None) -> dict[str, int]:
    """What generating ``batch_size`` sequences at once holds: the weights in ``dtype_bytes`` per
    parameter (no more than ``weights_file`` holds: a quantized checkpoint's are smaller), the
    RoPE tables and a KV-cache of ``block_size`` slots per sequence."""
    weights = count_parameters(config).total * dtype_bytes
    if weights_file is not None and weights_file.is_file():
        weights = min(weights, weights_file.stat().st_size)
    return {"weights": weights, "RoPE tables": rope_table_bytes(config),
            "KV-cache": kv_cache_bytes(config, batch_size, dtype_bytes)}


# -- what the device has ----------------------------------------------------------------------

def available_memory(device: torch.device) -> Optional[int]:
    """Bytes this process may still allocate on ``device``; None where it cannot be told."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return available_ram()


def available_ram() -> Optional[int]:
    """RAM available to this process: the least of the kernel's estimate (``MemAvailable``, or
    psutil's where there is no /proc) and a container limit's headroom; the physical RAM where
    neither can be read."""
    known = [n for n in (_meminfo_available(), _cgroup_headroom()) if n is not None]
    if known:
        return min(known)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError):
        pass
    try:
        import psutil  # optional: macOS and Windows have no /proc
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


# A cgroup's memory limit, and its usage, under cgroup v2 and v1; "no limit" reads as a huge number.
_CGROUP_FILES = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")]


def _cgroup_headroom() -> Optional[int]:
    """How far this process's container is below its memory limit (the OOM killer acts there,
    whatever ``MemAvailable`` says); None without a limit."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 1 << 60:
            return None
        return max(0, int(limit_text) - usage)
    return None


# -- the refusal ------------------------------------------------------------------------------

def refuse_if_too_large(what: str, need: Mapping[str, int], device: torch.device,
                        fix: Callable[[int], str]) -> None:
    """Raise a one-line :class:`SettingError` when ``need`` (bytes by part) exceeds what ``device``
    has: the estimate, its parts, the memory there is, what to reduce (``fix(available bytes)``)
    and the ``force`` setting that skips this check."""
    total = sum(need.values())
    available = available_memory(device)
    if available is None or total <= available:
        return
    parts = ", ".join(f"{name} {human_bytes(n)}" for name, n in need.items() if n)
    where = f"is free on {device}" if device.type == "cuda" else "of RAM is available"
    raise SettingError(f"{what} needs at least {human_bytes(total)} ({parts}) but only {human_bytes(available)} "
                       f"{where}; {fix(available)}, or force it to try anyway", fixes=[{"force": ""}])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
