"""``mini-transformer plot OUT_DIR``: loss, learning rate and grad norm curves as PNG."""

from __future__ import annotations

from .common import add_command

# The plotting code (numpy, matplotlib) is imported by run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer plot out
  mini-transformer plot out-shakespeare-char-cpu && xdg-open out-shakespeare-char-cpu/loss.png
  mini-transformer plot out out-shakespeare-char-cpu   # both runs: val loss against wall time
"""


def register(subparsers) -> None:
    parser = add_command(subparsers, "plot", help="plot a run's loss curves to PNG",
                         description="Read OUT_DIR/metrics.jsonl and write loss.png (train and val loss), "
                                     "lr_grad_norm.png (learning rate and gradient norm) and val_loss_vs_time.png "
                                     "(val loss against wall time). With several OUT_DIRs: one figure of their "
                                     "val losses against wall time, written to --output.",
                         examples=EXAMPLES)
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="a training run's out_dir")
    parser.add_argument("--output", metavar="PNG",
                        help="where the val loss against wall time goes (default: OUT_DIR/val_loss_vs_time.png "
                             "for one run, val_loss_vs_time.png here for several)")
    parser.set_defaults(run=run)


def run(args, overrides: list[str]) -> int:
    from ..plot import plot_run, plot_val_loss_vs_time

    if len(args.out_dirs) == 1:
        for path in plot_run(args.out_dirs[0], time_png=args.output):
            print(path)
        return 0
    print(plot_val_loss_vs_time(args.out_dirs, args.output or "val_loss_vs_time.png"))
    return 0
