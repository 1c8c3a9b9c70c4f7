"""Training steps with the loss read every step (a host sync) against every few steps.

    python benchmarks/host_sync.py --data ../shared/data/tinyshakespeare.txt            # GPU recipe
    python benchmarks/host_sync.py --data FILE --config configs/shakespeare_char_cpu.yaml --steps 100

Runs the recipe's training loop for ``--steps`` steps, alternately with the trainer's on-device
skipping of non-finite steps (losses read at log steps and every ``max_bad_steps`` steps) and
with the host deciding every step (``.item()`` each step, as fp16 loss scaling needs), in turn,
``--runs`` times each. Reports the median of the logged tokens/s of each, after the first log.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mini_transformer.config import load_config  # noqa: E402
from mini_transformer.training.loop import Trainer  # noqa: E402


def tokens_per_s(config_path: str, data: str, steps: int, on_device: bool, compile_model: bool) -> float:
    with tempfile.TemporaryDirectory() as out:
        config = load_config(config_path, overrides=[
            "--data.path", data, "--training.out_dir", out, "--training.max_iters", str(steps),
            "--training.eval_interval", str(10 * steps), "--training.eval_iters", "1",
            "--training.log_interval", "10", "--training.tensorboard", "false",
            "--training.compile", str(compile_model).lower(), "--data.cache_dir", str(Path(out) / "cache")])
        trainer = Trainer(config, progress=False, log=None)
        trainer.setup()
        trainer._skips_on_device = trainer._skips_on_device and on_device
        trainer.run()
        trainer.close()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shakespeare_char.yaml")
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.runs):
        for on_device in (True, False):
            rates[on_device].append(tokens_per_s(args.config, args.data, args.steps, on_device, args.compile))
            print(f"{'every few steps' if on_device else 'every step':>15}: {rates[on_device][-1]:,.0f} tok/s",
                  flush=True)
    few, every = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"\n| losses read | tokens/s (median of {args.runs} runs) |\n| --- | ---: |\n"
          f"| every step | {every:,.0f} |\n| every few steps | {few:,.0f} ({few / every:.2f}x) |")


if __name__ == "__main__":
    main()
