"""The decode step eager, compiled, and compiled with CUDA graphs: tokens/s at batch 1.

    python benchmarks/decode_compile_modes.py --device cuda --dtype bf16
    python benchmarks/decode_compile_modes.py --presets tiny --device cpu --dtype fp32

Times ``generate`` (8-token prompt, greedy) for each preset three ways, taken in turn:
eager, ``torch.compile`` in Inductor's default mode, and in ``reduce-overhead`` mode (CUDA
graphs; CUDA only). Checks that every way gives the same tokens as eager, and reports the
median of each call, so the recording of a graph at the start of a call is included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mini_transformer.device import DTYPES, resolve_device  # noqa: E402
from mini_transformer.generation import engine, generate  # noqa: E402
from mini_transformer.model import Transformer  # noqa: E402
from mini_transformer.profile import synchronize  # noqa: E402
from mini_transformer.benchmark import preset_model_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "medium"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    modes = ["eager", "default"] + (["reduce-overhead"] if device.type == "cuda" else [])
    print(f"{device}, {args.dtype}, {args.tokens} new tokens, median of {args.runs} calls, taken in turn")
    print("| preset | " + " | ".join(f"{m} (tok/s)" for m in modes) + " | same tokens |")
    print("| --- |" + " ---: |" * len(modes) + " --- |")
    prompt = list(range(1, 9))
    for preset in args.presets:
        torch.manual_seed(0)
        model = Transformer(preset_model_config(preset, None)).to(device=device, dtype=dtype).eval()

        def run(mode: str) -> list[int]:
            if mode != "eager":
                engine.DECODE_COMPILE_MODES[device.type] = mode
            return generate(model, prompt, max_new_tokens=args.tokens, temperature=0.0, compile=mode != "eager")

        outputs = {mode: run(mode) for mode in modes}  # warm-up and compilation
        same = all(outputs[m] == outputs["eager"] for m in modes)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.runs):
            for mode in modes:
                synchronize(device)
                start = time.perf_counter()
                run(mode)
                synchronize(device)
                times[mode].append(time.perf_counter() - start)
        speeds = [args.tokens / statistics.median(times[m]) for m in modes]
        print(f"| {preset} | " + " | ".join(f"{s:,.0f}" for s in speeds) + f" | {'yes' if same else 'NO'} |",
              flush=True)


if __name__ == "__main__":
    main()
