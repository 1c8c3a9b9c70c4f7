"""LoRA against full fine-tuning: trainable parameters, optimizer state and peak training memory.

Each variant runs in a fresh process (so its peak RSS is its own): the small preset (vocab 65),
three AdamW steps at batch 16 x block 256 in fp32.

    .venv/bin/python benchmarks/lora_memory.py [--preset small] [--batch_size 16] [--rank 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, resource, sys, torch
from mini_transformer.config import load_config
from mini_transformer.model import Transformer
from mini_transformer.lora import apply_lora, lora_parameter_counts
torch.manual_seed(0)
preset, batch, rank, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = load_config(preset=preset).model
cfg.vocab_size = 65
cfg.dropout = 0.0
model = Transformer(cfg)
if mode == "lora":
    apply_lora(model, rank=rank, alpha=2 * rank, targets=("attention",))
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
x = torch.randint(0, 65, (batch, cfg.block_size))
for _ in range(3):
    model(x, x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
trainable = sum(p.numel() for p in params)
total = sum(p.numel() for p in model.parameters())
print(json.dumps({"mode": mode, "trainable": trainable, "total": total, "optimizer_state_bytes": state,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, "-c", WORKER, args.preset, str(args.batch_size), str(args.rank), mode],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.preset} preset, batch {args.batch_size}, fp32, LoRA rank {args.rank} on the attention projections\n")
    print("| fine-tuning | trainable parameters | optimizer state | peak RSS (3 steps) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable']:,} ({r['trainable'] / r['total']:.2%}) | "
              f"{r['optimizer_state_bytes'] / 2**20:.2f} MiB | {r['peak_rss_bytes'] / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
