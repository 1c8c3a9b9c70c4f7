"""``bench --profile decode``: where a generated token's time goes, for decoding on the CPU.

A preset's model (random weights, the model-size table's vocabulary) decodes greedily as
``generate`` runs it: an 8-token prompt prefilled once, then one token per step through the
KV-cache, in the decode layout, the decode step compiled with ``compile``. Then:

1. **wall time**: the median of several generations without the profiler, over the tokens
   generated (the prompt's prefill is spread over them, as in ``bench``'s tokens/s);
2. **the categories**: one more generation under ``torch.profiler``. Every operator's self time
   (its time less that of the operators it calls) goes to one category: that of the nearest
   operator, itself first, whose name places it (:func:`own_category`): a linear's transposes
   and views are matmul time, the sampler's argmax is sampling time (the engine marks the
   sampler as :data:`~.generation.engine.SAMPLING_REGION`). An operator that no named one
   encloses is an elementwise or other tensor op;
3. **framework overhead**: the wall time less the categories: Python, dispatch, allocation,
   and the self time of the regions that are not operators (Dynamo's guard check, the compiled
   graph's Python wrapper, the sampler's own Python).

The profiler slows operators down a little, which inflates the categories and shrinks the
overhead: :func:`profiler_note` says so with the profiled run's own wall time beside the
unprofiled one. With llama-cpp-python installed, llama.cpp decodes the same weights (an f32
GGUF export) in turn with ours, for a per-token time side by side.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch.profiler import ProfilerActivity, profile

from .atomic import atomic_write_named
from .benchmark import interleaved_times, our_generation_fn, preset_model_config
from .decode_layout import to_decode_layout
from .device import dtype_name, resolve_dtype
from .errors import UserError
from .generation.engine import SAMPLING_REGION
from .interop.gguf import llamacpp
from .interop.gguf.peer import check_fits, llamacpp_generation_fn
from .model import Transformer

# The table's rows, in order: key -> what the row holds.
CATEGORIES: dict[str, str] = {
    "matmuls": "matmuls (mm, addmm, bmm, linear, int8 mm)",
    "fused": "compiled kernels fusing products with the rest (a compiled step's one-row matmuls, attention, norms)",
    "attention": "attention (SDPA kernels, KV-cache write)",
    "elementwise": "elementwise and other tensor ops (norms, RoPE, SiLU, adds, cat, views)",
    "sampling": "sampling (argmax, softmax, top-k, multinomial)",
}
OVERHEAD = "framework overhead (Python, dispatch, allocation)"
REGION = "overhead (region's own time)"  # what the top-operator list calls a region's self time

MATMUL_OPS = frozenset({
    "aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::_addmm_activation", "aten::bmm",
    "aten::baddbmm", "aten::mv", "aten::addmv", "aten::dot", "aten::_weight_int8pack_mm", "aten::_int_mm",
    "aten::_weight_int4pack_mm", "aten::mkldnn_linear", "mkldnn::_linear_pointwise", "mkl::_mkl_linear",
})
# The KV-cache write (index_copy_ for one slot for every row, scatter_ for a slot per row) and
# SDPA with every backend it dispatches to, named by the words their names contain: the same
# words name an Inductor kernel fused from them.
ATTENTION_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention", "index_copy", "scatter")
# Kernels Inductor generates (named after the operators fused into them) are operators too.
COMPILED_KERNEL_WORDS = ("cpp_fused", "triton_")
# A compiled kernel named after one of these holds products: with the one-row products of a
# compiled CPU decode step (decode_layout.OneRowProducts), the whole step can be one such
# kernel, so its time cannot be split further by name.
FUSED_PRODUCT_WORDS = frozenset({"sum", "bmm", "mm", "addmm"})


class ProfiledEvent(Protocol):
    """What is read of a ``torch.profiler`` event (``FunctionEvent``)."""

    name: str
    cpu_parent: Optional["ProfiledEvent"]
    self_cpu_time_total: float


def own_category(name: str) -> Optional[str]:
    """The category an operator's name places it, and the operators it calls, in; None: its caller's."""
    if name == SAMPLING_REGION:
        return "sampling"
    if name in MATMUL_OPS:
        return "matmuls"
    if is_compiled_kernel(name) and FUSED_PRODUCT_WORDS & set(name.split("_")):
        return "fused"
    if any(word in name for word in ATTENTION_WORDS):
        return "attention"
    if is_compiled_kernel(name):
        return "elementwise"
    return None


def is_compiled_kernel(name: str) -> bool:
    return any(word in name for word in COMPILED_KERNEL_WORDS)


def is_operator(name: str) -> bool:
    """An operator (``aten::mm``) or a compiled kernel, whose self time is computing; any other
    event is a region (``record_function``: ours, Dynamo's, Inductor's wrapper), whose self time
    is the Python that runs in it between operators."""
    return "::" in name or is_compiled_kernel(name)


def category(event: ProfiledEvent) -> str:
    """An operator's category: sampling anywhere inside the sampler's region (its scatter is not
    the KV-cache's), else that of the nearest enclosing named operator, itself first, else elementwise."""
    chain = []
    while event is not None:
        chain.append(event.name)
        event = event.cpu_parent
    if SAMPLING_REGION in chain:
        return "sampling"
    return next((c for c in map(own_category, chain) if c), "elementwise")


def breakdown(events: Iterable[ProfiledEvent]) -> dict[str, Any]:
    """Self time (us) per category, per region, and per (name, category) with call counts.

    Every event's self time is counted once: in a category (an operator) or in ``regions``.
    """
    categories = dict.fromkeys(CATEGORIES, 0.0)
    regions: dict[str, float] = defaultdict(float)
    ops: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        us = event.self_cpu_time_total
        if is_operator(event.name):
            kind = category(event)
            categories[kind] += us
        else:
            kind = REGION
            regions[event.name] += us
        ops[event.name, kind][0] += us
        ops[event.name, kind][1] += 1
    return {"categories": categories, "regions": dict(regions), "ops": ops}


def llamacpp_installed() -> bool:
    try:
        llamacpp.import_llama_cpp()
    except UserError:
        return False
    return True


def profile_decode(preset: str, trace_path: Path, *, dtype_spec: str = "fp32", batch_size: int = 1,
                   block_size: int = 256, gen_tokens: int = 200, prompt_tokens: int = 8,
                   compile_model: bool = False, repeats: int = 5, with_llamacpp: bool = True,
                   top: int = 10) -> dict[str, Any]:
    """Profile greedy decoding of ``preset`` on the CPU; writes the Chrome trace, returns a row.

    Times in the row are microseconds per decode step (per token at batch 1). ``with_llamacpp``:
    time llama.cpp on the same weights too, when llama-cpp-python is installed.
    """
    device = torch.device("cpu")
    dtype = torch.float32 if dtype_spec == "auto" else resolve_dtype(dtype_spec, device)
    config = preset_model_config(preset, block_size)
    check_fits(prompt_tokens, gen_tokens, config.block_size)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompt = list(range(1, prompt_tokens + 1))
    threads = torch.get_num_threads()
    peer = with_llamacpp and batch_size == 1 and llamacpp_installed()
    with contextlib.ExitStack() as stack:
        # The GGUF file takes the fp32 weights, before ours are converted for decoding.
        fns = [stack.enter_context(llamacpp_generation_fn(model, prompt, gen_tokens, threads))[0]] if peer else []
        to_decode_layout(model.to(dtype), compiled=compile_model)  # as load_for_inference gives it to generate
        ours = our_generation_fn(model, prompt, gen_tokens, compile_model=compile_model, batch_size=batch_size)
        if compile_model:
            # Inductor's fused kernels then appear in the trace under their own names, not
            # inside its Python wrapper's region (where they would read as overhead).
            stack.enter_context(torch._inductor.config.patch({"cpp.enable_kernel_profile": True}))
        # In turn with llama.cpp: both see the same drift of a shared machine. The warm-up compiles.
        times = interleaved_times([ours, *fns], repeats, 1, device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            ours()
            profiled_wall = time.perf_counter() - start
    atomic_write_named(trace_path, lambda tmp: prof.export_chrome_trace(str(tmp)))
    found = breakdown(prof.events())

    def per_step(us: float) -> float:
        return us / gen_tokens

    wall = [seconds * 1e6 / gen_tokens for seconds in times[0]]
    categories = {name: per_step(us) for name, us in found["categories"].items()}
    wall_us = statistics.median(wall)
    ranked = sorted(found["ops"].items(), key=lambda item: -item[1][0])[:top]
    return {
        "preset": preset, "parameters": model.num_parameters(), "dtype": dtype_name(dtype),
        "batch_size": batch_size, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "compile": compile_model, "threads": threads, "runs": repeats,
        "wall_us": wall_us, "wall_us_min": min(wall), "wall_us_max": max(wall),
        "profiled_wall_us": profiled_wall * 1e6 / gen_tokens,
        "categories_us": categories, "overhead_us": wall_us - sum(categories.values()),
        "regions_us": {name: per_step(us) for name, us in found["regions"].items()},
        "top_ops": [{"name": name, "category": kind, "us": per_step(us), "calls": calls / gen_tokens}
                    for (name, kind), (us, calls) in ranked],
        "llamacpp_us": statistics.median(times[1]) * 1e6 / gen_tokens if peer else None,
        "trace": str(trace_path),
    }


def unit(row: dict[str, Any]) -> str:
    return "token" if row["batch_size"] == 1 else f"step ({row['batch_size']} tokens)"


def report(row: dict[str, Any]) -> str:
    """A preset's section: what ran, the table, llama.cpp's line, the top operators."""
    wall = row["wall_us"]
    lines = [
        f"{row['preset']} ({row['parameters'] / 1e6:.2f}M parameters), {row['dtype']}, batch {row['batch_size']}, "
        f"{row['prompt_tokens']}-token prompt + {row['gen_tokens']} new tokens, greedy, KV-cache, "
        f"{'compiled' if row['compile'] else 'eager'} decode step, {row['threads']} threads",
        "",
        f"| where a {unit(row)}'s time goes | us per {unit(row)} | share of wall time |",
        "| --- | ---: | ---: |",
        *(f"| {title} | {row['categories_us'][name]:,.1f} | {row['categories_us'][name] / wall:.1%} |"
          for name, title in CATEGORIES.items()),
        f"| {OVERHEAD} | {row['overhead_us']:,.1f} | {row['overhead_us'] / wall:.1%} |",
        f"| wall time, median of {row['runs']} runs without the profiler (slowest-fastest "
        f"{row['wall_us_max']:,.0f}-{row['wall_us_min']:,.0f}) | {wall:,.1f} | 100.0% |",
        "",
        llamacpp_line(row),
        "",
        f"top operators by self time (under the profiler, per {unit(row)}):",
        "",
        f"| operator | category | us per {unit(row)} | calls per {unit(row)} |",
        "| --- | --- | ---: | ---: |",
        *(f"| {op['name'][:80]} | {op['category']} | {op['us']:,.1f} | {op['calls']:,.1f} |" for op in row["top_ops"]),
        "",
        f"Chrome trace: {row['trace']} (open in chrome://tracing or Perfetto)",
    ]
    return "\n".join(lines)


def llamacpp_line(row: dict[str, Any]) -> str:
    if row["batch_size"] != 1:
        return "llama.cpp: compared at batch 1 only"
    if row["llamacpp_us"] is None:
        return "llama.cpp: not installed (pip install 'mini-transformer[llamacpp]')"
    ours, peer = row["wall_us"], row["llamacpp_us"]
    return (f"ours {ours:,.0f} us/{unit(row)}, llama.cpp {peer:,.0f} us/token on the same weights "
            f"(an f32 GGUF export, batch 1, {row['threads']} threads, timed in turn): ours takes {ours / peer:.2f}x")


def profiler_note(rows: list[dict[str, Any]]) -> str:
    """What the table can and cannot say: the profiler's own cost, quoted."""
    slowdown = ", ".join(f"{r['preset']} {r['profiled_wall_us']:,.0f} us vs {r['wall_us']:,.0f} us" for r in rows)
    return ("note: each category is its operators' self time under torch.profiler, counted once, in the "
            "category of the nearest operator that places it (a linear's transposes are matmul time); "
            "framework overhead is the unprofiled wall time less the categories. The profiler adds its own "
            f"cost, part of it inside the operators (a profiled step took {slowdown} without it), so the "
            "categories read a little high and the overhead a little low (it can even come out negative "
            "for a small model): take the overhead as a lower bound.")
