"""Where training numbers go: ``metrics.jsonl`` (one JSON object per line) and TensorBoard;
and the two figures measured on the way: training throughput, and the run's expected duration."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_write_text, make_dirs


class MetricsLogger:
    """Appends each record to ``out_dir/metrics.jsonl``; mirrors scalars to TensorBoard if installed.

    Lines are flushed one at a time, so a crash loses at most the line being written; a resumed
    run first drops the records past its checkpoint's step, so the file never has two histories.
    """

    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        make_dirs(self.path.parent)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in the same out_dir starts a fresh history
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = _tensorboard_writer(Path(out_dir) / "tensorboard") if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if record.get("iter", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = record.get("iter", 0)
            for key, value in record.items():
                if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional; any import failure means "off"
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class Throughput:
    """Tokens per second of the training steps alone.

    Time spent inside :meth:`paused` (evaluation, checkpoints) is left out, so the interval
    after an evaluation reads the steps' own speed, not the evaluation's.
    """

    def __init__(self, tokens_per_step: int, step: int, clock: Callable[[], float] = time.perf_counter):
        self._tokens_per_step = tokens_per_step
        self._clock = clock
        self._step = step
        self._since = clock()
        self._paused_s = 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self._paused_s += self._clock() - start

    def tokens_per_s(self, step: int) -> float:
        """The rate over the steps since the last call (or the start); starts the next interval."""
        now = self._clock()
        seconds = max(now - self._since - self._paused_s, 1e-9)
        rate = self._tokens_per_step * (step - self._step) / seconds
        self._step, self._since, self._paused_s = step, now, 0.0
        return rate


def run_seconds(*, steps: int, step_s: float, evaluations: int, evaluation_s: float) -> float:
    """The expected wall time of ``steps`` training steps and ``evaluations`` evaluations."""
    return steps * step_s + evaluations * evaluation_s


def evaluations_left(step: int, max_iters: int, eval_interval: int) -> int:
    """How many evaluations a run at ``step`` still makes: step 0's (when it starts there), one
    every ``eval_interval`` steps, and one at ``max_iters`` when that is not on the interval."""
    count = max_iters // eval_interval - step // eval_interval
    if max_iters % eval_interval:
        count += 1
    return count + (step == 0)


def format_duration(seconds: float) -> str:
    """``12 h 30 min``, ``4 min 10 s``, ``3.2 s``, ``30 ms``: two units at most, the larger first."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    first = next(i for i, (value, _) in enumerate(parts) if value)
    return " ".join(f"{value} {unit}" for value, unit in parts[first:first + 2] if value)
