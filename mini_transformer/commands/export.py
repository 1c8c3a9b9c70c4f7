"""``mini-transformer export``: write a checkpoint in another ecosystem's format."""

from __future__ import annotations

from ..interop.gguf import OUTTYPES  # torch-free
from ..interop.hf import ADAPTER_FORMATS  # torch-free
from .common import add_command, add_flag, add_setting_flags

# Heavy imports (torch among them) wait for run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer export --checkpoint out --format hf --out out-hf
  mini-transformer export --checkpoint out-finetune --format hf --out out-hf                # LoRA merged
  mini-transformer export --checkpoint out-finetune --format hf --out out-hf-peft --adapter_format peft
  mini-transformer export --checkpoint out --adapter out-finetune/adapter --format hf --out out-hf
  mini-transformer export --checkpoint out-int8 --format hf --out out-hf --dequantize
  mini-transformer export --checkpoint out --format gguf --out out-model.gguf                   # f32
  mini-transformer export --checkpoint out --format gguf --out out-model-q8_0.gguf --outtype q8_0

then, in Python:
  from transformers import AutoModelForCausalLM, AutoTokenizer
  model, tokenizer = AutoModelForCausalLM.from_pretrained("out-hf"), AutoTokenizer.from_pretrained("out-hf")
  print(tokenizer.decode(model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=50)[0]))

or, for a GGUF file, with llama.cpp:
  llama-cli -m out-model.gguf -p "ROMEO:" -n 200 --temp 0
"""


def _export_hf(args) -> None:
    from ..interop.hf.export import export_hf

    result = export_hf(args.checkpoint, args.out, adapter_format=args.adapter_format, dequantize=args.dequantize,
                       adapter=args.adapter, adapter_out=args.adapter_out)
    for notice in result.notices:
        print(notice)
    print(f"{result.architecture} written to {result.out_dir}")
    if result.adapter_dir is not None:
        print(f"PEFT adapter written to {result.adapter_dir} (peft.PeftModel.from_pretrained(model, "
              f"{str(result.adapter_dir)!r}))")


def _export_gguf(args) -> None:
    from ..interop.gguf.export import export_gguf

    if args.adapter_format != "merged" or args.adapter_out is not None:
        from ..errors import UserError

        raise UserError("a GGUF file holds merged weights only; leave out --adapter-format peft and --adapter-out")
    result = export_gguf(args.checkpoint, args.out, outtype=args.outtype or "f32", dequantize=args.dequantize,
                         adapter=args.adapter)
    for notice in result.notices:
        print(notice)
    print(f"GGUF ({result.architecture}, {result.outtype}) written to {result.path}")


def _check_outtype(args) -> None:
    if args.outtype is not None and args.format != "gguf":
        from ..errors import UserError

        raise UserError(f"--outtype applies to --format gguf only; leave it out for --format {args.format}")


# Format -> its exporter; a new format is one more entry (and one more module under interop/).
FORMATS = {"hf": _export_hf, "gguf": _export_gguf}


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "export", help="write a checkpoint as a Hugging Face transformers directory or a GGUF file",
        description="Write a checkpoint in another format. hf: a directory that transformers' "
                    "AutoModelForCausalLM and AutoTokenizer load without custom code (norm: rmsnorm as "
                    "LlamaForCausalLM, norm: layernorm as StableLmForCausalLM). A LoRA run exports merged, "
                    "or as a PEFT adapter with --adapter_format peft. gguf: one file for llama.cpp "
                    "(llama-cli, llama-server, ollama) with the tokenizer embedded (rmsnorm as llama, layernorm as "
                    "stablelm), in f32, f16 or q8_0 (--outtype).",
        examples=EXAMPLES)
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint or a run's out_dir")
    parser.add_argument("--format", default="hf", choices=sorted(FORMATS), help="the output format (default: hf)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="where the export goes: a directory (hf) or a file (gguf)")
    parser.add_argument("--outtype", choices=OUTTYPES,
                        help="gguf only: the tensor type, f32 (default), f16 or q8_0 (norms and biases stay f32)")
    parser.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (from finetune) to apply to the checkpoint")
    add_flag(parser, "--adapter_format", "--adapter-format", default="merged",
                        choices=ADAPTER_FORMATS,
                        help="merged (default): LoRA folded into the weights; peft: the base weights plus a "
                             "PEFT adapter directory")
    add_flag(parser, "--adapter_out", "--adapter-out", metavar="DIR",
                        help="with --adapter_format peft: where the PEFT adapter goes (default: OUT/adapter)")
    parser.add_argument("--dequantize", action="store_true",
                        help="export a quantized checkpoint as the float32 weights its quantized ones stand for")
    add_setting_flags(parser, {"dequantize": "--dequantize", "directory": "--out", "adapter_out": "--adapter_out",
                               "adapter_format": "--adapter_format"})
    parser.set_defaults(run=run)


def run(args, overrides: list[str]) -> int:
    _check_outtype(args)
    FORMATS[args.format](args)
    return 0
