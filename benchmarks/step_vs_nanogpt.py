"""One training step of the Shakespeare CPU recipe: ours against nanoGPT's model, in one process.

    python benchmarks/step_vs_nanogpt.py --nanogpt path/to/nanoGPT     # a checkout of karpathy/nanoGPT

The recipe's shapes (4 layers, 4 heads, d_model 128, block 64, batch 12, vocabulary 65, dropout
0): forward, loss, backward, clip to 1.0, AdamW, zero grads. nanoGPT runs as its CPU command runs
it, in fp32 (its ``train.py`` uses no autocast on CPU) with its own ``configure_optimizers``;
ours in bf16 autocast (``dtype: auto`` on a CPU with bf16) and in fp32. The steps are timed in
turn, ten at a time, so the machine's drift hits all three alike; the median is printed.

Whole-run wall times (start-up, evaluation and checkpoints included) are in BENCHMARKS.md; they
move by ±10% from run to run on a shared machine, which is why this per-step figure exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mini_transformer.benchmark import interleaved_median_times  # noqa: E402
from mini_transformer.config import ModelConfig  # noqa: E402
from mini_transformer.model import Transformer  # noqa: E402

BATCH, BLOCK, VOCAB, LAYERS, HEADS, WIDTH = 12, 64, 65, 4, 4, 128


def nanogpt_step(checkout: Path):
    sys.path.insert(0, str(checkout))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH,
                          dropout=0.0, bias=False))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    x, y = batch()

    def step() -> None:
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def our_step(bf16: bool):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=WIDTH, n_heads=HEADS, n_layers=LAYERS, block_size=BLOCK,
                                    dropout=0.0, vocab_size=VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)
    x, y = batch()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, VOCAB, (BATCH, BLOCK), generator=generator),
            torch.randint(0, VOCAB, (BATCH, BLOCK), generator=generator))


def ten(step):
    return lambda: [step() for _ in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds of ten steps each")
    args = parser.parse_args()
    if not (args.nanogpt / "model.py").is_file():
        parser.error(f"{args.nanogpt}/model.py not found; pass a nanoGPT checkout")
    names = ["nanoGPT, fp32", "ours, bf16 autocast", "ours, fp32"]
    steps = [nanogpt_step(args.nanogpt), our_step(bf16=True), our_step(bf16=False)]
    times = interleaved_median_times([ten(s) for s in steps], args.repeats, 1, torch.device("cpu"))
    print(f"{torch.get_num_threads()} threads, batch {BATCH} x block {BLOCK}\n")
    print("| model | ms per step (median) | vs nanoGPT |\n| --- | ---: | ---: |")
    for name, seconds in zip(names, times):
        print(f"| {name} | {seconds * 100:.1f} | {seconds / times[0]:.2f}x |")


if __name__ == "__main__":
    main()
