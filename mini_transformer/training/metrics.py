"""Where training numbers go: ``metrics.jsonl`` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
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
