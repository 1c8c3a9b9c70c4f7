"""``mini-transformer prepare``: text -> train.bin / val.bin / meta.json / tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .common import add_command, add_setting_flags

# Heavy imports (torch among them) wait for run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer prepare --input data/input.txt --tokenizer char --out data/input_char
  mini-transformer prepare --input data/input.txt --tokenizer bpe --vocab_size 2048 --out data/input_bpe
  mini-transformer prepare --input data/ --tokenizer byte --out data/all_byte    # every *.txt in data/
  mini-transformer prepare --input 'docs/**/*.md' README.md --out data/docs
  mini-transformer prepare --input data/input.jsonl --text_field body --tokenizer bpe --out data/input_jsonl  # or .parquet
  cat README.md docs/*.md | mini-transformer prepare --input - --out data/stdin_char
  mini-transformer prepare --dataset pystdlib --tokenizer bpe --out data/pystdlib_bpe
  mini-transformer prepare --dataset shakespeare --out data/shakespeare_char --block_size 256

Several inputs are joined with a blank line ("\\n\\n") between them. The records of a .jsonl or
.parquet file are documents, separated by the end-of-text token (a blank line for char). The last --val_fraction of
the tokens (the end of the text) becomes val.bin. Train with --data.path OUT_DIR.
"""


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "prepare", help="tokenize text into train/val token files",
        description="Tokenize text into train.bin and val.bin (flat uint16/uint32 token ids), "
                    "meta.json and the tokenizer, streaming with bounded memory.",
        examples=EXAMPLES)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="text file(s), a directory (its *.txt files), a quoted glob, - for stdin, "
                             "or JSON Lines (.jsonl) / Parquet (.parquet) files of documents")
    source.add_argument("--dataset", metavar="NAME",
                        help="a named corpus: shakespeare (downloaded once) or pystdlib (this Python's "
                             "standard library sources, no network needed)")
    parser.add_argument("--text_field", default="text", metavar="FIELD",
                        help="the field (column) holding the text in .jsonl and .parquet inputs (default: text)")
    parser.add_argument("--tokenizer", choices=["char", "byte", "bpe", "gpt2"], default="char",
                        help="char: characters of the text; byte: 256 bytes + <|endoftext|>; bpe: byte-level "
                             "BPE trained on the text; gpt2: GPT-2's BPE via tiktoken (default: char)")
    parser.add_argument("--vocab_size", type=int, default=2048, metavar="N",
                        help="BPE vocabulary size, specials included (bpe only; default 2048)")
    parser.add_argument("--bpe_train_bytes", type=int, metavar="N",
                        help="learn the BPE merges from the first N bytes only (bpe only; default: all "
                             "the text); the whole text is still encoded")
    parser.add_argument("--val_fraction", type=float, default=0.1, metavar="F",
                        help="fraction of the tokens, taken from the end, used for validation (default 0.1)")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: data/<input name>_<tokenizer>)")
    parser.add_argument("--block_size", type=int, metavar="T",
                        help="also check that both splits hold at least block_size + 1 tokens")
    parser.add_argument("--cache_dir", default="data/cache", metavar="DIR",
                        help="where --dataset downloads are kept (default: data/cache)")
    parser.add_argument("--chunk_size", type=int, default=1 << 20, metavar="BYTES",
                        help="text read and tokenized per step (default: 1 MiB); memory use grows with it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    add_setting_flags(parser, {"input": "--input", "dataset": "--dataset", "tokenizer": "--tokenizer",
                               "vocab_size": "--vocab_size", "text_field": "--text_field", "directory": "--out"})


def _default_out(args) -> Path:
    if args.dataset:
        name = args.dataset
    elif args.input == ["-"]:
        name = "stdin"
    else:
        name = Path(args.input[0].rstrip("/")).stem or "data"
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return Path("data") / f"{name}_{args.tokenizer}"


def run(args, overrides: list[str]) -> int:
    from ..data import check_split_lengths, dataset_sources, prepare_inputs, write_prepared

    if not 0 < args.chunk_size <= 1 << 30:  # a block is read whole: a huge one is a huge allocation
        raise UserError(f"--chunk_size must be in [1, 2**30] bytes, got {args.chunk_size}; leave it out for the default")
    if args.block_size is not None and args.block_size <= 0:
        raise UserError(f"--block_size must be positive, got {args.block_size}; give the model's block_size, "
                        "or leave it out")
    out = Path(args.out) if args.out else _default_out(args)
    if args.bpe_train_bytes is not None and args.bpe_train_bytes <= 0:
        raise UserError(f"--bpe_train_bytes must be positive, got {args.bpe_train_bytes}; leave it out to learn "
                        "from all the text")
    if not 0.0 < args.val_fraction < 1.0:  # checked here too, so that the message names the flag
        raise UserError(f"--val_fraction must be in (0, 1), got {args.val_fraction}; 0.1 is the default")
    options = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, train_bytes=args.bpe_train_bytes,
                   val_fraction=args.val_fraction,
                   chunk_size=args.chunk_size, progress=not args.quiet)
    if args.dataset:
        data = write_prepared(dataset_sources(args.dataset, args.cache_dir), out, **options)
    else:
        data = prepare_inputs(args.input, out, text_field=args.text_field, **options)
    if args.block_size is not None:
        check_split_lengths(data, args.block_size)
    print(summary(data))
    return 0


def summary(data) -> str:
    meta = data.meta
    sources = meta["sources"]
    total_bytes = sum(s["bytes"] for s in sources)
    what = sources[0]["name"] if len(sources) == 1 else f"{len(sources)} files"
    return "\n".join([
        f"prepared {data.directory} from {what} ({total_bytes:,} bytes)",
        f"  tokenizer  {meta['tokenizer']}, vocabulary {meta['vocab_size']:,}",
        f"  train.bin  {meta['train_tokens']:,} tokens ({meta['dtype']})",
        f"  val.bin    {meta['val_tokens']:,} tokens (the last {meta['split']['val_fraction']:g} of the text)",
        f"  train with --data.path {data.directory}",
    ])
