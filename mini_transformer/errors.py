"""The exception types for mistakes a user can make.

The CLI catches :class:`UserError` and prints its message as a single line with exit status 2.
Everything else (programming errors) is left to fail loudly with a traceback.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional


class UserError(Exception):
    """A mistake in input, configuration or files that the user can fix.

    The message says what is wrong and how to fix it, in one line.
    """


class SettingError(UserError):
    """A :class:`UserError` about settings, which a front end may spell its own way.

    The message names settings in the library's terms; the command line adds its flags (see
    ``mini_transformer/commands/common.py``). A setting's name is a function argument
    (``vocab_size``, ``group_size``, ``directory``, ``resume``) or one of the data-source roles
    that both ``prepare`` and a training config have: ``input`` (the text to read), ``dataset``
    (a built-in corpus) and ``tokenizer`` (its kind).

    ``setting`` is the setting that is wrong; a message about it starts with its name
    ("vocab_size for bpe must be ..."). ``fixes`` are the alternatives that would fix the
    mistake, each a mapping from setting to value ("" for a switch), which the message has
    already described in words, last: ``[{"input": "FILE"}, {"dataset": "NAME"}]``.
    """

    def __init__(self, message: str, *, setting: Optional[str] = None,
                 fixes: Sequence[Mapping[str, str]] = ()) -> None:
        super().__init__(message)
        self.setting = setting
        self.fixes = [dict(fix) for fix in fixes]


def first_line(exc: BaseException, limit: Optional[int] = None) -> str:
    """The first line of ``exc``'s text (at most ``limit`` characters), or its type's name if it has none.

    For one-line errors that quote a library's own message (a Rust or C error may run to many lines).
    """
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit] if limit is not None else line


# Writes the machine refuses: not a bug but its state, which the user can change. errno ->
# (what happened, what to do). EDQUOT is missing on Windows.
_UNWRITABLE: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    getattr(errno, "EDQUOT", -1): ("the disk quota is exceeded", "free some space or raise the quota"),
    errno.EFBIG: ("the file is too large for the file system", "write to another file system"),
    errno.EROFS: ("the file system is read-only", "write to another location"),
    errno.EACCES: ("permission denied", "write to another location or fix its permissions"),
    errno.EPERM: ("the operation is not permitted", "write to another location or fix its permissions"),
}
# Permission errors name a file; one outside the place being written is a failed *read*.
_PERMISSIONS = (errno.EROFS, errno.EACCES, errno.EPERM)
# A Rust library (safetensors) reports an OSError as text: "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class WriteError(UserError):
    """A write that the machine refused: the disk is full, the quota spent, the place read-only
    or not ours. ``path`` is what was being written, ``errno`` the OS error, ``reason`` and
    ``fix`` the words for it."""

    def __init__(self, path: Optional[str | os.PathLike], code: int) -> None:
        self.path = None if path is None else Path(path)
        self.errno = code
        self.reason, self.fix = _UNWRITABLE[code]
        where = f" {self.path}" if self.path is not None else ""
        super().__init__(f"can't write{where}: {self.reason}; {self.fix}, then run the command again")

    @property
    def out_of_space(self) -> bool:
        return self.errno not in _PERMISSIONS


def write_error(exc: BaseException, path: Optional[str | os.PathLike] = None) -> Optional[WriteError]:
    """``exc`` as a :class:`WriteError` about ``path`` if it (or an exception it was raised from)
    is a refused write, else None.

    Libraries wrap the OSError: torch.save's zip writer raises a RuntimeError while handling it,
    safetensors puts its errno in the text. ``path`` is what the caller was writing; without it,
    the OSError's own file name.
    """
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = _errno_of(current)
        if code in _UNWRITABLE and _concerns(current, code, path):
            return WriteError(path if path is not None else getattr(current, "filename", None), code)
        current = current.__cause__ or current.__context__
    return None


def _errno_of(exc: BaseException) -> Optional[int]:
    if isinstance(exc, WriteError):
        return exc.errno
    if isinstance(exc, OSError):
        return exc.errno
    match = _RUST_OS_ERROR.search(str(exc))
    return int(match.group(1)) if match else None


def _concerns(exc: BaseException, code: int, path: Optional[str | os.PathLike]) -> bool:
    """Whether a permission error is about ``path``: a file in it, or one of the temporary siblings
    that atomic writes use (``.NAME.*.tmp``, ``.tmp-NAME-*``)."""
    filename = getattr(exc, "filename", None)
    if code not in _PERMISSIONS or path is None or not isinstance(filename, (str, os.PathLike)):
        return True
    target, written = Path(os.path.abspath(path)), Path(os.path.abspath(filename))
    if written.is_relative_to(target):
        return True
    if not written.is_relative_to(target.parent) or written == target.parent:
        return written == target.parent  # creating a file in the parent directory itself
    sibling = written.relative_to(target.parent).parts[0]
    return sibling.startswith((f".{target.name}.", f".tmp-{target.name}-"))


def out_of_memory(exc: BaseException) -> Optional[UserError]:
    """``exc`` as a one-line UserError if it is an allocation that failed for want of memory
    (numpy's MemoryError, torch's out-of-memory errors on CPU and GPU), else None."""
    text = first_line(exc, 200)
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    return UserError(f"out of memory ({text}); use a smaller model, batch_size or block_size, "
                     "or a device with more memory")
