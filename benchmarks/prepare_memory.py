"""Peak memory of `mini-transformer prepare` on a generated text file much larger than its buffers.

Generates a text file of pseudo-words (Zipf-distributed, with some non-ASCII words, a newline
every ~12 words), runs ``prepare`` on it in a fresh subprocess for each tokenizer, and prints
the wall time, throughput and peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``
of that subprocess, Rust threads of ``tokenizers`` included). The baseline row prepares a
1 KB file: the cost of the interpreter and imports (torch is imported by the package).

    python benchmarks/prepare_memory.py                       # 1 GB file, char and bpe
    python benchmarks/prepare_memory.py --size_mb 100 --tokenizers char byte bpe

The generated file and the outputs go to a temporary directory that is deleted at the end.

Measured on the 2-core development box (no GPU), ``python benchmarks/prepare_memory.py``
(1 GiB = 1,073,741,824 bytes, default 1 MiB chunks, BPE trained on the whole file)::

    tokenizer           wall s    MB/s  peak RSS MB         tokens  vocab
    (baseline, 1 KB)       0.1     0.0          278          1,200      9
    char                  70.9    14.4          282    949,522,345     44
    bpe                  694.9     1.5          377    249,284,864   2048

Memory stays flat with corpus size: 64 MiB gave 279 MB (char) and 354 MB (bpe). The BPE
figures are dominated by Hugging Face ``tokenizers`` (training and encoding, both about
3 MB/s on these 2 cores); ``--bpe_train_mb 64`` trains the merges on a prefix (training was
about half of the BPE time when profiled on 16 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
from mini_transformer.cli import main
start = time.perf_counter()
status = main(sys.argv[1:])
wall = time.perf_counter() - start
print(json.dumps({"status": status, "wall_s": wall,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate_text(path: Path, size_bytes: int, seed: int = 0) -> None:
    """Pseudo-words with a Zipf distribution: realistic enough for BPE, fast to make."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    n_words = 50_000
    lengths = rng.integers(1, 11, size=n_words)
    vocab = ["".join(rng.choice(letters, size=k)) for k in lengths]
    vocab[:8] = ["café", "naïve", "日本語", "über", "😀", "Ελλάδα", "—", "it's"]
    words = np.array([w.encode() for w in vocab], dtype=object)
    seps = np.array([b" ", b"\n", b", ", b". "], dtype=object)
    written = 0
    with open(path, "wb") as f:
        while written < size_bytes:
            ids = np.minimum(rng.zipf(1.2, size=1_000_000), n_words) - 1  # (n,)
            sep = seps[rng.choice(4, size=ids.size, p=[0.82, 0.08, 0.06, 0.04])]
            parts = np.empty(2 * ids.size, dtype=object)
            parts[0::2], parts[1::2] = words[ids], sep
            block = b"".join(parts.tolist())[: size_bytes - written]
            f.write(block)
            written += len(block)


def run_prepare(input_path: Path, out: Path, tokenizer: str, vocab_size: int,
                bpe_train_bytes: int | None = None) -> dict:
    cmd = [sys.executable, "-c", CHILD, "prepare", "--quiet", "--input", str(input_path),
           "--tokenizer", tokenizer, "--vocab_size", str(vocab_size), "--out", str(out)]
    if bpe_train_bytes and tokenizer == "bpe":
        cmd += ["--bpe_train_bytes", str(bpe_train_bytes)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"prepare failed ({tokenizer}):\n{result.stderr}")
    lines = result.stdout.strip().splitlines()
    stats = json.loads(lines[-1])
    meta = json.loads((out / "meta.json").read_text())
    stats["tokens"] = meta["total_tokens"]
    stats["vocab"] = meta["vocab_size"]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size_mb", type=float, default=1024, help="size of the generated file in MiB")
    parser.add_argument("--tokenizers", nargs="+", default=["char", "bpe"], choices=["char", "byte", "bpe"])
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--bpe_train_mb", type=float, default=None,
                        help="train the BPE on the first N MiB only (default: the whole file)")
    parser.add_argument("--dir", default=None, help="where to put the temporary files (default: system temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="prepare-bench-") as tmp:
        tmp = Path(tmp)
        big = tmp / "big.txt"
        t0 = time.perf_counter()
        generate_text(big, int(args.size_mb * 2**20))
        size = big.stat().st_size
        print(f"generated {size:,} bytes in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPU cores")
        small = tmp / "small.txt"
        small.write_text("hello world\n" * 100)
        rows = [("(baseline, 1 KB)", run_prepare(small, tmp / "out-small", "char", args.vocab_size), 1)]
        for kind in args.tokenizers:
            train_bytes = int(args.bpe_train_mb * 2**20) if args.bpe_train_mb else None
            stats = run_prepare(big, tmp / f"out-{kind}", kind, args.vocab_size, train_bytes)
            rows.append((kind, stats, size))
            print(f"{kind}: {stats}", flush=True)
            for name in ("train.bin", "val.bin"):
                (tmp / f"out-{kind}" / name).unlink()

    print(f"\n{'tokenizer':<18}{'wall s':>8}{'MB/s':>8}{'peak RSS MB':>13}{'tokens':>15}{'vocab':>7}")
    for name, s, nbytes in rows:
        rate = nbytes / 2**20 / s["wall_s"]
        print(f"{name:<18}{s['wall_s']:>8.1f}{rate:>8.1f}{s['peak_rss_mb']:>13.0f}{s['tokens']:>15,}{s['vocab']:>7}")


if __name__ == "__main__":
    main()
