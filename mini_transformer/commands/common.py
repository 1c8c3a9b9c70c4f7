"""Arguments shared by the subcommands, and how a command names the library's settings."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from ..config import Config, load_config, preset_names
from ..errors import SettingError, UserError

# The data-source settings as a training config spells them (prepare has flags of its own).
DATA_FLAGS = {"input": "--data.path", "dataset": "--data.dataset", "tokenizer": "--data.tokenizer",
              "vocab_size": "--data.bpe_vocab_size", "text_field": "--data.text_field"}

# Written with its line breaks: the commands' help keeps descriptions as they are written.
OVERRIDES_HELP = """\
Any config key can be overridden as --section.key VALUE or --section.key=VALUE, e.g.
--model.d_model 128 --training.max_iters 100 --data.path data/input.txt; as in YAML, a key
may also go without its section (--max_iters 100). `mini-transformer config --list` lists
every key with its type, default and meaning."""


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser. Its --help can list config keys (see :func:`list_config_keys`); the
    listing is built only when help is shown, so parsing stays as fast as before."""

    config_key_sections: tuple[str, ...] = ()

    def format_help(self) -> str:
        if not self.config_key_sections:
            return super().format_help()
        from ..config_docs import format_keys

        # Between the options and the examples, so that the examples end the help text.
        epilog = self.epilog
        self.epilog = format_keys(self.config_key_sections, self.prog) + "\n" + (epilog or "")
        try:
            return super().format_help()
        finally:
            self.epilog = epilog


def list_config_keys(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """Have ``parser``'s --help list the keys of these config sections (type, default, meaning)."""
    parser.config_key_sections = sections  # read by CommandParser.format_help


def add_flag(container, flag: str, *hidden_aliases: str, **kwargs) -> argparse.Action:
    """Add ``flag`` (to a parser or an argument group), and accept each of ``hidden_aliases`` as
    another spelling of it that --help does not show: the old dashed spellings, so that scripts
    written for them keep working while the help shows one spelling (underscores)."""
    action = container.add_argument(flag, **kwargs)
    same = {key: value for key, value in kwargs.items() if key not in ("help", "default", "dest", "required")}
    for alias in hidden_aliases:
        container.add_argument(alias, dest=action.dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **same)
    return action


def add_command(subparsers, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand parser with the examples shown under --help."""
    parser = subparsers.add_parser(
        name, help=help, description=description, allow_abbrev=False,
        epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(command_parser=parser)  # the CLI compares a mistyped flag with this parser's
    return parser


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
