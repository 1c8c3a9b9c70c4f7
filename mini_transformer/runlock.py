"""One writer per run directory: an exclusive OS file lock on ``<out_dir>/.lock``.

Two runs in one ``out_dir`` would interleave their checkpoints and pointers (and one's cleanup
would delete the other's temporary files), so a run takes this lock before it writes anything
there and holds it until it closes. The lock is ``flock`` on an open file: the OS drops it when
the process dies, however it dies, so a crash or ``kill -9`` never leaves a stale lock. The lock
file stays behind (removing it would race with a run taking it); it holds the last holder's PID,
for the message a second run prints.

Windows has no ``fcntl``: there the lock is a no-op, and one writer per directory is the user's
to keep.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Optional

from .atomic import make_dirs
from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class RunLock:
    """Held from :func:`acquire_run_lock` until :meth:`release` (or the process ends)."""

    def __init__(self, path: Path, handle: Optional[IO[str]]) -> None:
        self.path = path
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_run_lock(out_dir: str | os.PathLike) -> RunLock:
    """Create ``out_dir`` if needed and lock it for this process; a :class:`UserError` naming the
    holder's PID if another run holds it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {out} is a file, not a directory; choose another training.out_dir")
    make_dirs(out)
    path = out / LOCK_FILE
    if fcntl is None:
        return RunLock(path, None)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"out_dir {out} is in use by another run (pid {holder}); wait for it or choose "
                        "another training.out_dir") from None
    except BaseException:
        handle.close()
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return RunLock(path, handle)
