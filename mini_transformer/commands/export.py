"""``mini-transformer export``: write a checkpoint in another ecosystem's format."""

from __future__ import annotations

from ..interop.hf import ADAPTER_FORMATS  # torch-free
from .common import add_command, add_flag, add_setting_flags

# Heavy imports (torch among them) wait for run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer export --checkpoint out --format hf --out out-hf
  mini-transformer export --checkpoint out-finetune --format hf --out out-hf                # LoRA merged
  mini-transformer export --checkpoint out-finetune --format hf --out out-hf-peft --adapter_format peft
  mini-transformer export --checkpoint out --adapter out-finetune/adapter --format hf --out out-hf
  mini-transformer export --checkpoint out-int8 --format hf --out out-hf --dequantize

then, in Python:
  from transformers import AutoModelForCausalLM, AutoTokenizer
  model, tokenizer = AutoModelForCausalLM.from_pretrained("out-hf"), AutoTokenizer.from_pretrained("out-hf")
  print(tokenizer.decode(model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=50)[0]))
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


# Format -> its exporter; a new format is one more entry (and one more module under interop/).
FORMATS = {"hf": _export_hf}


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "export", help="write a checkpoint as a Hugging Face transformers directory",
        description="Write a checkpoint in another format. hf: a directory that transformers' "
                    "AutoModelForCausalLM and AutoTokenizer load without custom code (norm: rmsnorm as "
                    "LlamaForCausalLM, norm: layernorm as StableLmForCausalLM). A LoRA run exports merged, "
                    "or as a PEFT adapter with --adapter_format peft.",
        examples=EXAMPLES)
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint or a run's out_dir")
    parser.add_argument("--format", default="hf", choices=sorted(FORMATS), help="the output format (default: hf)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the exported directory goes")
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
    FORMATS[args.format](args)
    return 0
