"""The arguments a command's parser did not take: config overrides, or a mistake to name.

argparse hands back what it does not know (``parse_known_args``). For a command that takes a
config, that is its ``--section.key VALUE`` overrides (or ``--key VALUE``, as YAML allows); for
the others, nothing. Anything else is refused in one line that names the nearest flag or key,
as unknown keys in a config file are.
"""

from __future__ import annotations

import argparse
import difflib

from ..config import SECTION_TYPES, config_keys
from ..errors import UserError


def check_extras(parser: argparse.ArgumentParser, extras: list[str], accepts_overrides: bool) -> None:
    """Raise :class:`UserError` for the first of ``extras`` that is neither an override (when the
    command takes them) nor its value."""
    keys = config_keys()
    flat = {key.split(".", 1)[1] for key in keys}
    i = 0
    while i < len(extras):
        arg = extras[i]
        if not arg.startswith("-") or arg == "-":
            raise UserError(f"unexpected argument {arg!r}{_positional_hint(parser, arg)}")
        name = arg.split("=", 1)[0]
        if accepts_overrides and (name[2:] in keys or name[2:] in flat):
            i += 1 if "=" in arg else 2  # the value is checked with the config
            continue
        nearest = nearest_flag(name, visible_flags(parser), keys if accepts_overrides else [])
        if nearest:
            hint = f"did you mean {nearest}?"
        elif accepts_overrides and "." in name:
            hint = "`mini-transformer config --list` lists every key"
        else:
            hint = f"see {parser.prog} --help"
        raise UserError(f"unknown option {name} for {parser.prog}; {hint}")


def visible_flags(parser: argparse.ArgumentParser) -> list[str]:
    """The long flags --help shows (hidden aliases are accepted but not suggested)."""
    return [flag for action in parser._actions if action.help is not argparse.SUPPRESS
            for flag in action.option_strings if flag.startswith("--")]


def nearest_flag(name: str, flags: list[str], keys: list[str]) -> str | None:
    """The flag or ``--section.key`` closest to ``name``: within the section when ``name`` names
    a real one (``--training.foo`` is compared with training's keys alone); else among all flags
    and keys, then by the key's own name (``--max_iter`` -> ``--training.max_iters``)."""
    section, _, leaf = name.lstrip("-").rpartition(".")
    if section in SECTION_TYPES:
        keys = [key for key in keys if key.startswith(f"{section}.")]
    else:
        close = difflib.get_close_matches(name, flags + [f"--{key}" for key in keys], n=1, cutoff=0.6)
        if close:
            return close[0]
    by_leaf = {key.split(".", 1)[1]: key for key in keys}
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return f"--{by_leaf[match[0]]}" if match else None


def _positional_hint(parser: argparse.ArgumentParser, arg: str) -> str:
    """A stray word: a config file given without --config is the usual one."""
    if arg.endswith((".yaml", ".yml")) and "--config" in visible_flags(parser):
        return f"; did you mean --config {arg}?"
    return f"; see {parser.prog} --help"
