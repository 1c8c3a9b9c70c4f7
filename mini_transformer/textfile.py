"""Reading a text file the user names (a config, a prompts file): every way it can't be read is
one :class:`~mini_transformer.errors.UserError` saying which file and what to do."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import UserError


def read_user_text(path: str | os.PathLike, what: str, fix: str, usual_name: Optional[str] = None) -> str:
    """The UTF-8 text of ``path``; ``what`` names the file in messages ("config file") and
    ``fix`` says what to do when it does not exist. A directory holding ``usual_name`` (a run's
    ``config.yaml``) is answered with that file's path."""
    path = Path(path)
    if path.is_dir():
        meant = path / usual_name if usual_name else None
        such = f" such as {str(meant)!r}" if meant is not None and meant.is_file() else ""
        raise UserError(f"{what} {str(path)!r} is a directory; pass a file{such}")
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} not found; {fix}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"can't read {what} {str(path)!r}: {exc.strerror}; check its permissions") from None
    return decode_utf8(data, f"{what} {str(path)!r}")


def decode_utf8(data: bytes, name: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark is dropped); a UserError naming the first
    bad byte's line and column otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}, column "
                        f"{column}); save it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None

