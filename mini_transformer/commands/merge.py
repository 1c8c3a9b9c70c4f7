"""``mini-transformer merge``: fold a LoRA adapter into its base checkpoint."""

from __future__ import annotations

from .common import add_command, add_setting_flags

# Heavy imports (torch among them) wait for run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer merge --checkpoint out --adapter out-finetune/adapter --out out-merged
  python generate.py --checkpoint out-merged --prompt "ROMEO:"
"""


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "merge", help="fold a LoRA adapter into its base weights",
        description="Load a base checkpoint and a LoRA adapter trained on it, fold B·A·(alpha/rank) into "
                    "the base weights, and write a plain checkpoint that generates without the adapter.",
        examples=EXAMPLES)
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="the base checkpoint or out_dir")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="the adapter directory (adapter.json)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the merged checkpoint goes")
    parser.set_defaults(run=run)
    add_setting_flags(parser, {"directory": "--out"})


def run(args, overrides: list[str]) -> int:
    from ..checkpoint import load_model, load_tokenizer_from, read_config, resolve_checkpoint, save_inference_checkpoint
    from ..lora import load_adapter, merge_lora

    directory = resolve_checkpoint(args.checkpoint, prefer="best")
    config = read_config(directory)
    model = load_model(directory, "cpu", config)
    load_adapter(args.adapter, model)
    merge_lora(model)
    config.advanced.use_lora = False
    out = save_inference_checkpoint(args.out, model, config, load_tokenizer_from(directory, config.model.vocab_size),
                                    extra_meta={"merged_adapter": str(args.adapter), "base": str(directory)},
                                    source=directory)
    print(f"merged {args.adapter} into {directory}: written to {out}")
    return 0
