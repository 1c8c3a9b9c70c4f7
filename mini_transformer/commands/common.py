"""Arguments shared by the subcommands, and how a command names the library's settings."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from ..config import Config, load_config, preset_names
from ..errors import SettingError, UserError

# The data-source settings as a training config spells them (prepare has flags of its own).
DATA_FLAGS = {"input": "--data.path", "dataset": "--data.dataset", "tokenizer": "--data.tokenizer",
              "vocab_size": "--data.bpe_vocab_size", "text_field": "--data.text_field"}

OVERRIDES_HELP = (
    "Any config key can be overridden as --section.key VALUE or --section.key=VALUE, "
    "for example --model.d_model 128 --training.max_iters 100 --data.path data/input.txt."
)


def add_command(subparsers, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand parser with the examples shown under --help."""
    return subparsers.add_parser(
        name, help=help, description=description, allow_abbrev=False,
        epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration", OVERRIDES_HELP)
    group.add_argument("--config", metavar="FILE", help="a YAML config file")
    group.add_argument("--preset", metavar="NAME",
                       help=f"start from a built-in preset: {', '.join(preset_names())}")
    parser.set_defaults(accepts_overrides=True)
    add_setting_flags(parser, {"preset": "--preset"})


def add_setting_flags(parser: argparse.ArgumentParser, flags: Mapping[str, str]) -> None:
    """Declare the flags that set the library's settings in this command (see :class:`SettingError`)."""
    parser.set_defaults(setting_flags={**(parser.get_default("setting_flags") or {}), **flags})


def with_flags(exc: UserError, flags: Mapping[str, str]) -> str:
    """The message of ``exc`` with the command's flags: the wrong setting's flag in place of its
    name, and the fixes' flags after the words that describe them: ``(--input FILE or --dataset NAME)``.

    A setting the command has no flag for is left in the library's words.
    """
    text = str(exc)
    if not isinstance(exc, SettingError):
        return text
    flag = flags.get(exc.setting) if exc.setting else None
    if flag and not text.startswith(flag):
        name = exc.setting + " "
        text = flag + " " + text[len(name):] if text.startswith(name) else f"{flag}: {text}"
    spelled = [" ".join(f"{flags[name]} {value}".strip() for name, value in fix.items())
               for fix in exc.fixes if fix and all(name in flags for name in fix)]
    return f"{text} ({' or '.join(spelled)})" if spelled else text


def config_from_args(args: argparse.Namespace, overrides: list[str]) -> Config:
    return load_config(args.config, preset=args.preset, overrides=overrides)
