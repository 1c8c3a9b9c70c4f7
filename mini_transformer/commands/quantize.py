"""``mini-transformer quantize``: weight-only int8/int4 copy of a checkpoint."""

from __future__ import annotations

from .common import add_command, add_setting_flags

# Heavy imports (torch among them) wait for run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer quantize --checkpoint out --mode int8 --out out-int8
  mini-transformer quantize --checkpoint out --mode int4 --group_size 64 --out out-int4
  python generate.py --checkpoint out-int8 --prompt "ROMEO:"
"""


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "quantize", help="quantize a checkpoint's weights to int8 or int4",
        description="Write a weight-only quantized copy of a checkpoint: int8 per output channel "
                    "(symmetric), or int4 in groups along the input (asymmetric). Every Linear layer is "
                    "quantized; --embedding also quantizes the embedding (tied to the LM head).",
        examples=EXAMPLES)
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint or a run's out_dir")
    parser.add_argument("--mode", required=True, help="int8 or int4")
    parser.add_argument("--group_size", type=int, default=None,
                        help="int4 group size: 32, 64 or 128 (default: the config's advanced.quantize_group_size)")
    parser.add_argument("--embedding", action="store_true", help="also quantize the token embedding")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the quantized checkpoint goes")
    parser.set_defaults(run=run)
    add_setting_flags(parser, {"directory": "--out", "group_size": "--group_size"})


def run(args, overrides: list[str]) -> int:
    from ..checkpoint import (
        load_model, load_tokenizer_from, read_config, resolve_checkpoint, save_inference_checkpoint,
    )
    from ..profile import human_bytes
    from ..quantize import check_mode, quantize_model, refuse_if_quantized

    mode = check_mode(args.mode)
    directory = resolve_checkpoint(args.checkpoint, prefer="best")
    refuse_if_quantized(directory)
    config = read_config(directory)
    group_size = args.group_size or config.advanced.quantize_group_size
    model = load_model(directory, "cpu", config)
    quantize_model(model, mode, group_size, include_embedding=args.embedding)
    config.advanced.quantize = mode
    config.advanced.quantize_group_size = group_size
    config.advanced.quantize_embedding = args.embedding
    out = save_inference_checkpoint(args.out, model, config, load_tokenizer_from(directory, config.model.vocab_size),
                                    extra_meta={"quantized_from": str(directory)}, source=directory)
    before = (directory / "model.safetensors").stat().st_size
    after = (out / "model.safetensors").stat().st_size
    detail = f", group size {group_size}" if mode == "int4" else ""
    print(f"{mode}{detail}: {human_bytes(before)} -> {human_bytes(after)} ({before / after:.2f}x smaller), "
          f"written to {out}")
    return 0
