"""Which quality-per-compute levers pay: an ablation on Tiny Shakespeare, character level.

    python benchmarks/ablate.py                           # every lever alone and all together, 2000 steps, one seed
    python benchmarks/ablate.py --seeds 1337 1338 1339    # the spread over seeds
    python benchmarks/ablate.py --fixed-time              # and again at the baseline's wall time
    python benchmarks/ablate.py --variants baseline muon --steps 500

Each variant is ``configs/shakespeare_char_cpu.yaml`` (nanoGPT's CPU recipe: 4 layers, 4 heads,
d_model 128, block 64, batch 12) plus the command-line overrides of its levers, trained as a
whole ``train.py`` process, in turn, from an empty run directory. The figure of merit is the
exact val loss the run prints at the end (the whole val split, not a 20-batch estimate), and the
wall time of the whole command.

``--fixed-time`` adds a second pass in which every variant gets the baseline's training time:
a variant whose steps are slower gets proportionally fewer of them (its lr schedule is fitted to
that many steps, since ``--training.max_iters`` on the command line rescales it), one that is
faster gets more. The per-step times are measured in one process, the variants' steps timed in
turn (whole runs' wall times drift with the machine's load); a variant within 3% of the
baseline's step count keeps its fixed-step result.

Results go to ``--out`` (``results.jsonl``, one line per run, and the run directories) and a
markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# At fixed time, a variant within this fraction of the baseline's step count is not run again:
# its fixed-step run is already a fixed-time run, up to the noise of the step times.
REUSE_WITHIN = 0.03

# Each lever as command-line overrides of the recipe.
LEVERS: dict[str, list[str]] = {
    "muon": ["--training.optimizer", "muon"],
    "qk_norm": ["--model.qk_norm", "true"],
    "relu2": ["--model.activation", "relu2"],
    "softcap": ["--model.logit_softcap", "15"],
    "zero_init": ["--model.zero_init_projections", "true"],
    "untied": ["--model.tie_embeddings", "false"],
}


def variant_overrides(name: str) -> list[str]:
    """``baseline``, a lever's name, ``all`` (every lever), or levers joined by ``+``."""
    if name == "baseline":
        return []
    levers = list(LEVERS) if name == "all" else name.split("+")
    overrides = []
    for lever in levers:
        if lever not in LEVERS:
            raise SystemExit(f"error: unknown lever {lever!r}; choose from baseline, all, {', '.join(LEVERS)}")
        overrides += LEVERS[lever]
    return overrides


def train(config: str, overrides: list[str], out_dir: Path, data: str) -> dict:
    """One whole training command; its final exact val loss, steps and wall time."""
    command = [sys.executable, str(ROOT / "train.py"), "--config", config, "--data.path", data,
               "--training.out_dir", str(out_dir), "--training.tensorboard", "false", *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = next(r for r in reversed(records) if r.get("final"))
    steps = final["iter"]
    train_records = [r for r in records if "train_loss" in r]
    return {"final_val_loss": final["final_val_loss"], "steps": steps, "wall_s": wall_s,
            "train_s": final["time_s"],
            "step_ms": 1000 * train_records[-1]["time_s"] / max(train_records[-1]["iter"], 1)}


def step_ms_in_turn(config: str, variants: list[str], repeats: int = 7) -> dict[str, float]:
    """Each variant's training step (forward, backward, clip, optimizer) in one process, ten
    steps at a time, timed in turn: the ratios that set the fixed-time step counts. Whole runs'
    wall times move with the machine's load over minutes; steps timed in turn see the same."""
    import torch

    sys.path.insert(0, str(ROOT))
    from mini_transformer.benchmark import interleaved_median_times
    from mini_transformer.config import load_config
    from mini_transformer.device import autocast, resolve_dtype
    from mini_transformer.model import Transformer
    from mini_transformer.training.optim import build_optimizer

    def ten_steps(variant: str):
        cfg = load_config(config, overrides=["--model.vocab_size", "65", *variant_overrides(variant)])
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        cpu = torch.device("cpu")
        dtype = resolve_dtype(cfg.training.dtype, cpu)  # as the runs train: bf16 autocast where fast
        optimizer = build_optimizer(model, cfg.training, cpu, dtype)
        x = torch.randint(0, 65, (cfg.training.batch_size, cfg.model.block_size))

        def run() -> None:
            for _ in range(10):
                with autocast(cpu, dtype):
                    loss = model(x, x).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run

    seconds = interleaved_median_times([ten_steps(v) for v in variants], repeats, 1, torch.device("cpu"))
    return {variant: 100 * s for variant, s in zip(variants, seconds)}  # ms per step


def table(results: list[dict], mode: str) -> str:
    rows = [r for r in results if r["mode"] == mode]
    if not rows:
        return ""
    base = [r["final_val_loss"] for r in rows if r["variant"] == "baseline"]
    base_loss = statistics.median(base) if base else None
    lines = [f"| variant | seeds | steps | exact val loss, median (min-max) | vs baseline | wall s, median |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        losses = [r["final_val_loss"] for r in mine]
        median = statistics.median(losses)
        spread = f" ({min(losses):.4f}-{max(losses):.4f})" if len(losses) > 1 else ""
        delta = f"{median - base_loss:+.4f}" if base_loss is not None else "-"
        steps = sorted({r["steps"] for r in mine})
        lines.append(f"| {variant} | {len(mine)} | {'/'.join(map(str, steps))} | {median:.4f}{spread} | {delta} "
                     f"| {statistics.median(r['wall_s'] for r in mine):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/shakespeare_char_cpu.yaml"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"))
    parser.add_argument("--variants", nargs="+", default=["baseline", *LEVERS, "all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--fixed-time", action="store_true", help="add the pass at the baseline's wall time")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="overrides for every run, e.g. --extra --training.eval_interval 500")
    parser.add_argument("--out", default="/tmp/ablation")
    parser.add_argument("--step-times-only", action="store_true", help="print each variant's ms per step and stop")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    # Runs already in --out are kept, not repeated: an ablation can grow by seeds and variants.
    results: list[dict] = ([json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
                           if results_path.exists() else [])

    def run(variant: str, seed: int, mode: str, steps: int) -> dict:
        done = [r for r in results if (r["variant"], r["seed"], r["mode"], r["steps"]) == (variant, seed, mode, steps)
                and not r.get("reused")]
        if done:
            print(f"{mode:>10} {variant:>28} seed {seed}: kept from {results_path}", flush=True)
            return done[-1]
        run_dir = out / f"{mode}-{variant}-{seed}"
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        overrides = [*variant_overrides(variant), "--training.seed", str(seed),
                     "--training.max_iters", str(steps), *args.extra]
        result = {"variant": variant, "seed": seed, "mode": mode,
                  **train(args.config, overrides, run_dir, args.data)}
        results.append(result)
        with results_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{mode:>10} {variant:>28} seed {seed}: exact val loss {result['final_val_loss']:.4f} "
              f"after {result['steps']} steps, {result['wall_s']:.0f} s ({result['step_ms']:.1f} ms/step)",
              flush=True)
        return result

    if args.step_times_only:
        for variant, ms in step_ms_in_turn(args.config, args.variants).items():
            print(f"{variant}: {ms:.1f} ms per step")
        return
    # Seeds outside, variants inside: the machine's drift over the run spreads over all variants.
    for seed in args.seeds:
        for variant in args.variants:
            run(variant, seed, "steps", args.steps)
    if args.fixed_time:
        # Measured once per --out: a grown ablation keeps the step counts it started with.
        step_ms_path = out / "step_ms.json"
        step_ms = json.loads(step_ms_path.read_text()) if step_ms_path.exists() else {}
        missing = [v for v in args.variants if v not in step_ms]
        if missing:
            measured = step_ms_in_turn(args.config, list(dict.fromkeys(["baseline", *missing])))
            # New variants join at their ratio to the baseline, timed with it just now.
            scale = step_ms.get("baseline", measured["baseline"]) / measured["baseline"]
            step_ms.update({v: measured[v] * scale for v in measured if v not in step_ms})
            step_ms_path.write_text(json.dumps(step_ms))
        print("ms per step, timed in turn: " + ", ".join(f"{v} {ms:.1f}" for v, ms in step_ms.items()), flush=True)
        budget_ms = args.steps * step_ms.get("baseline", statistics.median(step_ms.values()))
        for seed in args.seeds:
            for variant in args.variants:
                steps = max(1, round(budget_ms / step_ms[variant]))
                if abs(steps - args.steps) <= REUSE_WITHIN * args.steps:  # as fast as the baseline
                    same = next(r for r in results if r["mode"] == "steps" and r["variant"] == variant
                                and r["seed"] == seed and r["steps"] == args.steps)
                    results.append({**same, "mode": "time", "reused": True})
                    print(f"{'time':>10} {variant:>28} seed {seed}: {steps} steps fit, within "
                          f"{REUSE_WITHIN:.0%} of {args.steps}: the fixed-step run stands", flush=True)
                else:
                    run(variant, seed, "time", steps)

    results = [r for r in results if r["variant"] in args.variants and r["seed"] in args.seeds]
    print(f"\nfixed steps ({args.steps}), {args.config}:\n" + table([r for r in results if r["steps"] == args.steps
                                                                     or r["mode"] != "steps"], "steps"))
    if args.fixed_time:
        print("\nfixed training time (the baseline's, steps scaled by each variant's step time):\n"
              + table(results, "time"))


if __name__ == "__main__":
    main()
