"""``make demo``: prepare data, train the tiny preset on the CPU for about two minutes, stream a sample.

On a slow or busy machine two minutes may give only a few steps; the demo then says the
sample will be noise and how long to train instead (``--seconds``).

The data is the file given with ``--input`` (``make demo DATA=file.txt``), else
``data/input.txt`` if it exists, else Tiny Shakespeare if it can be downloaded, else this
Python's own standard library (no network needed). Run as ``python -m mini_transformer.demo``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from .config import load_config
from .errors import UserError

# The pipeline, the training loop and the engine (and torch) are imported where they are used:
# --help and a missing input file answer at once.

OUT_DIR = "out-demo"
TIME_BUDGET_S = 120.0  # training stops here at the latest, then evaluates and saves
MAX_ITERS = 1200  # the whole run on an idle machine of a few cores
# Below this many steps the tiny model has barely left its random start: its samples are
# noise (random letters and punctuation) rather than word-like text.
ENOUGH_STEPS = 300


def choose_data(input_path: Optional[str] = None) -> tuple[list[str], str, str]:
    """(config overrides, a description, a prompt that suits the text)."""
    if input_path is not None:
        if not Path(input_path).is_file():
            raise UserError(f"demo input {input_path!r} not found; "
                            "pass an existing text file (DATA=path/to/text.txt)")
        return ["--data.path", input_path], input_path, "\n"
    if Path("data/input.txt").is_file():
        return ["--data.path", "data/input.txt"], "data/input.txt", "\n"
    from .data import dataset_sources

    try:
        dataset_sources("shakespeare", "data/cache")
        return ["--data.dataset", "shakespeare"], "Tiny Shakespeare (downloaded)", "ROMEO:"
    except UserError as exc:
        print(f"note: {exc}", file=sys.stderr)
    return ["--data.dataset", "pystdlib"], "the Python standard library's source (offline corpus)", "def "


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mini_transformer.demo",
        description="Prepare data, train the tiny preset on the CPU for about two minutes, stream a sample.",
        epilog="examples:\n  make demo\n  make demo DATA=my_text.txt\n"
               "  python -m mini_transformer.demo --input my_text.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", metavar="FILE", help="train on this text file (default: see above)")
    parser.add_argument("--seconds", type=float, default=TIME_BUDGET_S, metavar="S",
                        help=f"train for at most S seconds (default {TIME_BUDGET_S:.0f}; more on a slow or busy machine)")
    args = parser.parse_args(argv)
    try:
        if not args.seconds > 0:
            raise UserError(f"--seconds must be positive, got {args.seconds:g}; {TIME_BUDGET_S:.0f} is the default")
        return run(args.input, args.seconds)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def too_few_steps_note(steps: int, seconds: float, budget: float) -> Optional[str]:
    """Why the sample will be noise when the time budget allowed only a few steps, and what to do."""
    if steps >= ENOUGH_STEPS or steps >= MAX_ITERS:
        return None
    # The budget, not the run's whole time: the final evaluation and saving come after it.
    per_step = min(seconds, budget) / max(steps, 1)
    needed = 60 * math.ceil(ENOUGH_STEPS * per_step * 1.1 / 60)  # a margin for the evaluations
    return (f"note: only {steps} training step{'s' if steps != 1 else ''} fit in {budget:.0f} s here "
            f"({per_step:.1f} s a step: this machine is "
            f"slow or busy), too few to learn the text (a few hundred are needed), so the sample below will be "
            f"mostly noise. Train longer: python -m mini_transformer.demo --seconds {needed}"
            f" (make demo DEMO_SECONDS={needed}), or run it when the machine is idle.")


def run(input_path: Optional[str], budget: float = TIME_BUDGET_S) -> int:
    from .checkpoint import load_for_inference
    from .generation import generate_stream, stream_text
    from .training import train

    started = time.perf_counter()
    data_overrides, description, prompt = choose_data(input_path)
    shutil.rmtree(OUT_DIR, ignore_errors=True)  # the demo's own scratch run: start it afresh
    print(f"data: {description}")
    config = load_config(preset="tiny", overrides=[
        *data_overrides,
        "--model.dropout", "0.0",
        "--training.batch_size", "16", "--training.max_iters", str(MAX_ITERS), "--training.warmup_iters", "50",
        "--training.learning_rate", "2e-3", "--training.min_lr", "2e-4", "--training.beta2", "0.99",
        "--training.eval_interval", "300", "--training.eval_iters", "20", "--training.log_interval", "20",
        "--training.max_seconds", str(budget), "--training.out_dir", OUT_DIR,
    ])
    result = train(config)
    model, _, tokenizer = load_for_inference(OUT_DIR)
    print(f"\ntrained {result.step} steps in {result.seconds:.0f} s; "
          f"val loss {result.final_val_loss:.3f}.", flush=True)
    if note := too_few_steps_note(result.step, result.seconds, budget):
        print(note, file=sys.stderr, flush=True)
    print("A sample (temperature 0.8, top-k 50):\n")
    print(prompt, end="", flush=True)
    tokens = generate_stream(model, tokenizer.encode(prompt), max_new_tokens=300, temperature=0.8,
                             top_k=50, seed=1337)
    for piece in stream_text(tokens, tokenizer.decode):
        print(piece, end="", flush=True)
    print(f"\n\ncheckpoint: {Path(OUT_DIR).resolve()}  (done in {time.perf_counter() - started:.0f} s)")
    first, *rest = next_commands(OUT_DIR, prompt.strip() or "Hello")
    print(f"next: {first}")
    for line in rest:
        print(f"      {line}")
    return 0


def next_commands(out_dir: str, prompt: str) -> list[str]:
    """What to try after the demo, spelled so that each runs as printed from this directory."""
    cli = cli_command()
    lines = [f"{cli} generate --checkpoint {out_dir} --prompt {shlex.quote(prompt)} --stream",
             f"{cli} generate --checkpoint {out_dir} --interactive",
             f"{cli} plot {out_dir}"]
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and activate.is_file():  # in a virtual environment (make demo's .venv)
        lines.append(f"(or `source {shown(activate)}` once; then `mini-transformer ...` and "
                     "`python train.py ...` work as the README writes them)")
    return lines


def cli_command() -> str:
    """The command that runs the CLI with this interpreter: the environment's own
    ``mini-transformer`` script when it has one (``.venv/bin/mini-transformer``), else
    ``python -m mini_transformer`` with this interpreter's path."""
    script = Path(sys.executable).with_name("mini-transformer.exe" if os.name == "nt" else "mini-transformer")
    if script.is_file():
        return shown(script)
    return f"{shown(Path(sys.executable))} -m mini_transformer"


def shown(path: Path) -> str:
    """``path`` as typed in a shell here: relative when under this directory (with a slash, so the
    shell runs that file rather than searching PATH), quoted when needed."""
    try:
        text = str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
        text = text if os.sep in text else os.path.join(".", text)
    except ValueError:
        text = str(path)
    return shlex.quote(text)


if __name__ == "__main__":
    sys.exit(main())
