"""Learning-rate and dropout schedules: pure functions of the step, so resuming is exact.

:func:`resolve_schedule` decides, once per run, the warmup and decay a run trains with: a
shortened run (``--training.max_iters 100``) must not keep the long run's 500 warmup steps. The
resolved values are what the run's saved config records, so a resume continues on them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ..config import COMMAND_LINE, Config, ModelConfig, TrainingConfig

# A schedule that follows max_iters warms up for at most this fraction of the run.
WARMUP_FRACTION = 0.1
# An lr_decay_iters set outside these multiples of max_iters is said to be far from it: the run
# ends well before the decay does, or sits at min_lr for more than half of it.
DECAY_RATIO_RANGE = (0.5, 1.1)
SCHEDULE_KEYS = ("warmup_iters", "lr_decay_iters")


def resolve_schedule(config: Config, saved: Optional[TrainingConfig] = None) -> tuple[TrainingConfig, list[str]]:
    """The training section with the schedule this run uses, and the lines to tell the user.

    A schedule key *follows* ``max_iters`` when the user did not set it, or set it in a file
    while ``max_iters`` came from the command line (a shortened or lengthened run of a recipe):
    then ``lr_decay_iters`` is ``max_iters`` and ``warmup_iters`` at most ``WARMUP_FRACTION`` of
    it. Keys set alongside ``max_iters`` are kept, with a warning where they cannot work as
    meant. ``saved`` is a resumed checkpoint's training section: the keys that follow take its
    values, so that a resume continues on the schedule the run started with.
    """
    t = config.training
    max_on_command_line = config.set_on_command_line("training.max_iters")

    def follows(key: str) -> bool:
        dotted = f"training.{key}"
        return not config.is_set(dotted) or (max_on_command_line and not config.set_on_command_line(dotted))

    following = [key for key in SCHEDULE_KEYS if follows(key)]
    resolved = dict(warmup_iters=t.warmup_iters, lr_decay_iters=t.lr_decay_iters or t.max_iters)
    if "lr_decay_iters" in following:
        resolved["lr_decay_iters"] = t.max_iters
    if "warmup_iters" in following:
        resolved["warmup_iters"] = min(t.warmup_iters, int(WARMUP_FRACTION * t.max_iters))
    lines = []
    changed = [f"{key} {getattr(t, key)} -> {resolved[key]}" for key in following
               if getattr(t, key) is not None and getattr(t, key) != resolved[key]]
    kept = {key: getattr(saved, key) or saved.max_iters for key in following} if saved is not None else {}
    kept = {key: value for key, value in kept.items() if value != resolved[key]}
    if kept:  # max_iters changed since the run started: the schedule stays the run's
        described = ", ".join(f"{key} {value}, not {resolved[key]}" for key, value in kept.items())
        resolved.update(kept)
        lines.append(f"note: resuming on the checkpoint's lr schedule ({described}); set "
                     f"{' and '.join('training.' + key for key in kept)} on the command line to change it")
    elif changed:
        source = config.set_by.get("training.max_iters")
        where = "on the command line" if source == COMMAND_LINE else f"in {source}" if source else "in the config"
        keep = "set them on the command line too" if max_on_command_line else "set them"
        lines.append(f"note: the lr schedule follows training.max_iters {t.max_iters} (set {where}): "
                     f"{', '.join(changed)}; {keep} to choose otherwise")
    result = dataclasses.replace(t, **resolved)
    lines.extend(_conflicts(result))
    return result, lines


def _conflicts(t: TrainingConfig) -> list[str]:
    """One warning per schedule setting that cannot do what it is set for."""
    warnings = []
    if t.warmup_iters >= t.max_iters:
        warnings.append(f"warning: training.warmup_iters ({t.warmup_iters}) >= training.max_iters ({t.max_iters}): "
                        f"the learning rate never reaches {t.learning_rate:g}, it ends at "
                        f"{learning_rate_at(t.max_iters - 1, t):.2g}; lower warmup_iters (a tenth of max_iters is "
                        "plenty)")
    elif t.lr_schedule != "constant":
        low, high = DECAY_RATIO_RANGE
        if t.lr_decay_iters > high * t.max_iters:
            warnings.append(f"warning: training.lr_decay_iters ({t.lr_decay_iters}) is far past training.max_iters "
                            f"({t.max_iters}): the run stops at lr {learning_rate_at(t.max_iters - 1, t):.2g}, "
                            f"before decaying to {_floor(t):.2g}; set lr_decay_iters to max_iters to decay fully")
        elif t.lr_decay_iters < low * t.max_iters:
            warnings.append(f"warning: training.lr_decay_iters ({t.lr_decay_iters}) is under half of "
                            f"training.max_iters ({t.max_iters}): the last {t.max_iters - t.lr_decay_iters} steps "
                            f"run at min_lr {_floor(t):.2g}; set lr_decay_iters to max_iters to decay over the run")
    return warnings


def _floor(cfg: TrainingConfig) -> float:
    return cfg.min_lr if cfg.min_lr is not None else cfg.learning_rate / 10


def learning_rate_at(step: int, cfg: TrainingConfig) -> float:
    """Linear warmup for ``warmup_iters``, then cosine (or linear) decay to ``min_lr`` by
    ``lr_decay_iters``, constant at ``min_lr`` after that. ``constant`` only warms up.

    ``step`` counts optimizer steps from 0.
    """
    peak = cfg.learning_rate
    floor = _floor(cfg)
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
