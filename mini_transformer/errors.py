"""The exception types for mistakes a user can make.

The CLI catches :class:`UserError` and prints its message as a single line with exit status 2.
Everything else (programming errors) is left to fail loudly with a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
