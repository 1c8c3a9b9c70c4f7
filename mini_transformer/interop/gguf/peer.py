"""llama.cpp as a peer in ``bench``: our greedy decoding against llama.cpp's on the same weights.

The benchmarked model (a preset with ``norm: rmsnorm``, random weights, the model-size table's
65-character vocabulary) is saved, exported to a GGUF file (f32 against our fp32, f16 against
our bf16: :data:`PEER_OUTTYPES`) and loaded in llama.cpp. Both then decode the same 8-token
prompt for 200 tokens, greedily, in turn (A, B, A, B, ...), with the same number of threads:
ours with :func:`..benchmark.our_generation_fn` (as ``generate`` runs: eager, and compiled when
asked, each in the weight layout ``load_for_inference`` gives it), llama.cpp with its own decode
loop and greedy sampler (:func:`.llamacpp.greedy`). Each llama.cpp run starts from an empty
KV-cache, so both pay the prompt's prefill. Our batched decoding (several copies of the prompt
at once, the server's case) is timed in the same turns; llama.cpp's batch-1 speed is its
reference.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from ...benchmark import VOCAB_SIZE, interleaved_median_times, our_generation_fn, preset_model_config
from ...checkpoint import save_inference_checkpoint
from ...config import Config
from ...decode_layout import to_decode_layout
from ...device import DTYPES
from ...errors import UserError
from ...generation import generate
from ...model import Transformer
from ...tokenizer import CharTokenizer
from . import llamacpp
from .export import export_gguf

# 65 distinct characters, the size of Tiny Shakespeare's: the file's vocabulary (ids are all that matter).
_CHARS = [chr(c) for c in range(ord("!"), ord("!") + VOCAB_SIZE)]
DEFAULT_BLOCK_SIZE = 256  # every preset fits prompt + 200 tokens, so neither side slides its window


# Our weights' dtype -> the GGUF tensor type llama.cpp decodes in the same row: the nearest 16-bit.
PEER_OUTTYPES: dict[str, str] = {"fp32": "f32", "bf16": "f16"}


def compare_with_llamacpp(preset: str, *, dtype: str = "fp32", compile_model: bool = False,
                          batch_sizes: Sequence[int] = (1,), block_size: Optional[int] = None,
                          gen_tokens: int = 200, prompt_tokens: int = 8, repeats: int = 5,
                          threads: Optional[int] = None) -> dict[str, Any]:
    """Time greedy decoding for ours and llama.cpp on the same weights; returns a table row.

    At batch 1: llama.cpp (``dtype``'s GGUF type, :data:`PEER_OUTTYPES`), ours eager (decode
    layout) and, with ``compile_model``, ours with the compiled decode step, all in turn. Past
    batch 1 (``batch_sizes``): ours only, ``batch`` copies of the prompt decoded together,
    compiled when ``compile_model``. Also records whether our greedy tokens, each way, equal llama.cpp's.
    """
    llamacpp.import_llama_cpp()
    if compile_model:
        # Each batch size is a graph of its own: a fresh cache keeps this row's graphs under
        # Dynamo's limit per function (past it, the step would run eagerly).
        torch._dynamo.reset()
    threads = threads or torch.get_num_threads()
    config = preset_model_config(preset, block_size or DEFAULT_BLOCK_SIZE, norm="rmsnorm")
    check_fits(prompt_tokens, gen_tokens, config.block_size)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    prompt = list(range(1, prompt_tokens + 1))
    previous = torch.get_num_threads()
    outtype = PEER_OUTTYPES[dtype]
    with llamacpp_generation_fn(ours, prompt, gen_tokens, threads, outtype) as (peer_generate, peer_tokens):
        # Each way decodes with the weights' layout load_for_inference gives it.
        models = {"eager": to_decode_layout(copy.deepcopy(ours).to(DTYPES[dtype]))}
        if compile_model:
            models["compiled"] = to_decode_layout(ours.to(DTYPES[dtype]), compiled=True)
        fns = {way: our_generation_fn(model, prompt, gen_tokens, compile_model=way == "compiled")
               for way, model in models.items()}
        batched_model = models["compiled" if compile_model else "eager"]
        for batch in batch_sizes:
            if batch > 1:
                fns[f"batch {batch}"] = our_generation_fn(batched_model, prompt, gen_tokens,
                                                          compile_model=compile_model, batch_size=batch)
        torch.set_num_threads(threads)
        try:
            same_tokens = {way: generate(model, prompt, max_new_tokens=gen_tokens, temperature=0,
                                         compile=way == "compiled") == peer_tokens
                           for way, model in models.items()}
            times = interleaved_median_times([peer_generate, *fns.values()], repeats, 1, torch.device("cpu"))
        finally:
            torch.set_num_threads(previous)
    peer_time, ours_times = times[0], dict(zip(fns, times[1:]))
    row: dict[str, Any] = {
        "preset": preset, "dtype": f"{dtype} / {outtype}", "threads": threads, "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens, "parameters": ours.num_parameters(), "peer_tokens_per_s": gen_tokens / peer_time,
        "same_tokens": all(same_tokens.values()), "same_tokens_by_way": same_tokens,
    }
    for way in ("eager", "compiled"):
        if way in ours_times:
            row[f"{way}_tokens_per_s"] = gen_tokens / ours_times[way]
            row[f"{way}_ratio"] = peer_time / ours_times[way]
    best = "compiled" if compile_model else "eager"
    row["batched_tokens_per_s"] = {
        batch: (row[f"{best}_tokens_per_s"] if batch == 1 else batch * gen_tokens / ours_times[f"batch {batch}"])
        for batch in batch_sizes}
    return row


def check_fits(prompt_tokens: int, gen_tokens: int, block_size: int) -> None:
    """Refuse a prompt and generation longer than the context: llama.cpp's context would overflow
    where ours slides its window, and the two would no longer decode the same way."""
    if prompt_tokens + gen_tokens > block_size:
        raise UserError(f"prompt and generated tokens ({prompt_tokens + gen_tokens}) exceed the context "
                        f"({block_size}); raise --block_size or lower --gen_tokens")


@contextlib.contextmanager
def llamacpp_generation_fn(model: Transformer, prompt: list[int], gen_tokens: int, threads: int,
                           outtype: str = "f32") -> Iterator[tuple[Callable[[], None], list[int]]]:
    """llama.cpp's greedy decoding of ``prompt`` on ``model``'s weights (saved, exported to a GGUF
    file of ``outtype``, loaded with ``threads``): a function to time, valid inside the block, and
    the tokens it generates. Call it before converting ``model`` for decoding (dtype, decode
    layout): the file takes its weights."""
    config = model.config
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_inference_checkpoint(Path(tmp) / "model", model, Config(model=config),
                                               CharTokenizer(_CHARS))
        path = export_gguf(checkpoint, Path(tmp) / "model.gguf", outtype=outtype).path
        llm = llamacpp.load_llama(path, n_ctx=config.block_size, threads=threads)

        def peer_generate() -> None:
            out = llamacpp.greedy(llm, prompt, gen_tokens)
            assert len(out) == gen_tokens

        try:
            yield peer_generate, llamacpp.greedy(llm, prompt, gen_tokens)
        finally:
            llm.close()


def llamacpp_table(rows: list[dict[str, Any]]) -> str:
    """Batch-1 decoding: our speeds (eager, and compiled when measured) beside llama.cpp's, with ratios."""
    compiled = any("compiled_tokens_per_s" in r for r in rows)
    header = "| preset | parameters | dtype (ours / llama.cpp) | threads | llama.cpp tok/s | ours eager | ratio |"
    rule = "| --- | ---: | --- | ---: | ---: | ---: | ---: |"
    if compiled:
        header += " ours compiled | ratio |"
        rule += " ---: | ---: |"
    lines = [header + " same tokens |", rule + " --- |"]
    for r in rows:
        line = (f"| {r['preset']} | {r['parameters'] / 1e6:.2f}M | {r['dtype']} | {r['threads']} | "
                f"{r['peer_tokens_per_s']:,.0f} | {r['eager_tokens_per_s']:,.0f} | {r['eager_ratio']:.2f}x |")
        if compiled:
            line += (f" {r['compiled_tokens_per_s']:,.0f} | {r['compiled_ratio']:.2f}x |"
                     if "compiled_tokens_per_s" in r else " | |")
        lines.append(line + f" {'yes' if r['same_tokens'] else 'no'} |")
    return "\n".join(lines)


def batched_table(rows: list[dict[str, Any]]) -> str:
    """Our decoding tokens/s (all rows together) by batch size, llama.cpp's batch-1 speed beside."""
    batches = sorted({b for r in rows for b in r["batched_tokens_per_s"]})
    lines = ["| preset | dtype | " + " | ".join(f"ours, batch {b}" for b in batches) + " | llama.cpp, batch 1 |",
             "| --- | --- |" + " ---: |" * (len(batches) + 1)]
    for r in rows:
        speeds = " | ".join(f"{r['batched_tokens_per_s'][b]:,.0f}" if b in r["batched_tokens_per_s"] else ""
                            for b in batches)
        lines.append(f"| {r['preset']} | {r['dtype']} | {speeds} | {r['peer_tokens_per_s']:,.0f} |")
    return "\n".join(lines)
