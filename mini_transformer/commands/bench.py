"""``mini-transformer bench``: the model-size table (tiny to large), measured here; the HF peer side by side."""

from __future__ import annotations

from pathlib import Path

from .common import add_command, add_flag, add_setting_flags

# Heavy imports (torch among them) wait for run(): the parser, and so --help, stays fast.

EXAMPLES = """\
  mini-transformer bench                                  # tiny..large, batch 32, block 256
  mini-transformer bench --presets tiny small --dtype fp32 --no_memory
  mini-transformer bench --compare hf                     # ours vs transformers' LlamaForCausalLM
  mini-transformer bench --compare hf --presets small --dtype bf16
  mini-transformer bench --compare llamacpp               # ours vs llama.cpp decoding the same weights (GGUF)
  mini-transformer bench --compare llamacpp --compile --batches 1 4 8 16   # + compiled step, batched table
  mini-transformer bench --profile --presets small        # training: Chrome trace + top operators
  mini-transformer bench --profile decode                 # where a generated token's time goes (CPU)
  mini-transformer bench --profile decode --presets small --compile --gen_tokens 100
"""


# The flags that count something and must be at least 1.
COUNTS = ("batch_size", "block_size", "steps", "gen_tokens")


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "bench", help="measure training/generation speed, memory and MFU",
        description="Measure, on this machine: parameters, peak memory of a training step (with and "
                    "without gradient checkpointing), training tokens/s, MFU (the model's FLOPs per second over "
                    "the throughput of a matmul measured at start-up, not the datasheet peak), and "
                    "generation tokens/s at batch 1 with the KV-cache. "
                    "Writes markdown and JSON to --out.",
        examples=EXAMPLES)
    parser.add_argument("--presets", nargs="+", default=None, metavar="NAME",
                        help="presets to run (default: tiny small medium large; with --compare: tiny small)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="sequences per training step (default: 32); with --profile decode, prompts "
                             "decoded together (default: 1)")
    parser.add_argument("--block_size", type=int, default=None,
                        help="context length (default 256 for the table, each preset's own with --compare)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="with --compare, 'auto' runs both fp32 and bf16 (against llama.cpp: f32 and f16 "
                             "files); with --profile decode, fp32")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_setting_flags(parser, {"device": "--device", **{name: f"--{name}" for name in COUNTS}})
    parser.add_argument("--steps", type=int, default=5,
                        help="timed training steps (median); large takes fewer; with --profile decode, "
                             "timed generations")
    parser.add_argument("--gen_tokens", type=int, default=200, help="tokens generated per timing (default: 200)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile our training step and our decode step")
    add_flag(parser, "--no_memory", "--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory measurements (each runs in a fresh process)")
    parser.add_argument("--compare", choices=["hf", "llamacpp"],
                        help="also time a peer: hf, Hugging Face LlamaForCausalLM; llamacpp, llama.cpp's greedy "
                             "decoding of the same weights exported to GGUF (needs llama-cpp-python)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, metavar="N",
                        help="with --compare llamacpp: batch sizes for a batched-decoding table "
                             "(for example 1 4 8 16; default: batch 1 only)")
    parser.add_argument("--profile", nargs="?", const="train", choices=["train", "decode"],
                        help="train (the default): a torch.profiler Chrome trace of a few training steps and the "
                             "top ops; decode: where a generated token's time goes on the CPU (matmuls, "
                             "attention, other ops, sampling, overhead), with a Chrome trace")
    parser.add_argument("--out", default="bench_out", metavar="DIR", help="where markdown and JSON go")
    parser.set_defaults(run=run)


def run(args, overrides: list[str]) -> int:
    import torch

    from .. import benchmark as bench
    from ..atomic import check_can_be_directory
    from ..device import dtype_name, resolve_device, resolve_dtype
    from ..errors import UserError

    bench.check_counts(**{name: getattr(args, name) for name in COUNTS})
    if args.batches and args.compare != "llamacpp":
        raise UserError("--batches sizes the batched-decoding table of --compare llamacpp; "
                        "add --compare llamacpp or leave --batches out")
    out = Path(args.out)
    check_can_be_directory(out)  # before minutes of measuring
    decode_profile = args.profile == "decode"
    if decode_profile and args.device not in ("auto", "cpu"):
        raise UserError("bench --profile decode profiles decoding on the CPU; leave out --device or set it to cpu")
    device = torch.device("cpu") if decode_profile else resolve_device(args.device)
    machine = bench.machine_description(device)
    print(f"machine: {machine}")
    if decode_profile:
        return _profile_decode(args, out, machine)
    batch_size = args.batch_size or 32  # for training; decoding has its own default
    if args.profile:
        for preset in args.presets or ["small"]:
            trace = out / f"trace-{preset}.json"
            table = bench.profile_training(preset, trace, batch_size=batch_size, block_size=args.block_size,
                                           dtype_spec=args.dtype, device_spec=args.device)
            print(f"\n{preset}: Chrome trace written to {trace} (open in chrome://tracing or Perfetto)\n{table}")
        return 0
    if args.compare == "llamacpp":
        return _compare_llamacpp(args, out, machine)
    # The table's header comes first and each row as soon as it is measured: a preset can take
    # minutes, and the reader sees what is being measured from the start.
    if args.compare:
        dtypes = ["fp32", "bf16"] if args.dtype == "auto" else [args.dtype]
        print(f"ours vs Hugging Face LlamaForCausalLM (same dimensions, sdpa, {torch.get_num_threads()} threads); "
              "ratio = our speed / peer speed; speeds are medians of the timed runs\n")
        print("\n".join(bench.COMPARE_HEADER), flush=True)
        rows = []
        for preset in args.presets or ["tiny", "small"]:
            for dtype in dtypes:
                rows.append(bench.compare_with_hf(preset, dtype, batch_size, args.block_size, args.device,
                                                  args.steps, gen_tokens=args.gen_tokens,
                                                  compile_model=args.compile))
                print(bench.compare_row(rows[-1]), flush=True)
        finish(out, "compare_hf", bench.compare_table(rows), [bench.compare_busy_note(rows)], rows, machine)
        return 0
    settings = bench.BenchSettings(
        presets=args.presets or ["tiny", "small", "medium", "large"], batch_size=batch_size,
        block_size=args.block_size or 256, dtype=args.dtype, device=args.device, steps=args.steps,
        gen_tokens=args.gen_tokens, memory=args.memory, compile=args.compile)
    print(f"batch {settings.batch_size}, block {settings.block_size}, "
          f"dtype {dtype_name(resolve_dtype(settings.dtype, device))}, vocab {bench.VOCAB_SIZE}; "
          f"speeds are the median of the timed runs (the slowest-fastest run in brackets)\n")
    print("\n".join(bench.BENCH_HEADER), flush=True)
    rows = []
    for preset in settings.presets:
        rows.append(bench.bench_preset(preset, settings))
        print(bench.bench_row(rows[-1]), flush=True)
    finish(out, "bench", bench.bench_table(rows), [bench.mfu_note(rows), bench.busy_note(rows)], rows, machine)
    return 0


def finish(out: Path, name: str, table: str, notes: list[str | None], rows: list, machine: str) -> None:
    """Print the notes under the table printed row by row; write the table and notes to ``out``."""
    from .. import benchmark as bench

    notes = [note for note in notes if note]
    if notes:
        print("\n" + "\n".join(notes), flush=True)
    bench.write_results(out, name, "\n\n".join([table, *notes]), rows, machine)


def _compare_llamacpp(args, out: Path, machine: str) -> int:
    import torch

    from .. import benchmark as bench
    from ..errors import UserError
    from ..interop.gguf.peer import PEER_OUTTYPES, batched_table, compare_with_llamacpp, llamacpp_table

    if args.dtype not in ("auto", *PEER_OUTTYPES) or args.device not in ("auto", "cpu"):
        raise UserError("bench --compare llamacpp runs on the CPU in fp32 (against an f32 GGUF file) or bf16 "
                        "(against f16); set --dtype to auto (both), fp32 or bf16 and leave out --device")
    batches = sorted(set(args.batches or [1]) | {1})
    if any(b < 1 for b in batches):
        raise UserError(f"--batches must be positive batch sizes, got {args.batches}; for example --batches 1 4 8 16")
    graphs = torch._dynamo.config.recompile_limit  # compiled graphs Dynamo keeps per function
    if args.compile and len(batches) > graphs:
        # Each batch size is a graph of its own, and past Dynamo's limit per function the step
        # would run eagerly while its column says compiled.
        raise UserError(f"--compile measures at most {graphs} batch sizes (batch 1 included), "
                        f"got {len(batches)}; pass fewer --batches")
    dtypes = list(PEER_OUTTYPES) if args.dtype == "auto" else [args.dtype]
    rows = []
    for preset in args.presets or ["tiny", "small"]:
        for dtype in dtypes:
            rows.append(compare_with_llamacpp(preset, dtype=dtype, compile_model=args.compile,
                                              batch_sizes=batches,
                                              block_size=args.block_size, gen_tokens=args.gen_tokens))
            print(llamacpp_table(rows[-1:]).splitlines()[-1], flush=True)
    table = llamacpp_table(rows)
    title = (f"ours vs llama.cpp, batch-1 greedy decoding of the same weights exported to GGUF, "
             f"{rows[0]['prompt_tokens']}-token prompt, {rows[0]['gen_tokens']} new tokens, timed in turn; "
             "ratio = our speed / llama.cpp's; same tokens: every way of ours gave llama.cpp's greedy tokens")
    parts = [title, table]
    if any(b > 1 for b in batches):
        parts += [f"batched decoding, ours {'compiled' if args.compile else 'eager'} (tokens/s over all rows)",
                  batched_table(rows)]
    print("\n" + "\n\n".join(parts))
    bench.write_results(out, "compare_llamacpp", "\n\n".join(parts), rows, machine)
    return 0


def _profile_decode(args, out: Path, machine: str) -> int:
    from .. import benchmark as bench
    from .. import decode_profile

    rows = []
    for preset in args.presets or ["tiny", "small"]:
        rows.append(decode_profile.profile_decode(
            preset, out / f"trace-decode-{preset}.json", dtype_spec=args.dtype, batch_size=args.batch_size or 1,
            block_size=args.block_size or 256, gen_tokens=args.gen_tokens, compile_model=args.compile,
            repeats=args.steps))
        print(f"\n{decode_profile.report(rows[-1])}", flush=True)
    note = decode_profile.profiler_note(rows)
    print(f"\n{note}")
    bench.write_results(out, "profile_decode", "\n\n".join([*map(decode_profile.report, rows), note]), rows,
                        machine)
    return 0
