"""Learning-rate and dropout schedules: pure functions of the step, so resuming is exact."""

from __future__ import annotations

import math

from ..config import ModelConfig, TrainingConfig


def learning_rate_at(step: int, cfg: TrainingConfig) -> float:
    """Linear warmup for ``warmup_iters``, then cosine (or linear) decay to ``min_lr`` by
    ``lr_decay_iters``, constant at ``min_lr`` after that. ``constant`` only warms up.

    ``step`` counts optimizer steps from 0.
    """
    peak = cfg.learning_rate
    floor = cfg.min_lr if cfg.min_lr is not None else peak / 10
    if cfg.warmup_iters and step < cfg.warmup_iters:
        return peak * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return peak
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_end:
        return floor
    progress = (step - cfg.warmup_iters) / max(1, decay_end - cfg.warmup_iters)
    if cfg.lr_schedule == "linear":
        return peak + (floor - peak) * progress
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def dropout_at(step: int, model_cfg: ModelConfig, cfg: TrainingConfig) -> float:
    """Dropout annealing: from ``model.dropout`` to ``training.dropout_end`` over the first
    ``dropout_anneal_fraction`` of ``max_iters`` (linear or cosine), then constant."""
    start = model_cfg.dropout
    if cfg.dropout_end is None:
        return start
    span = max(1.0, cfg.dropout_anneal_fraction * cfg.max_iters)
    progress = min(1.0, step / span)
    if cfg.dropout_anneal == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return start + (cfg.dropout_end - start) * progress
