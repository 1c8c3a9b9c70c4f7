"""The decode layout on the CPU: eager greedy decoding, tokens/s at batch 1, fp32.

    python benchmarks/decode_layout.py
    python benchmarks/decode_layout.py --runs 7 --threads 1
    python benchmarks/decode_layout.py --compile        # the decode step through torch.compile

Three ways, taken in turn, median of ``--runs`` calls of 100 new tokens each:

* plain: the model as built, weights stored (out, in) row-major;
* decode layout: :func:`mini_transformer.decode_layout.to_decode_layout`, done once (what
  ``load_for_inference`` gives eager ``generate``; with ``--compile`` the "plain" way is the
  layout ``generate --compile`` gets, ``to_decode_layout(model, compiled=True)``);
* per-call copies: every Linear's forward replaced, for the duration of a call, by ``x @ W_t``
  with a contiguous transposed copy of its weight. The engine did this itself before the decode
  layout, at the cost of one extra set of weights and of ignoring weights changed mid-stream;
  it is here as the reference the conversion must match.

Checks that the three give the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mini_transformer.benchmark import preset_model_config  # noqa: E402
from mini_transformer.decode_layout import to_decode_layout  # noqa: E402
from mini_transformer.generation import generate  # noqa: E402
from mini_transformer.model import Transformer  # noqa: E402


@contextlib.contextmanager
def transposed_copies(model: nn.Module):
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for module in linears:
        weight_t, bias = module.weight.detach().t().contiguous(), module.bias
        module.forward = lambda x, w=weight_t, b=bias: x @ w if b is None else x @ w + b
    try:
        yield
    finally:
        for module in linears:
            del module.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step (each way compiles once before timing; no per-call copies)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mode = "compiled decode step" if args.compile else "eager"
    print(f"cpu, fp32, {mode}, {args.threads} threads, {args.tokens} new tokens, median of {args.runs} calls, in turn")
    print("| preset | vocab | plain (tok/s) | decode layout (tok/s) | per-call copies (tok/s) "
          "| layout / plain | layout / copies |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for preset, vocab in [("tiny", 65), ("small", 65), ("small", 50304)]:
        config = preset_model_config(preset, None)
        config.vocab_size = vocab
        torch.manual_seed(0)
        plain = Transformer(config).eval()
        converted = to_decode_layout(copy.deepcopy(plain))
        ways = {"plain": (plain, contextlib.nullcontext), "layout": (converted, contextlib.nullcontext),
                "copies": (plain, lambda: transposed_copies(plain))}
        if args.compile:  # patched forwards would only be traced into the graph: not compared
            del ways["copies"]
            for model, _ in ways.values():
                generate(model, [1, 2, 3], max_new_tokens=8, temperature=0, compile=True)
        rates: dict[str, list[float]] = {name: [] for name in ways}
        tokens = {}
        for _ in range(args.runs):
            for name, (model, context) in ways.items():
                with context():
                    start = time.perf_counter()
                    tokens[name] = generate(model, [1, 2, 3], max_new_tokens=args.tokens, temperature=0,
                                            compile=args.compile)
                    rates[name].append(args.tokens / (time.perf_counter() - start))
        assert all(t == tokens["plain"] for t in tokens.values())
        med = {name: statistics.median(r) for name, r in rates.items()}
        copies = med.get("copies")
        copies_cells = (f"{copies:,.0f}", f"{med['layout'] / copies:.2f}x") if copies else ("-", "-")
        print(f"| {preset} | {vocab} | {med['plain']:,.0f} | {med['layout']:,.0f} | {copies_cells[0]} "
              f"| {med['layout'] / med['plain']:.2f}x | {copies_cells[1]} |")


if __name__ == "__main__":
    main()
