"""``mini-transformer plot OUT_DIR``: loss, learning rate and grad norm curves as PNG."""

from __future__ import annotations

from .common import add_command

# The plotting code (numpy, matplotlib) is imported by run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer plot out
  mini-transformer plot out-shakespeare-char-cpu && xdg-open out-shakespeare-char-cpu/loss.png
"""


def register(subparsers) -> None:
    parser = add_command(subparsers, "plot", help="plot a run's loss curves to PNG",
                         description="Read OUT_DIR/metrics.jsonl and write loss.png (train and val loss) "
                                     "and lr_grad_norm.png (learning rate and gradient norm).",
                         examples=EXAMPLES)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="a training run's out_dir")
    parser.set_defaults(run=run)


def run(args, overrides: list[str]) -> int:
    from ..plot import plot_run

    for path in plot_run(args.out_dir):
        print(path)
    return 0
