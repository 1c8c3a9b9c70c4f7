"""Weight-only quantization on CPU: kernel speed, decode-step speed, file sizes. Prints tables.

    .venv/bin/python benchmarks/quantize.py            # everything (~2 minutes on 2 cores)
    .venv/bin/python benchmarks/quantize.py --quick    # fewer shapes and repeats

Tables:
1. One Linear, (rows, in) @ (out, in)^T, microseconds (min of repeats): fp32 and bf16 matmuls
   vs the paths an Int8Linear/Int4Linear can take: PyTorch's CPU kernels
   (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) or dequantize + ``F.linear``.
   This is what ``KERNEL_MAX_ROWS`` and the fp32 policy in ``mini_transformer/quantize.py`` rest on.
2. One decode step (one token, KV-cache) and a prefill of the whole model, fp32/bf16/int8/int4.
3. On-disk size of the small preset (d_model 256, 8 heads, 6 layers, vocab 65) as safetensors.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mini_transformer.config import ModelConfig  # noqa: E402
from mini_transformer.model import KVCache, Transformer  # noqa: E402
from mini_transformer.quantize import (  # noqa: E402
    dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, quantize_model, save_quantized, unpack_int4,
)
from mini_transformer.weights import weights_state_dict  # noqa: E402
from safetensors.torch import save as save_safetensors_bytes  # noqa: E402


CLOCK: Callable[[], float] = time.perf_counter


def timeit(fn: Callable[[], object], repeats: int, min_time: float = 0.05) -> float:
    """Minimum over ``repeats`` runs of the mean time per call in a ``min_time`` window, in us.

    The minimum, because a shared machine's noise only ever adds time. With ``--clock cpu`` (one
    thread) the clock is this thread's CPU time, which doesn't count time spent descheduled.
    """
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        n, start = 0, CLOCK()
        while True:
            fn()
            n += 1
            elapsed = CLOCK() - start
            if elapsed >= min_time:
                break
        best = min(best, elapsed / n)
    return best * 1e6


def linear_table(shapes: list[tuple[int, int]], rows_list: list[int], repeats: int, group_size: int) -> None:
    print("\n## One Linear: microseconds per call (min of repeats); k = CPU kernel, dq = dequantize + F.linear")
    cols = ["fp32", "bf16", "i8 k bf16", "i8 dq bf16", "i8 k fp32", "i8 dq fp32",
            "i4 k bf16", "i4 dq bf16", "i4 dq fp32"]
    print("| out x in | rows | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 2))
    torch.manual_seed(0)
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f) * 0.02
        wb = w.bfloat16()
        q8, s8 = quantize_int8(w)
        s8b = s8.bfloat16()
        p4, sc4, z4 = quantize_int4(w, group_size)
        k4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(p4).to(torch.int32), 2)
        sz4 = torch.stack([sc4, z4], -1).transpose(0, 1).contiguous()  # (groups, out, 2) bf16
        for rows in rows_list:
            x = torch.randn(rows, in_f)
            xb = x.bfloat16()
            fns = {
                "fp32": lambda: F.linear(x, w),
                "bf16": lambda: F.linear(xb, wb),
                "i8 k bf16": lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, s8b),
                "i8 dq bf16": lambda: F.linear(xb, dequantize_int8(q8, s8b, torch.bfloat16)),
                "i8 k fp32": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8),
                "i8 dq fp32": lambda: F.linear(x, dequantize_int8(q8, s8)),
                "i4 k bf16": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, k4, group_size, sz4),
                "i4 dq bf16": lambda: F.linear(xb, dequantize_int4(p4, sc4, z4, group_size, torch.bfloat16)),
                "i4 dq fp32": lambda: F.linear(x, dequantize_int4(p4, sc4, z4, group_size)),
            }
            # The fp32 kernel is very slow on many rows: one repeat is enough to see it.
            times = {name: timeit(fn, 1 if (rows > 64 and name == "i8 k fp32") else repeats)
                     for name, fn in fns.items()}
            print(f"| {out_f}x{in_f} | {rows} | " + " | ".join(f"{times[c]:.0f}" for c in cols) + " |")


def model_variants(config: ModelConfig, group_size: int) -> dict[str, tuple[Transformer, torch.dtype]]:
    torch.manual_seed(0)
    base = Transformer(config).eval()
    variants = {"fp32": (base, torch.float32), "bf16": (copy.deepcopy(base).to(torch.bfloat16), torch.bfloat16)}
    for mode in ("int8", "int4"):
        q = quantize_model(copy.deepcopy(base), mode, group_size)
        variants[f"{mode} (fp32 act)"] = (q, torch.float32)
        variants[f"{mode} (bf16 act)"] = (copy.deepcopy(q).to(torch.bfloat16), torch.bfloat16)
        qe = quantize_model(copy.deepcopy(base), mode, group_size, include_embedding=True)
        variants[f"{mode} + embedding (bf16 act)"] = (qe.to(torch.bfloat16), torch.bfloat16)
    return variants


@torch.no_grad()
def decode_table(configs: dict[str, ModelConfig], group_size: int, repeats: int, prefill_len: int) -> None:
    print(f"\n## Whole model: decode step (batch 1, one token, KV-cache) and prefill of {prefill_len} tokens, ms")
    print("| model | variant | decode ms | prefill ms |")
    print("|---|---|---|---|")
    for label, config in configs.items():
        for name, (model, _) in model_variants(config, group_size).items():
            idx = torch.randint(0, config.vocab_size, (1, prefill_len))
            cache = KVCache.for_model(model, 1, prefill_len + 8)
            model(idx, kv_cache=cache, input_pos=torch.arange(prefill_len))
            last = idx[:, -1:]
            pos = torch.tensor([prefill_len])
            decode = timeit(lambda: model(last, kv_cache=cache, input_pos=pos, logits_to_keep=1), repeats)
            prefill = timeit(lambda: model(idx, logits_to_keep=1), max(2, repeats // 2), min_time=0.2)
            print(f"| {label} | {name} | {decode / 1e3:.2f} | {prefill / 1e3:.1f} |")


def size_table(config: ModelConfig) -> None:
    print("\n## On-disk size (safetensors), small preset: d_model 256, 8 heads, 6 layers, vocab 65")
    print("| variant | bytes | x smaller than fp32 |")
    print("|---|---|---|")
    torch.manual_seed(0)
    base = Transformer(config)
    fp32 = len(save_safetensors_bytes(weights_state_dict(base)))  # dedups the tied head, like checkpoint.py
    print(f"| fp32 | {fp32:,} | 1.00 |")
    print(f"| bf16 | {len(save_safetensors_bytes(weights_state_dict(copy.deepcopy(base).bfloat16()))):,} | "
          f"{fp32 / len(save_safetensors_bytes(weights_state_dict(copy.deepcopy(base).bfloat16()))):.2f} |")
    for mode, group in (("int8", 128), ("int4", 32), ("int4", 64)):
        for emb in (False, True):
            model = quantize_model(copy.deepcopy(base), mode, group, include_embedding=emb)
            with tempfile.TemporaryDirectory() as d:
                save_quantized(d, model)
                size = os.path.getsize(Path(d) / "model.safetensors")
            label = f"{mode}{'' if mode == 'int8' else f' g{group}'}{' + embedding' if emb else ''}"
            print(f"| {label} | {size:,} | {fp32 / size:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--skip", nargs="*", default=[], choices=["linear", "model", "size"])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this thread's CPU time, robust on a busy machine (needs --threads 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu needs --threads 1 (other threads' time would not be counted)")
        global CLOCK
        CLOCK = time.thread_time
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, int4 group size {args.group_size}")
    small = ModelConfig(vocab_size=65, d_model=256, n_heads=8, n_layers=6, block_size=256, dropout=0.0)
    if "linear" not in args.skip:
        shapes = [(768, 256), (256, 704)] if args.quick else [(768, 256), (1408, 256), (256, 704), (2304, 768),
                                                                (768, 2048)]
        rows = [1, 8, 32, 256] if args.quick else [1, 4, 8, 16, 32, 64, 256]
        linear_table(shapes, rows, repeats, args.group_size)
    if "model" not in args.skip:
        configs = {"small (d256 L6 V65)": small}
        if not args.quick:
            configs["d768 L12 V50304 (GPT-2 small shape)"] = ModelConfig(
                vocab_size=50304, d_model=768, n_heads=12, n_layers=12, block_size=256, dropout=0.0)
        decode_table(configs, args.group_size, repeats, prefill_len=128)
    if "size" not in args.skip:
        size_table(small)


if __name__ == "__main__":
    main()
