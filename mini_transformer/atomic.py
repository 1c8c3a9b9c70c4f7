"""Atomic writes: a crash or ``kill -9`` leaves either the old file or directory, or the new one, never half.

A file goes to a temporary file in the same directory, is flushed and fsynced, and is then
renamed over the target (``os.replace`` is atomic on POSIX and Windows). A directory of files
(a checkpoint, a prepared dataset) is written into a temporary directory next to its target and
renamed into place the same way by :func:`atomic_directory`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from .errors import SettingError

IfExists = Literal["error", "keep", "replace"]
# Windows fsyncs only a handle opened for writing; POSIX any descriptor of the file.
_FSYNC_OPEN_FLAGS = os.O_RDWR if os.name == "nt" else os.O_RDONLY


def make_directory(path: str | os.PathLike, setting: str) -> Path:
    """``mkdir -p path``, where the user chose ``path`` as the setting ``setting``: a path that cannot
    be a directory (a file in its place or above it, no permission) is said in one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingError(f"{setting} {path}: cannot make this directory ({exc.strerror or exc}); choose another",
                           setting=setting) from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file, then move it to ``path`` atomically."""

    def write_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write_named(path, write_file)


def atomic_write_named(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """:func:`atomic_write` for a writer that opens the file itself, by name: ``write(tmp)``
    fills the temporary file ``tmp`` (safetensors' ``save_file`` streams tensors this way)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # After writing: mkstemp makes files owner-only, and so may the writer (safetensors
        # replaces the file with its own); use the usual mode.
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, _FSYNC_OPEN_FLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, if_exists: IfExists = "error") -> Iterator[Path]:
    """Yield an empty temporary directory next to ``target``; when the block ends, it becomes ``target``.

    On success every file in it is fsynced, it is renamed to ``target`` and the parent
    directory is fsynced, so ``target`` appears complete or not at all. If the block raises, the
    temporary directory is removed and ``target`` is left as it was. What happens when
    ``target`` already exists is the caller's choice:

    * ``"error"``: raise :class:`FileExistsError`, before the block runs (nothing is written) or,
      if another process created ``target`` meanwhile, at the end (the new one is discarded).
    * ``"keep"``: keep the existing directory and discard the new one (a concurrent writer that
      finished first wins; a cache entry is the same whoever writes it).
    * ``"replace"``: once the new directory is complete, the old one is renamed aside to
      ``.old-<name>``, the new one renamed into place, then the old one removed. A crash
      between those two renames leaves the old directory at ``.old-<name>``.

    An *empty* directory at ``target`` counts as absent: POSIX ``rename`` replaces it. The
    temporary directory is ``.tmp-<name>-*`` and gets the usual mode for the umask (``mkdtemp``
    alone would make it owner-only).
    """
    if if_exists not in ("error", "keep", "replace"):
        raise ValueError(f"if_exists must be 'error', 'keep' or 'replace', not {if_exists!r}")
    target = Path(target)
    if if_exists == "error" and _is_nonempty_dir(target):
        raise FileExistsError(errno.EEXIST, "directory exists", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _fsync_tree(tmp)
        if if_exists == "replace" and _is_nonempty_dir(target):
            _swap_into_place(tmp, target)
        else:
            _rename_unless_exists(tmp, target, if_exists)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    fsync_dir(target.parent)


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _rename_unless_exists(tmp: Path, target: Path, if_exists: IfExists) -> None:
    try:
        os.rename(tmp, target)
    except OSError as exc:
        taken = isinstance(exc, FileExistsError) or exc.errno in (errno.EEXIST, errno.ENOTEMPTY)
        if not (taken and target.exists()):
            raise
        if if_exists == "error":
            raise FileExistsError(errno.EEXIST, "directory exists", str(target)) from None
        # "keep" (or "replace" losing a race to another writer): the existing directory stays.


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = target.parent / f".old-{target.name}"
    shutil.rmtree(old, ignore_errors=True)  # left by a crash in an earlier swap
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (files written atomically are already)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), _FSYNC_OPEN_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows.

    ``os.umask`` can only read the mask by setting it, and the mask is process-wide: for that
    instant a file another thread creates would get mode 0666. Linux reports it in
    /proc/self/status; elsewhere it is read that way once and kept.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _umask_once()


@functools.cache
def _umask_once() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
