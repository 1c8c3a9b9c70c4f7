"""``mini-transformer config``: every config key (``--list``), or the config a command line resolves to."""

from __future__ import annotations

import argparse

from ..config import SECTIONS
from .common import add_command, add_config_arguments, config_from_args

# yaml is imported in run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer config --list                     # every key: type, default, meaning
  mini-transformer config --list training            # one section's keys
  mini-transformer config --config config.yaml       # the config as train would use it
  mini-transformer config --preset tiny --max_iters 500 --data.dataset shakespeare
"""


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "config", help="list every config key, or show a resolved config",
        description="With --list: every config key with its type, default and meaning (from "
                    "mini_transformer/config.py). Without: the config that --config, --preset and the "
                    "overrides resolve to, as YAML, checked as train checks it.",
        examples=EXAMPLES)
    parser.add_argument("--list", nargs="*", choices=SECTIONS, metavar="SECTION", dest="list_sections",
                        help=f"list the keys of these sections (default: all of {', '.join(SECTIONS)})")
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.list_sections is not None:
        from ..config_docs import format_keys

        print("Set a key in YAML under its section (model: {d_model: 128}) or on the command line as "
              "--section.key VALUE.\n")
        print(format_keys(args.list_sections or SECTIONS, args.command_parser.prog), end="")
        return 0
    import yaml

    config = config_from_args(args, overrides)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0
