"""How long a run will take: one training step timed before the run starts, and the line that
says what that means for the whole run on this device."""

from __future__ import annotations

import time
import numpy as np
import torch

from ..config import Config
from ..data import RandomBatchSampler
from ..device import autocast
from .flops import synchronize
from .metrics import evaluations_left, format_duration, run_seconds

# A timed pass this long is measured once: the first pass's set-up costs are small next to it.
LONG_TIMED_PASS_S = 10.0
# A run expected to take longer than this on a CPU is pointed to the CPU recipe, which trains
# a small character model in about two minutes (README, Results).
LONG_CPU_RUN_S = 3600.0
CPU_RECIPE = "configs/shakespeare_char_cpu.yaml"


def time_a_step(model: torch.nn.Module, tokens: np.ndarray, config: Config, device: torch.device,
                dtype: torch.dtype) -> tuple[float, float]:
    """(seconds per optimizer step, seconds per evaluation batch), from a forward and backward
    pass of ``model`` on a batch of its own (a second one when the first was short enough for
    one-time set-up, kernels and allocations, to weigh in it), then an evaluation forward.

    The gradients are dropped afterwards, the model is left in training mode, and a run's batch
    sampler is not touched; the draws from the RNGs (dropout) are the caller's to undo.
    """
    t, m = config.training, config.model
    sampler = RandomBatchSampler(tokens, batch_size=t.batch_size, block_size=m.block_size, seed=t.seed + 7,
                                 device=device)
    x, y = sampler.next_batch()
    try:
        for _ in range(2):
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, dtype):
                loss = model(x, y).loss
            loss.backward()
            synchronize(device)
            step_s = time.perf_counter() - start
            if step_s >= LONG_TIMED_PASS_S:
                break
        model.eval()
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, dtype):
            model(x, y)
        synchronize(device)
        evaluation_batch_s = time.perf_counter() - start
    finally:
        model.train()
        for p in model.parameters():
            p.grad = None
    return step_s * t.gradient_accumulation_steps, evaluation_batch_s


def expected_time_lines(config: Config, step: int, device: torch.device, step_s: float,
                        evaluation_batch_s: float, val_batches: int) -> list[str]:
    """The run's expected wall time from ``step`` on, and on a long CPU run the way to a short one."""
    t, data = config.training, config.data
    evaluation_s = 2 * t.eval_iters * evaluation_batch_s
    steps = t.max_iters - step
    evaluations = evaluations_left(step, t.max_iters, t.eval_interval)
    total = run_seconds(steps=steps, step_s=step_s, evaluations=evaluations, evaluation_s=evaluation_s)
    total += val_batches * evaluation_batch_s  # the final pass over the whole val split
    compiled = ", timed uncompiled" if t.compile else ""
    capped = ""
    if t.max_seconds is not None and total > t.max_seconds:
        total, capped = t.max_seconds, ", stopped by training.max_seconds"
    lines = [f"expected time: {format_duration(total)} on {device.type} ({steps:,} steps of "
             f"{format_duration(step_s)}, {evaluations} evaluations of {format_duration(evaluation_s)}; "
             f"from a step timed now{compiled}{capped})"]
    if device.type == "cpu" and total > LONG_CPU_RUN_S:
        source = f"--data.dataset {data.dataset}" if data.dataset else f"--data.path {data.path}"
        lines.append(f"note: that is long for a CPU; the CPU recipe trains a small character model in a few "
                     f"minutes: python train.py --config {CPU_RECIPE} {source}")
    return lines
