"""How long a run will take: one training step timed before the run starts, and the line that
says what that means for the whole run on this device."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Optional

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


class TimeBudget:
    """``training.max_seconds``: the run's wall time, counted from its set-up, ends within it.

    Training stops after the last step that leaves room for what must follow it: the evaluation
    due at that step, one more step, and the end of the run (an evaluation with its checkpoint,
    then the final pass over the whole val split). What evaluating costs is timed on the run's
    own evaluations; the final pass is estimated at their rate per batch.
    """

    def __init__(self, max_seconds: Optional[float], clock: Callable[[], float] = time.perf_counter,
                 started: Optional[float] = None):
        self.max_seconds = max_seconds
        self.clock = clock
        self.started = clock() if started is None else started  # a command passes its own start
        self.evaluation_s = 0.0  # the last evaluation and its checkpoint, as timed
        self.final_pass_s = 0.0  # the final val pass, at that evaluation's rate per batch

    def elapsed(self) -> float:
        return self.clock() - self.started

    @contextmanager
    def timing_evaluation(self, batches: int, final_pass_batches: int) -> Iterator[None]:
        """Time an evaluation of ``batches`` batches (and the save after it, if any)."""
        start = self.clock()
        yield
        self.evaluation_s = self.clock() - start
        self.final_pass_s = self.evaluation_s / max(batches, 1) * final_pass_batches

    def must_stop(self, step_s: float, due_to_evaluate: bool) -> bool:
        """Whether the step just taken (``step_s`` long) must be the last one."""
        if self.max_seconds is None:
            return False
        # Going on costs the evaluation due now, the next step, and then still the run's end.
        going_on_s = (self.evaluation_s if due_to_evaluate else 0.0) + step_s
        return self.elapsed() + going_on_s + self.evaluation_s + self.final_pass_s > self.max_seconds
