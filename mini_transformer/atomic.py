"""Atomic writes: a crash or ``kill -9`` leaves either the old file or directory, or the new one, never half.

A file goes to a temporary file in the same directory, is flushed and fsynced, and is then
renamed over the target (``os.replace`` is atomic on POSIX and Windows). A directory of files
(a checkpoint, a prepared dataset) is written into a temporary directory next to its target and
renamed into place the same way by :func:`atomic_directory`; one that replaces another is
swapped with it in one step where the OS can (Linux ``renameat2``), and what a kill leaves of a
replace is recovered the next time the directory is written (:func:`recover_replaced`).

A write the machine refuses (a full disk, a read-only or foreign directory) raises
:class:`~mini_transformer.errors.WriteError` naming what was being written.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal, Optional

from .errors import UserError, write_error

IfExists = Literal["error", "keep", "replace"]
# Windows fsyncs only a handle opened for writing; POSIX any descriptor of the file.
_FSYNC_OPEN_FLAGS = os.O_RDWR if os.name == "nt" else os.O_RDONLY


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
    make_dirs(path.parent)
    with reported_as(path):
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
    * ``"replace"``: once the new directory is complete, it takes the old one's place. On
      Linux the two are exchanged in one step (``renameat2(RENAME_EXCHANGE)``), so ``target`` is
      always one of them, and the old one is removed after. Elsewhere (or on a file system
      without the exchange) the old one is renamed aside to ``.old-<name>``, the new one into
      place, and the old one removed; a kill between those two renames leaves no ``target``,
      and the next :func:`atomic_directory` of ``target`` (or :func:`recover_replaced`) renames
      ``.old-<name>`` back.

    An *empty* directory at ``target`` counts as absent: POSIX ``rename`` replaces it. The
    temporary directory is ``.tmp-<name>-<pid>-*`` and gets the usual mode for the umask
    (``mkdtemp`` alone would make it owner-only); one whose process is gone is a kill's
    leftover, removed the next time. A refused write raises
    :class:`~mini_transformer.errors.WriteError` naming ``target``.
    """
    if if_exists not in ("error", "keep", "replace"):
        raise ValueError(f"if_exists must be 'error', 'keep' or 'replace', not {if_exists!r}")
    target = Path(target)
    make_dirs(target.parent)
    recover_replaced(target, stale_temporaries=if_exists == "replace")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is a file, not a directory; choose another path, or move the file away")
    if if_exists == "error" and _is_nonempty_dir(target):
        raise FileExistsError(errno.EEXIST, "directory exists", str(target))
    with reported_as(target):
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_tmp_prefix(target.name)}{os.getpid()}-"))
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


def make_dirs(directory: str | os.PathLike) -> Path:
    """``mkdir -p directory``; a :class:`UserError` if a file stands in the way or the machine refuses."""
    directory = Path(directory)
    with reported_as(directory):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            check_can_be_directory(directory)
            raise
    return directory


def check_can_be_directory(directory: str | os.PathLike) -> None:
    """Refuse, before any work, a directory to write that a file stands in the way of (itself or a parent)."""
    directory = Path(directory)
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"can't create the directory {directory}: {blocker} is a file; choose another path, "
                        "or move the file away")


@contextlib.contextmanager
def reported_as(path: str | os.PathLike) -> Iterator[None]:
    """Raise a refused write in the block (full disk, read-only, ...) as a WriteError naming ``path``."""
    try:
        yield
    except Exception as exc:
        failure = write_error(exc, path)
        if failure is None:
            raise
        raise failure from exc


def recover_replaced(target: str | os.PathLike, stale_temporaries: bool = True) -> None:
    """Clean up what a kill left of writing ``target`` with :func:`atomic_directory`.

    ``target`` missing and ``.old-<name>`` present: the kill came between the two renames of a
    replace, and the old directory is renamed back. ``.old-<name>`` beside a ``target``: the
    kill came before it was removed; it is removed. With ``stale_temporaries``, a
    ``.tmp-<name>-<pid>-*`` whose process is gone (it was never renamed into place) is removed
    too. That is left out for shared directories such as a data cache, whose writers may run on
    other machines (where the PID means nothing); a run directory's are pruned under its lock.
    """
    target = Path(target)
    old = _old_name(target)
    if old.is_dir():
        if os.path.lexists(target):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, target)
    if not stale_temporaries:
        return
    prefix = _tmp_prefix(target.name)
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            if entry.name.startswith(prefix):
                pid = re.fullmatch(r"(\d+)-[^-]+", entry.name[len(prefix):])
                if pid and not _process_alive(int(pid.group(1))):
                    shutil.rmtree(entry.path, ignore_errors=True)


def _tmp_prefix(name: str) -> str:
    return f".tmp-{name}-"


def _old_name(target: Path) -> Path:
    return target.parent / f".old-{target.name}"


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (True where that can't be told safely)."""
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) on Windows would terminate it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


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
    if _exchange(tmp, target):  # target holds the new directory now, tmp the old one (removed after)
        return
    old = _old_name(target)
    shutil.rmtree(old, ignore_errors=True)  # left by a crash in an earlier swap
    os.rename(target, old)
    os.rename(tmp, target)  # a kill before this leaves only .old-<name>: recover_replaced
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step; False where the OS or file system can't."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    import ctypes

    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # not on this file system
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.cache
def _renameat2() -> Optional[Callable[..., int]]:
    """glibc's ``renameat2`` (Linux 3.15, glibc 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


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
