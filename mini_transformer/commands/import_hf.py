"""``mini-transformer import``: a Hugging Face Llama-family model as a checkpoint of ours.

(The module is ``import_hf``: ``import`` is a Python keyword.)
"""

from __future__ import annotations

from pathlib import Path

from .common import add_command, add_setting_flags

# Heavy imports (torch among them) wait for run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer import --hf HuggingFaceTB/SmolLM-135M --out out-smollm   # downloads (huggingface_hub)
  mini-transformer import --hf HuggingFaceTB/SmolLM-135M --out out-smollm-bf16 --dtype bf16 --block_size 512
  mini-transformer import --hf out-hf --out out-reimported      # a directory `export` wrote, back again
  mini-transformer generate --checkpoint out-smollm --prompt "Once upon a time"
  mini-transformer finetune --checkpoint out-smollm --data.path data/input.txt --training.out_dir out-smollm-lora
"""

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")  # auto and device.DTYPES (spelled out: no torch here)


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "import", help="turn a Hugging Face Llama-family model into a checkpoint",
        description="Read a Hugging Face model directory (config.json, model.safetensors or its shards, "
                    "tokenizer.json) of a LlamaForCausalLM, or a StableLmForCausalLM as `export` writes it, "
                    "and write a checkpoint of ours for generate, finetune, quantize, bench and export. "
                    "A config asking for anything this model does not compute exactly (RoPE scaling, "
                    "sliding windows, another activation, ...) is refused, naming the setting.",
        examples=EXAMPLES)
    parser.add_argument("--hf", required=True, metavar="DIR",
                        help="the model directory, or ORG/NAME to download from the Hub (needs huggingface_hub)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the checkpoint goes")
    parser.add_argument("--block_size", type=int, default=None, metavar="N",
                        help="context length of the checkpoint, at most the model's max_position_embeddings "
                             "(the default); fine-tuning trains on windows of this length")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="precision of the written weights (default auto: as stored)")
    add_setting_flags(parser, {"block_size": "--block_size", "directory": "--out"})
    parser.set_defaults(run=run)


def run(args, overrides: list[str]) -> int:
    from ..device import DTYPES
    from ..errors import UserError
    from ..interop.hf.importer import download_hf, import_hf, looks_like_repo_id

    source = Path(args.hf).expanduser()
    if not source.exists():
        if not looks_like_repo_id(args.hf):
            raise UserError(f"--hf {args.hf}: no such directory; pass a Hugging Face model directory or ORG/NAME")
        source = download_hf(args.hf)
    elif not source.is_dir():
        raise UserError(f"--hf {args.hf} is a file; pass the model's directory (holding config.json)")
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    out = import_hf(source, args.out, block_size=args.block_size, dtype=dtype)
    from ..checkpoint import read_config

    model = read_config(out).model
    print(f"imported {source} ({model.n_layers} layers, d_model {model.d_model}, vocab {model.vocab_size}, "
          f"context {model.block_size}): written to {out}")
    return 0
