"""Generation speed: tokens/s at batch 1, with and without the KV-cache, and speculative decoding.

    python benchmarks/generation.py                       # tiny and small presets, 200 and 1000 tokens
    python benchmarks/generation.py --presets tiny --runs 5
    python benchmarks/generation.py --speculative         # also: draft/target acceptance and speedup

Prints markdown tables. The models are randomly initialised (speed does not depend on the
weights), with ``vocab_size = 65`` (Tiny Shakespeare's characters). 1000 new tokens exceed
``block_size``, so those rows include the sliding-window re-prefills of the engine.

The speculative section trains a target (small preset) for a few hundred steps on Python source
text, because acceptance rates of random models mean nothing, and compares two drafts: a
separately trained 1-layer model, and the target's own first layers (same embedding and head).
It reports the acceptance rate and the speedup over plain cached decoding of the same target,
greedy (output checked identical) and sampled (temperature 0.8).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mini_transformer.config import load_config  # noqa: E402
from mini_transformer.generation import generate, speculative_generate  # noqa: E402
from mini_transformer.model import Transformer  # noqa: E402


def build(preset: str, vocab_size: int = 65, seed: int = 0, **overrides) -> Transformer:
    config = load_config(preset=preset).model
    config.vocab_size = vocab_size
    config.dropout = 0.0
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return Transformer(config).eval()


def tokens_per_second(model: Transformer, new_tokens: int, use_cache: bool, runs: int) -> float:
    prompt = [1, 2, 3, 4]
    generate(model, prompt, max_new_tokens=8, temperature=0, use_cache=use_cache)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = generate(model, prompt, max_new_tokens=new_tokens, temperature=1.0, seed=0, use_cache=use_cache)
        times.append(time.perf_counter() - start)
        assert len(out) == new_tokens
    return new_tokens / statistics.median(times)


def plain_table(presets: list[str], lengths: list[int], runs: int) -> str:
    lines = ["| preset | new tokens | no cache (tok/s) | KV-cache (tok/s) | cache speedup |",
             "|---|---:|---:|---:|---:|"]
    for preset in presets:
        model = build(preset)
        for n in lengths:
            without = tokens_per_second(model, n, use_cache=False, runs=runs)
            with_cache = tokens_per_second(model, n, use_cache=True, runs=runs)
            lines.append(f"| {preset} (block {model.config.block_size}) | {n} | {without:,.0f} | "
                         f"{with_cache:,.0f} | {with_cache / without:.1f}x |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


# -- speculative ------------------------------------------------------------------------------

def corpus_bytes(limit: int = 400_000) -> torch.Tensor:
    """Python standard-library source as bytes: text that is everywhere and needs no download."""
    import logging
    import argparse as argparse_module
    import inspect

    text = "".join(inspect.getsource(m) for m in (argparse_module, logging, statistics, inspect))
    data = torch.tensor(list(text.encode("utf-8")[:limit]), dtype=torch.long)
    return data


def quick_train(model: Transformer, data: torch.Tensor, steps: int, batch: int = 8, seq: int = 96) -> float:
    """A few hundred AdamW steps on random windows of ``data``: enough to learn local statistics."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        loss = model(x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def first_layers(target: Transformer, n_layers: int) -> Transformer:
    """A draft that is the target's embedding, first ``n_layers`` blocks, final norm and head."""
    config = copy.deepcopy(target.config)
    config.n_layers = n_layers
    draft = Transformer(config).eval()
    draft.load_state_dict(target.state_dict(), strict=False)  # the deeper blocks are dropped
    return draft


def speculative_table(steps: int, new_tokens: int, runs: int, gamma: int) -> str:
    data = corpus_bytes()
    target = build("small", vocab_size=256)
    print(f"training target ({target.num_parameters() / 1e6:.1f}M) for {steps} steps ...", file=sys.stderr)
    t_loss = quick_train(target, data, steps)
    small_draft = build("small", vocab_size=256, n_layers=1, d_model=128, n_heads=4, seed=1)
    print(f"training draft ({small_draft.num_parameters() / 1e6:.2f}M) ...", file=sys.stderr)
    d_loss = quick_train(small_draft, data, steps)
    drafts = [(f"separately trained, 1 layer d128 (loss {d_loss:.2f})", small_draft),
              ("the target's first 2 of 6 layers (untrained head-on)", first_layers(target, 2))]
    lines = [f"target: small preset (6 layers, d256), byte-level, {steps} training steps on Python source "
             f"(loss {t_loss:.2f}); gamma {gamma}; {new_tokens} new tokens; median of {runs}",
             "",
             "| draft | sampling | acceptance | tokens / target forward | plain (tok/s) | speculative (tok/s) "
             "| speedup |",
             "|---|---|---:|---:|---:|---:|---:|"]
    prompt = list(b"def main(")
    for name, draft in drafts:
        for label, temperature in [("greedy", 0.0), ("T=0.8", 0.8)]:
            plain, spec, rates, per_round = [], [], [], []
            for run in range(runs):
                start = time.perf_counter()
                expected = generate(target, prompt, max_new_tokens=new_tokens, temperature=temperature, seed=run)
                plain.append(time.perf_counter() - start)
                start = time.perf_counter()
                got, stats = speculative_generate(target, draft, prompt, max_new_tokens=new_tokens, gamma=gamma,
                                                  temperature=temperature, seed=run)
                spec.append(time.perf_counter() - start)
                rates.append(stats.acceptance_rate)
                per_round.append(stats.tokens_per_round)
                if temperature == 0:
                    assert got == expected, "greedy speculative output must equal greedy target output"
            p, s = new_tokens / statistics.median(plain), new_tokens / statistics.median(spec)
            lines.append(f"| {name} | {label} | {statistics.mean(rates):.2f} | {statistics.mean(per_round):.2f} | "
                         f"{p:,.0f} | {s:,.0f} | {s / p:.2f}x |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[200, 1000])
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-plain", action="store_true", help="only the speculative table")
    parser.add_argument("--speculative", action="store_true", help="also train a draft/target pair and compare")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--gamma", type=int, default=4)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, median of {args.runs}\n")
    if not args.skip_plain:
        print(plain_table(args.presets, args.tokens, args.runs))
    if args.speculative:
        print()
        print(speculative_table(args.train_steps, 200, args.runs, args.gamma))


if __name__ == "__main__":
    main()
