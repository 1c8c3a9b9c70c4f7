"""``mini-transformer finetune``: LoRA fine-tuning of a trained checkpoint on new data."""

from __future__ import annotations

from ..config import SECTIONS
from .common import (DATA_FLAGS, add_command, add_config_arguments, add_setting_flags, config_from_args,
                     list_config_keys)

# Heavy imports (torch among them) wait for run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer finetune --checkpoint out --data.path data/input.txt         # writes out-finetune/
  mini-transformer finetune --checkpoint out-shakespeare-char-cpu --data.dataset shakespeare \\
      --advanced.lora_rank 16 --advanced.lora_targets attention,ffn --training.out_dir out-lora
  mini-transformer finetune --checkpoint out --full --data.path data/input.txt --training.out_dir out-full
"""


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "finetune", help="fine-tune a checkpoint with LoRA (or fully with --full)",
        description="Start from a trained checkpoint (its architecture and tokenizer) and train on new "
                    "data. With LoRA (the default) the base weights are frozen, only the adapters train, "
                    "and the adapter is also saved on its own in out_dir/adapter.",
        examples=EXAMPLES)
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="the base checkpoint or run directory")
    parser.add_argument("--full", action="store_true", help="train all weights instead of LoRA adapters")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true",
                        help="skip the check that refuses a run whose memory estimate exceeds the device's memory")
    add_config_arguments(parser)
    parser.set_defaults(run=run)
    list_config_keys(parser, SECTIONS)
    add_setting_flags(parser, {**DATA_FLAGS, "resume": "--resume", "device": "--training.device",
                               "init_from": "--checkpoint", "force": "--force"})


def run(args, overrides: list[str]) -> int:
    from ..training import train

    config = config_from_args(args, overrides)
    config.training.init_from = args.checkpoint
    config.advanced.use_lora = not args.full
    if config.training.out_dir == "out":
        config.training.out_dir = "out-finetune"
    result = train(config, resume=args.resume, progress=not args.quiet, force=args.force)
    return 0 if result.step > 0 or result.interrupted else 1
