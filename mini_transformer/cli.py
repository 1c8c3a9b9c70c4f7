"""The ``mini-transformer`` command: one entry point, one subcommand per job.

Each subcommand lives in ``mini_transformer/commands/<name>.py`` and provides
``register(subparsers)``. A mistake the user can fix (:class:`UserError`) is printed as one
line on stderr with exit status 2, never as a traceback; where it names the library's settings,
the line names the command's flags for them (``commands/common.py`` ``with_flags``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time

from .commands.common import CommandParser, with_flags
from .commands.extras import check_extras
from .errors import UserError, out_of_memory, write_error

COMMANDS = ("prepare", "train", "finetune", "generate", "profile", "bench", "quantize", "merge", "plot",
            "export", "import", "serve", "config")
# A command whose name is not a valid module name.
MODULES = {"import": "import_hf"}

EPILOG = """\
examples:
  mini-transformer profile --preset small
  mini-transformer prepare --input data/input.txt --tokenizer char --out data/shakespeare_char
  mini-transformer train --config config.yaml --training.max_iters 100
  mini-transformer generate --prompt "Once upon a time" --max_tokens 200
  mini-transformer config --list

Run `mini-transformer COMMAND --help` for the options of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mini-transformer",
        description="Train, fine-tune, quantize and sample small decoder-only language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for name in COMMANDS:
        module_name = f"mini_transformer.commands.{MODULES.get(name, name)}"
        if importlib.util.find_spec(module_name) is None:  # a command not built yet
            continue
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and, as a console script, exits with) the status code."""
    started = time.perf_counter()  # before torch is imported: training.max_seconds holds it all
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.started = started
    try:
        # The subcommand's own parser: its flags are what a mistyped flag is compared with.
        check_extras(args.command_parser, extra, getattr(args, "accepts_overrides", False))
        status = args.run(args, extra)
    except UserError as exc:
        # One write of the whole line: print() writes the text and the newline separately, and
        # the ranks of a torchrun job share stderr, so two errors could run into one line.
        sys.stderr.write(f"error: {with_flags(exc, getattr(args, 'setting_flags', {}))}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return reader_gone()
    except (OSError, RuntimeError, MemoryError) as exc:
        # What the machine refused (a full disk, no memory) is the user's to change, not a bug.
        failure = write_error(exc) or out_of_memory(exc)
        if failure is None:
            raise
        sys.stderr.write(f"error: {failure}\n")
        sys.stderr.flush()
        return 2
    return int(status or 0)


def reader_gone() -> int:
    """Output piped into a program that stopped reading (``| head``): end quietly, as Unix tools
    do. Python would complain again while flushing stdout at exit, so stdout goes to devnull
    first (the Python documentation's recipe, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (captured in-process): nothing will flush to the pipe
        pass
    return 128 + 13  # what a shell reports for a program that SIGPIPE ended


def run_as_script(command: str) -> None:
    """Entry for the root scripts (``python train.py ...``): ``mini-transformer COMMAND ...``."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
