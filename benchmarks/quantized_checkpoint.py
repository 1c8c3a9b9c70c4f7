"""A trained checkpoint against its int8 and int4 copies: file size, exact val perplexity, decode speed.

Quantizes CHECKPOINT with the ``quantize`` command's code path, then evaluates every variant on the
whole validation split of the data it was trained on (an exact pass, like the end of training)
and times greedy generation at batch 1. Prints a markdown table.

    .venv/bin/python benchmarks/quantized_checkpoint.py out-shakespeare-char-cpu
    .venv/bin/python benchmarks/quantized_checkpoint.py out --group_size 32 --dtype bf16
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mini_transformer.checkpoint import (  # noqa: E402
    load_for_inference, load_model, read_config, resolve_checkpoint, save_inference_checkpoint,
)
from mini_transformer.data import iter_sequential_batches, prepare_dataset  # noqa: E402
from mini_transformer.generation import generate  # noqa: E402
from mini_transformer.quantize import quantize_model  # noqa: E402


@torch.no_grad()
def exact_val_loss(model, tokens, block_size: int, dtype: torch.dtype) -> float:
    total, count = 0.0, 0
    for x, y in iter_sequential_batches(tokens, 32, block_size):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not torch.float32):
            loss = model(x, y).loss
        total += loss.item() * y.numel()
        count += y.numel()
    return total / count


def decode_tokens_per_s(model, new_tokens: int = 200, runs: int = 3) -> float:
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    generate(model, prompt, max_new_tokens=20, temperature=0.0)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0)
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--group_size", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16",
                        help="activation dtype for evaluation and decoding (the int kernels need bf16)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    directory = resolve_checkpoint(args.checkpoint)
    config = read_config(directory)
    data = prepare_dataset(config.data, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": directory}
        for mode in ("int8", "int4"):
            model = load_model(directory, "cpu", config)
            quantize_model(model, mode, args.group_size)
            paths[mode] = save_inference_checkpoint(Path(tmp) / mode, model, config, data.tokenizer)
        for name, path in paths.items():
            model, _, _ = load_for_inference(path)
            loss = exact_val_loss(model, data.val, config.model.block_size, dtype)
            rows.append({"variant": name, "bytes": (Path(path) / "model.safetensors").stat().st_size,
                         "val_loss": loss, "ppl": math.exp(loss), "tok_s": decode_tokens_per_s(model)})
    base = rows[0]
    print(f"checkpoint {directory}, {len(data.val):,} val tokens, activations {args.dtype}, "
          f"int4 group size {args.group_size}, {torch.get_num_threads()} threads\n")
    print("| weights | file size | vs fp32 file | val loss | val perplexity | change | decode tok/s (batch 1) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    fp32_bytes = base["bytes"]
    for r in rows:
        print(f"| {r['variant']} | {r['bytes'] / 2**20:.2f} MiB | {fp32_bytes / r['bytes']:.2f}x | "
              f"{r['val_loss']:.4f} | {r['ppl']:.3f} | {r['ppl'] / base['ppl'] - 1:+.2%} | {r['tok_s']:,.0f} |")


if __name__ == "__main__":
    main()
