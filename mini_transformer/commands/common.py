"""Arguments shared by the subcommands that take a config."""

from __future__ import annotations

import argparse

from ..config import Config, load_config, preset_names

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


def config_from_args(args: argparse.Namespace, overrides: list[str]) -> Config:
    return load_config(args.config, preset=args.preset, overrides=overrides)
