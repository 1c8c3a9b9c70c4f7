"""llama.cpp as a peer in ``bench``: our batch-1 greedy decoding against llama.cpp's on the same weights.

The benchmarked model (a preset with ``norm: rmsnorm``, random weights, the model-size table's
65-character vocabulary) is saved, exported to an f32 GGUF file and loaded in llama.cpp. Both
then decode the same 8-token prompt for 200 tokens, greedily, in turn (A, B, A, B, ...), with
the same number of threads: ours with :func:`..benchmark.our_generation_fn` (as ``generate``
runs), llama.cpp with its own decode loop and greedy sampler (:func:`.llamacpp.greedy`). Each
llama.cpp run starts from an empty KV-cache, so both pay the prompt's prefill.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from ...benchmark import VOCAB_SIZE, interleaved_median_times, our_generation_fn, preset_model_config
from ...checkpoint import save_inference_checkpoint
from ...config import Config
from ...decode_layout import to_decode_layout
from ...errors import UserError
from ...model import Transformer
from ...tokenizer import CharTokenizer
from . import llamacpp
from .export import export_gguf

# 65 distinct characters, the size of Tiny Shakespeare's: the file's vocabulary (ids are all that matter).
_CHARS = [chr(c) for c in range(ord("!"), ord("!") + VOCAB_SIZE)]
DEFAULT_BLOCK_SIZE = 256  # every preset fits prompt + 200 tokens, so neither side slides its window


def compare_with_llamacpp(preset: str, *, block_size: Optional[int] = None, gen_tokens: int = 200,
                          prompt_tokens: int = 8, repeats: int = 5, threads: Optional[int] = None) -> dict[str, Any]:
    """Time greedy decoding at batch 1 in fp32 for ours and llama.cpp (f32 GGUF); returns a table row."""
    llamacpp.import_llama_cpp()
    threads = threads or torch.get_num_threads()
    config = preset_model_config(preset, block_size or DEFAULT_BLOCK_SIZE, norm="rmsnorm")
    check_fits(prompt_tokens, gen_tokens, config.block_size)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    prompt = list(range(1, prompt_tokens + 1))
    previous = torch.get_num_threads()
    with llamacpp_generation_fn(ours, prompt, gen_tokens, threads) as peer_generate:
        to_decode_layout(ours)  # as load_for_inference gives it to generate
        ours_generate = our_generation_fn(ours, prompt, gen_tokens)
        torch.set_num_threads(threads)
        try:
            ours_time, peer_time = interleaved_median_times([ours_generate, peer_generate], repeats, 1,
                                                            torch.device("cpu"))
        finally:
            torch.set_num_threads(previous)
    return {"preset": preset, "dtype": "fp32 / f32", "threads": threads, "prompt_tokens": prompt_tokens,
            "gen_tokens": gen_tokens, "parameters": ours.num_parameters(),
            "ours_tokens_per_s": gen_tokens / ours_time, "peer_tokens_per_s": gen_tokens / peer_time,
            "ratio": peer_time / ours_time}


def check_fits(prompt_tokens: int, gen_tokens: int, block_size: int) -> None:
    """Refuse a prompt and generation longer than the context: llama.cpp's context would overflow
    where ours slides its window, and the two would no longer decode the same way."""
    if prompt_tokens + gen_tokens > block_size:
        raise UserError(f"prompt and generated tokens ({prompt_tokens + gen_tokens}) exceed the context "
                        f"({block_size}); raise --block_size or lower --gen_tokens")


@contextlib.contextmanager
def llamacpp_generation_fn(model: Transformer, prompt: list[int], gen_tokens: int,
                           threads: int) -> Iterator[Callable[[], None]]:
    """llama.cpp's greedy decoding of ``prompt`` on ``model``'s weights (saved, exported to an f32
    GGUF file, loaded with ``threads``): a function to time, valid inside the block. Call it
    before converting ``model`` for decoding (dtype, decode layout): the file takes its weights."""
    config = model.config
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_inference_checkpoint(Path(tmp) / "model", model, Config(model=config),
                                               CharTokenizer(_CHARS))
        path = export_gguf(checkpoint, Path(tmp) / "model.gguf", outtype="f32").path
        llm = llamacpp.load_llama(path, n_ctx=config.block_size, threads=threads)

        def peer_generate() -> None:
            out = llamacpp.greedy(llm, prompt, gen_tokens)
            assert len(out) == gen_tokens

        try:
            yield peer_generate
        finally:
            llm.close()


def llamacpp_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | parameters | dtype | threads | generate tok/s, ours | generate tok/s, llama.cpp | ratio |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['parameters'] / 1e6:.2f}M | {r['dtype']} | {r['threads']} | "
                     f"{r['ours_tokens_per_s']:,.0f} | {r['peer_tokens_per_s']:,.0f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)
