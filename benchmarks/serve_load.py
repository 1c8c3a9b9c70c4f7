"""Load on ``mini-transformer serve``: N concurrent streaming clients against the small preset.

    python benchmarks/serve_load.py
    python benchmarks/serve_load.py --clients 1 4 8 16 --max-batch 8 --max-tokens 64 --requests 3

Starts the server as its own process (a random small-preset model with Tiny Shakespeare's 65
characters, saved to a temporary checkpoint), then for each N runs N clients at once, each
sending ``--requests`` streaming completions one after the other (temperature 0.8, a seed per
request, ``max_tokens`` tokens each: the model never stops early, so every request is the same
amount of work). Prints, per N: aggregate tokens/s (all tokens / wall time), time to first token
(p50, p99), inter-token latency (the gaps between a stream's chunks; p50, p99), and errors.
Also the engine alone (``generate``, batch 1, in this process) for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nBefore we proceed", "KING", "To be, or not",
           "MENENIUS:\nWhat", "All:\nSpeak, speak.", "LUCIO:\nI"]


def make_checkpoint(directory: Path, seed: int = 0) -> Path:
    import torch

    from mini_transformer.checkpoint import save_checkpoint
    from mini_transformer.config import Config, load_config
    from mini_transformer.model import Transformer
    from mini_transformer.tokenizer import CharTokenizer

    text = Path("/work/shared/data/tinyshakespeare.txt")
    tokenizer = CharTokenizer.from_text(text.read_text() if text.is_file() else "".join(map(chr, range(32, 127))) + "\n")
    config = Config()
    config.model = load_config(preset="small").model
    config.model.vocab_size, config.model.dropout = tokenizer.vocab_size, 0.0
    torch.manual_seed(seed)
    return save_checkpoint(directory, 1, Transformer(config.model), config, tokenizer)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_stream(client, url: str, prompt: str, max_tokens: int, seed: int, stats: dict) -> None:
    body = {"model": "small", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    tokens = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                stats["errors"].append(f"{response.status_code}: {response.text[:100]}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in chunk:
                    stats["errors"].append(chunk["error"]["message"])
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    continue
                if last is None:
                    stats["ttft"].append(now - start)
                else:
                    stats["itl"].append(now - last)
                last = now
    except Exception as exc:  # noqa: BLE001 - counted, not fatal
        stats["errors"].append(f"{type(exc).__name__}: {exc}")
        return
    stats["tokens"] += tokens


async def run_clients(url: str, n: int, requests: int, max_tokens: int) -> dict:
    import httpx

    stats: dict = {"ttft": [], "itl": [], "tokens": 0, "errors": []}
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def client_loop(c: int) -> None:
            for r in range(requests):
                await one_stream(client, url, PROMPTS[(c + r) % len(PROMPTS)], max_tokens, 1000 * c + r, stats)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(n)))
        stats["wall"] = time.perf_counter() - start
    return stats


def engine_alone(checkpoint: Path, max_tokens: int, threads: int | None) -> float:
    import torch

    from mini_transformer.checkpoint import load_for_inference
    from mini_transformer.generation import generate

    if threads:
        torch.set_num_threads(threads)
    model, _, tokenizer = load_for_inference(checkpoint, "cpu")
    ids = tokenizer.encode(PROMPTS[0])
    generate(model, ids, max_new_tokens=8, temperature=0.8, seed=0)  # warm-up
    runs = []
    for seed in range(3):
        start = time.perf_counter()
        generate(model, ids, max_new_tokens=max_tokens, temperature=0.8, seed=seed)
        runs.append(max_tokens / (time.perf_counter() - start))
    return statistics.median(runs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=3, help="streams per client, one after the other")
    parser.add_argument("--threads", type=int, help="torch threads of the server (default: torch's)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "run")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        command = [sys.executable, "-m", "mini_transformer.cli", "serve", "--checkpoint", str(checkpoint),
                   "--model_name", "small", "--port", str(port), "--max_batch", str(args.max_batch),
                   "--max_queue", "256"]
        server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        try:
            wait_until_up(url, server)
            asyncio.run(run_clients(url, 1, 1, 8))  # warm-up
            print(f"small preset (d_model 256, 6 layers, 65 characters), --max-batch {args.max_batch}, "
                  f"{args.requests} streams of {args.max_tokens} tokens per client, temperature 0.8")
            print("| clients | tokens/s (all) | x one client | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | errors |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|")
            base = None
            for n in args.clients:
                stats = asyncio.run(run_clients(url, n, args.requests, args.max_tokens))
                rate = stats["tokens"] / stats["wall"]
                base = base or rate
                print(f"| {n} | {rate:.0f} | {rate / base:.2f}x | {percentile(stats['ttft'], 50) * 1000:.0f} ms | "
                      f"{percentile(stats['ttft'], 99) * 1000:.0f} ms | {percentile(stats['itl'], 50) * 1000:.1f} ms | "
                      f"{percentile(stats['itl'], 99) * 1000:.1f} ms | {len(stats['errors'])} |", flush=True)
                for error in stats["errors"][:3]:
                    print(f"  error: {error}")
        finally:
            server.terminate()
            server.wait(60)
        alone = engine_alone(checkpoint, args.max_tokens, args.threads)
        print(f"engine alone (generate, batch 1, in-process): {alone:.0f} tokens/s")


if __name__ == "__main__":
    main()
