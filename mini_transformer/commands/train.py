"""``mini-transformer train`` (and the root ``python train.py``): train or resume a model."""

from __future__ import annotations

from ..config import SECTIONS
from .common import (DATA_FLAGS, add_command, add_config_arguments, add_setting_flags, config_from_args,
                     list_config_keys)

# Heavy imports (torch among them) wait for run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  python train.py --config config.yaml                   # your text in data/input.txt; writes out/
  python train.py --config config.yaml --resume
  mini-transformer train --config configs/shakespeare_char_cpu.yaml --data.dataset shakespeare
  mini-transformer train --preset tiny --data.dataset shakespeare --max_iters 500 --training.out_dir out-tiny
  torchrun --nproc_per_node 2 train.py --config configs/shakespeare_char_cpu.yaml --data.dataset shakespeare
"""


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "train", help="train a model (or resume with --resume)",
        description="Train a model from a YAML config. The data in data.path is tokenized on first use "
                    "and cached; checkpoints, metrics.jsonl and TensorBoard logs go to training.out_dir.",
        examples=EXAMPLES)
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue exactly from the latest checkpoint in training.out_dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true",
                        help="skip the check that refuses a run whose memory estimate exceeds the device's memory")
    parser.set_defaults(run=run)
    list_config_keys(parser, SECTIONS)
    add_setting_flags(parser, {**DATA_FLAGS, "resume": "--resume", "device": "--training.device",
                               "init_from": "--training.init_from", "force": "--force"})


def run(args, overrides: list[str]) -> int:
    from ..training import train

    config = config_from_args(args, overrides)
    result = train(config, resume=args.resume, progress=not args.quiet, force=args.force,
                   started=args.started)
    return 0 if result.step > 0 or result.interrupted else 1
