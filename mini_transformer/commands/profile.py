"""``mini-transformer profile``: parameters, FLOPs, memory, and a measured training step."""

from __future__ import annotations

from .common import add_command, add_config_arguments, add_flag, config_from_args

# Heavy imports (torch among them) wait for run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer profile --preset small
  mini-transformer profile --config config.yaml --model.n_kv_heads 1
  mini-transformer profile --preset gpt2 --no_measure
"""


def register(subparsers) -> None:
    parser = add_command(subparsers, "profile", help="parameter count, FLOPs and memory of a config",
                         description="Print parameter counts, FLOPs per token and memory for a model "
                                     "config, and measure the peak memory of one real training step.",
                         examples=EXAMPLES)
    add_config_arguments(parser)
    add_flag(parser, "--no_measure", "--no-measure", dest="measure", action="store_false",
                        help="skip the measured training step (analytic figures only)")
    parser.set_defaults(run=run)


def run(args, overrides: list[str]) -> int:
    from ..profile import format_table, measure_training_step_peak, profile_rows

    config = config_from_args(args, overrides)
    note = ""
    if config.model.vocab_size is None:
        config.model.vocab_size = 65
        note = "vocab_size is not set (it comes from the tokenizer); 65, Tiny Shakespeare's characters, is assumed.\n"
    measured = measure_training_step_peak(config) if args.measure else None
    name = args.preset or args.config or "defaults"
    print(f"profile of {name}\n{note}")
    print(format_table(profile_rows(config, measured)))
    return 0
