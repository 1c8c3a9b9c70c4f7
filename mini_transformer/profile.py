"""Model profiling: parameter counts, FLOPs, memory, and the measured peak of a training step.

Parameter counts, FLOPs per token and the matmul probe live in :mod:`.training.flops` (the
training loop reports MFU with them), and the memory estimate in :mod:`.memory_check` (training and
generation refuse a run that cannot fit with it); they are imported here under the same names.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys

import torch

from .config import Config
from .device import autocast, resolve_device, resolve_dtype
from .memory_check import MemoryEstimate, estimate_memory, human_bytes  # noqa: F401  (public here too)
from .model import Transformer
from .training.flops import (  # noqa: F401  (also this module's public names, as before)
    ParameterCount, count_parameters, flops_per_token, measure_matmul_flops, synchronize,
)


# -- measured peak of one training step ------------------------------------------------------

def measure_training_step_peak(config: Config, batch_size: int | None = None,
                               dtype: str | None = None, device: str | None = None) -> dict:
    """Run one real training step (forward, backward, AdamW) and report its peak memory.

    On CPU the step runs in a fresh process, so that its peak resident set size is its own:
    ``peak_bytes`` is the process peak, ``step_bytes`` the growth over the state before the step.
    On CUDA it is ``torch.cuda.max_memory_allocated``.
    """
    batch = batch_size or config.training.batch_size
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_worker, args=(config.to_dict(), batch, dtype or config.training.dtype,
                                                  device or config.training.device, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty():
        raise RuntimeError(f"the measuring process failed (exit code {proc.exitcode})")
    return queue.get()


def _rss_peak_bytes() -> int:
    """This process's peak resident set size.

    On Linux this is ``VmHWM``, the high-water mark of the process's own address space:
    ``getrusage``'s ``ru_maxrss`` is carried over from the parent through fork and exec, so a
    freshly spawned child would report its (possibly larger) parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _peak_worker(raw_config: dict, batch: int, dtype_spec: str, device_spec: str, queue) -> None:
    config = Config.from_dict(raw_config)
    if config.model.vocab_size is None:
        config.model.vocab_size = 65
    device = resolve_device(device_spec)
    dtype = resolve_dtype(dtype_spec, device)
    model = Transformer(config.model).to(device)
    model.gradient_checkpointing = config.training.gradient_checkpointing
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    T = config.model.block_size
    x = torch.randint(0, config.model.vocab_size, (batch, T), device=device)
    y = torch.randint(0, config.model.vocab_size, (batch, T), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_peak_bytes()
    with autocast(device, dtype):
        loss = model(x, y).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _rss_peak_bytes()
    queue.put({"peak_bytes": peak, "step_bytes": max(0, peak - before), "device": str(device),
               "dtype": str(dtype).replace("torch.", ""), "batch_size": batch})


# -- the table -------------------------------------------------------------------------------

def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def profile_rows(config: Config, measured: dict | None = None) -> list[tuple[str, str]]:
    """The profile as (label, value) rows."""
    m = config.model
    params = count_parameters(m)
    fwd, train = flops_per_token(m)
    batch = config.training.batch_size
    tokens = batch * m.block_size
    mem = estimate_memory(m, batch, gradient_checkpointing=config.training.gradient_checkpointing,
                          optimizer=config.training.optimizer)
    attn = "MHA" if m.kv_heads == m.n_heads else ("MQA" if m.kv_heads == 1 else f"GQA ({m.kv_heads} kv heads)")
    ffn = "SwiGLU" if m.activation == "swiglu" else "relu2 MLP"
    options = ", qk-norm" if m.qk_norm else ""
    if m.logit_softcap is not None:
        options += f", logit softcap {m.logit_softcap:g}"
    rows = [
        ("architecture", f"d_model {m.d_model}, {m.n_heads} heads ({attn}), {m.n_layers} layers, "
                         f"context {m.block_size}, vocab {m.vocab_size}, {ffn} {m.hidden_size}, {m.norm}{options}"),
        ("parameters, total", f"{params.total:,} ({human_count(params.total)})"),
        ("parameters, non-embedding", f"{params.non_embedding:,} ({human_count(params.non_embedding)})"),
        ("FLOPs per token, forward", human_count(fwd)),
        ("FLOPs per token, training step", human_count(train)),
        (f"FLOPs per training step (batch {batch})", human_count(train * tokens)),
        ("memory: weights (fp32)", human_bytes(mem.weights)),
        ("memory: gradients (fp32)", human_bytes(mem.gradients)),
        (f"memory: optimizer state ({config.training.optimizer}, fp32)", human_bytes(mem.optimizer)),
        (f"memory: activations, estimate (batch {batch}, fp32)", human_bytes(mem.activations)),
        ("memory: total, estimate", human_bytes(mem.total)),
    ]
    if measured is not None:
        where = f"{measured['device']}, {measured['dtype']}, batch {measured['batch_size']}"
        rows.append((f"measured peak of one training step ({where})",
                     f"{human_bytes(measured['peak_bytes'])} "
                     f"(+{human_bytes(measured['step_bytes'])} during the step)"))
    return rows


def format_table(rows: list[tuple[str, str]], headers: tuple[str, str] = ("quantity", "value")) -> str:
    """A markdown table."""
    width0 = max(len(headers[0]), *(len(r[0]) for r in rows))
    width1 = max(len(headers[1]), *(len(r[1]) for r in rows))
    lines = [f"| {headers[0]:<{width0}} | {headers[1]:<{width1}} |", f"| {'-' * width0} | {'-' * width1} |"]
    lines += [f"| {a:<{width0}} | {b:<{width1}} |" for a, b in rows]
    return "\n".join(lines)
