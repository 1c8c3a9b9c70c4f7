"""Benchmarks that print tables: training and generation speed, memory, MFU, and the HF peer.

Every speed is the median of several timed repetitions after warm-up, shown with the slowest
and fastest of them: a wide range means the machine was busy and the figures are unsteady. MFU is the model's FLOPs
per second over the throughput of a large matmul of the same dtype, measured on this machine at
start-up (not the datasheet peak). Nothing here is a test: these functions return rows and the
CLI prints them (``mini-transformer bench``).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from .atomic import atomic_write_text, make_dirs
from .config import Config, ModelConfig, load_config
from .decode_layout import to_decode_layout
from .device import autocast, cpu_flags, cpuinfo_field, dtype_name, resolve_device, resolve_dtype
from .errors import SettingError, UserError
from .generation import KVCachePool, generate, generate_batch
from .model import Transformer
from .profile import (
    count_parameters, flops_per_token, human_bytes, measure_matmul_flops, measure_training_step_peak, synchronize,
)
from .training.flops import model_flops_utilization

VOCAB_SIZE = 65  # Tiny Shakespeare's characters: the setting of the model-size table
# Fastest over slowest repetition above this: something else was using the machine. (On an idle
# machine repetitions agree within ~10-20%; a shared one has shown 4x for the same row.)
BUSY_SPREAD = 1.5


@dataclass
class BenchSettings:
    presets: list[str] = field(default_factory=lambda: ["tiny", "small", "medium", "large"])
    batch_size: int = 32
    block_size: Optional[int] = 256  # None: each preset's own block_size
    dtype: str = "auto"
    device: str = "auto"
    steps: int = 5
    warmup: int = 2
    gen_tokens: int = 200
    prompt_tokens: int = 8
    memory: bool = True
    compile: bool = False


def check_counts(**counts: Optional[int]) -> None:
    """Refuse a count below 1 (batch_size, block_size, steps, gen_tokens; None: the default),
    before anything is built: a median of no steps, or a rate of no tokens, means nothing."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise SettingError(f"{name} must be at least 1, got {value}; leave it out for the default",
                               setting=name)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}"
    return (f"{_cpu_model_name()} ({torch.backends.cpu.get_cpu_capability()}{_cpu_matrix_extensions()}), "
            f"{torch.get_num_threads()} threads, PyTorch {torch.__version__}")


def _cpu_model_name() -> str:
    return cpuinfo_field("model name") or f"{platform.processor() or platform.machine()} CPU"


def _cpu_matrix_extensions() -> str:
    """Whether bf16 matmuls have AMX tiles or AVX-512 BF16: a 5x vs 2x speedup over fp32."""
    flags = cpu_flags()
    found = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return f", {', '.join(found)}" if found else ""


def preset_model_config(preset: str, block_size: Optional[int], norm: Optional[str] = None) -> ModelConfig:
    config = load_config(preset=preset).model
    config.vocab_size = VOCAB_SIZE
    config.dropout = 0.0
    if block_size:
        config.block_size = block_size
    if norm:
        config.norm = norm
    return config


def median_time(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after ``warmup`` untimed runs."""
    return statistics.median(timed_runs(fn, repeats, warmup, device))


def timed_runs(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall time of each of ``repeats`` runs of ``fn``, after ``warmup`` untimed runs."""
    return interleaved_times([fn], repeats, warmup, device)[0]


def interleaved_median_times(fns: list[Callable[[], Any]], repeats: int, warmup: int,
                             device: torch.device) -> list[float]:
    """Median wall time of each function, timed in turn (see :func:`interleaved_times`)."""
    return [statistics.median(t) for t in interleaved_times(fns, repeats, warmup, device)]


def interleaved_times(fns: list[Callable[[], Any]], repeats: int, warmup: int,
                      device: torch.device) -> list[list[float]]:
    """Wall time of each run of each function, timed in turn (A, B, A, B, ...) after warm-up.

    Why interleave: on a shared machine the speed drifts over minutes, and timing all of A
    before all of B turns that drift into a false ratio; in turns, both see the same drift.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            synchronize(device)
            fn_times.append(time.perf_counter() - start)
    return times


def rates(units: float, seconds: list[float]) -> dict[str, float]:
    """``units`` per second at the median, slowest and fastest of the timed runs."""
    return {"median": units / statistics.median(seconds), "min": units / max(seconds), "max": units / min(seconds)}


def training_step_fn(model: torch.nn.Module, batch: int, block: int, vocab: int, device: torch.device,
                     dtype: torch.dtype, loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                     compile_model: bool = False, fused_adamw: bool = True) -> Callable[[], None]:
    """One full step: forward, loss, backward, clip to 1.0, AdamW step, zero grads.

    ``fused_adamw`` picks the fused kernel (what our training loop uses); the peer gets PyTorch's
    default AdamW, as a user of it would.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, block), generator=generator).to(device)
    y = torch.randint(0, vocab, (batch, block), generator=generator).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if fused_adamw and device.type in ("cpu", "cuda"):
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    forward = torch.compile(model) if compile_model else model
    model.train()

    def step() -> None:
        with autocast(device, dtype):
            loss = loss_fn(forward, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _our_loss(model, x, y):
    return model(x, y).loss


def our_generation_fn(model: Transformer, prompt: list[int], new_tokens: int, use_cache: bool = True,
                      compile_model: bool = False, batch_size: int = 1):
    """Greedy generation of ``new_tokens`` after ``prompt`` as ``generate`` runs it (``batch_size``
    copies of the prompt decoded together past 1): a function to time."""
    # One pool for every timed call: compiled decoding on CUDA replays a graph that reads the
    # KV-cache where it was recorded, so each call must get the same cache back.
    cache_pool = KVCachePool()
    settings = dict(max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache, compile=compile_model,
                    cache_pool=cache_pool)

    def run() -> None:
        if batch_size == 1:
            assert len(generate(model, prompt, **settings)) == new_tokens
        else:
            assert all(len(row) == new_tokens for row in generate_batch(model, [prompt] * batch_size, **settings))

    return run


def bench_preset(preset: str, settings: BenchSettings) -> dict[str, Any]:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    config = preset_model_config(preset, settings.block_size)
    params = count_parameters(config)
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    big = params.total > 50e6
    steps = max(2, settings.steps // 2) if big else settings.steps
    step = training_step_fn(model, settings.batch_size, config.block_size, VOCAB_SIZE, device, dtype, _our_loss,
                            settings.compile)
    step_times = timed_runs(step, steps, 1 if big else settings.warmup, device)
    seconds = statistics.median(step_times)
    train = rates(settings.batch_size * config.block_size, step_times)
    tokens_per_s = train["median"]
    matmul_rate = measure_matmul_flops(device, dtype)
    mfu = model_flops_utilization(flops_per_token(config)[1], tokens_per_s, matmul_rate)

    model.eval()
    gen_model = to_decode_layout(model.to(dtype) if dtype is not torch.float32 else model, compiled=settings.compile)
    prompt = list(range(1, settings.prompt_tokens + 1))
    generation = rates(settings.gen_tokens, timed_runs(
        our_generation_fn(gen_model, prompt, settings.gen_tokens, compile_model=settings.compile), 3, 1, device))
    row = {
        "preset": preset, "params": params.total, "batch_size": settings.batch_size,
        "block_size": config.block_size, "dtype": dtype_name(dtype), "device": str(device),
        "train_tokens_per_s": tokens_per_s, "train_tokens_per_s_min": train["min"],
        "train_tokens_per_s_max": train["max"], "train_step_s": seconds, "train_steps_timed": steps,
        "generate_tokens_per_s": generation["median"], "generate_tokens_per_s_min": generation["min"],
        "generate_tokens_per_s_max": generation["max"], "mfu": mfu, "matmul_flops_per_s": matmul_rate,
    }
    if settings.memory:
        full = Config()
        full.model = config
        full.training.batch_size = settings.batch_size
        full.training.dtype = settings.dtype
        full.training.device = settings.device
        row["peak_memory_bytes"] = measure_training_step_peak(full)["peak_bytes"]
        full.training.gradient_checkpointing = True
        row["peak_memory_checkpointed_bytes"] = measure_training_step_peak(full)["peak_bytes"]
    return row


BENCH_HEADER = [
    "| preset | parameters | peak memory (train step) | with grad. checkpointing "
    "| train tokens/s, median (slowest-fastest) | MFU (vs measured matmul) "
    "| generate tokens/s (batch 1, KV-cache), median (slowest-fastest) |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
]


def bench_table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([*BENCH_HEADER, *(bench_row(r) for r in rows)])


def bench_row(r: dict[str, Any]) -> str:
    """One row of the model-size table: printed as soon as its preset is measured."""
    mem = human_bytes(r["peak_memory_bytes"]) if "peak_memory_bytes" in r else "-"
    ckpt = human_bytes(r["peak_memory_checkpointed_bytes"]) if "peak_memory_checkpointed_bytes" in r else "-"
    return (f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {mem} | {ckpt} | {_rate_cell(r, 'train_tokens_per_s')} "
            f"| {r['mfu']:.1%} | {_rate_cell(r, 'generate_tokens_per_s')} |")


def _rate_cell(row: dict[str, Any], key: str) -> str:
    if f"{key}_min" not in row:
        return f"{row[key]:,.0f}"
    return f"{row[key]:,.0f} ({row[f'{key}_min']:,.0f}-{row[f'{key}_max']:,.0f})"


def spread(row: dict[str, Any], key: str) -> float:
    """Fastest over slowest timed run of ``row[key]`` (1.0 when the row has no range)."""
    low, high = row.get(f"{key}_min"), row.get(f"{key}_max")
    return high / low if low and high else 1.0


def busy_note(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("train_tokens_per_s", "generate_tokens_per_s"),
              name: Callable[[dict[str, Any]], str] = lambda r: r["preset"]) -> Optional[str]:
    """A warning when a row's timed runs differ by more than :data:`BUSY_SPREAD`, else None."""
    wide = {name(r): max(spread(r, key) for key in keys) for r in rows}
    wide = {name: s for name, s in wide.items() if s > BUSY_SPREAD}
    if not wide:
        return None
    return (f"note: the timed runs of {', '.join(dict.fromkeys(wide))} differ by up to {max(wide.values()):.1f}x "
            "(slowest to fastest): the machine was busy while measuring, so these figures are unsteady; "
            "rerun when it is idle (or with more --steps)")


def mfu_note(rows: list[dict[str, Any]]) -> str:
    """What the MFU column divides by: the matmul throughput measured at start-up, quoted."""
    low, high = (_flop_rate(f(r["matmul_flops_per_s"] for r in rows)) for f in (min, max))
    rate = low if low == high else f"{low} to {high}"
    return (f"MFU: the model's training FLOPs per second over the throughput of a large {rows[0]['dtype']} "
            f"matmul measured on this machine at start-up ({rate}), not the datasheet peak.")


def _flop_rate(flops_per_s: float) -> str:
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:.3g} TFLOP/s"
    return f"{flops_per_s / 1e9:.3g} GFLOP/s"


# -- the peer: Hugging Face LlamaForCausalLM with the same dimensions -----------------------------

def hf_llama_like(config: ModelConfig):
    """LlamaForCausalLM with our dimensions: RMSNorm, RoPE, SwiGLU of the same hidden size, tied."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:  # an optional dependency (the hf extra)
        raise UserError("comparing with Hugging Face's LlamaForCausalLM needs transformers: "
                        "pip install 'mini-transformer[hf]'") from None
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.hidden_size,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_base, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_config)


def _hf_loss(model, x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def compare_with_hf(preset: str, dtype_spec: str, batch_size: int = 32, block_size: Optional[int] = None,
                    device_spec: str = "auto", steps: int = 5, warmup: int = 2, gen_tokens: int = 200,
                    prompt_tokens: int = 8, compile_model: bool = False) -> dict[str, Any]:
    """Time a training step and greedy generation for ours and the peer, one after the other."""
    device = resolve_device(device_spec)
    dtype = resolve_dtype(dtype_spec, device)
    config = preset_model_config(preset, block_size, norm="rmsnorm")
    torch.manual_seed(0)
    ours = Transformer(config).to(device)
    peer = hf_llama_like(config).to(device)
    ours_step = training_step_fn(ours, batch_size, config.block_size, VOCAB_SIZE, device, dtype, _our_loss,
                                 compile_model)
    peer_step = training_step_fn(peer, batch_size, config.block_size, VOCAB_SIZE, device, dtype, _hf_loss,
                                 fused_adamw=False)
    tokens = batch_size * config.block_size
    ours_train, peer_train = (rates(tokens, t) for t in interleaved_times([ours_step, peer_step], steps, warmup,
                                                                         device))

    prompt = list(range(1, prompt_tokens + 1))
    for model in (ours, peer):
        model.eval()
        if dtype is not torch.float32:
            model.to(dtype)
    to_decode_layout(ours, compiled=compile_model)  # as load_for_inference gives it to generate
    input_ids = torch.tensor([prompt], device=device)
    attention_mask = torch.ones_like(input_ids)

    def peer_generate() -> None:
        with torch.no_grad():
            out = peer.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                                max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, pad_token_id=0)
        assert out.shape[1] == prompt_tokens + gen_tokens

    ours_generate = our_generation_fn(ours, prompt, gen_tokens, compile_model=compile_model)
    ours_gen, peer_gen = (rates(gen_tokens, t) for t in interleaved_times([ours_generate, peer_generate], 5, 1,
                                                                          device))
    row = {"preset": preset, "dtype": dtype_name(dtype), "device": str(device), "batch_size": batch_size,
           "block_size": config.block_size}
    for key, measured in (("ours_train_tokens_per_s", ours_train), ("peer_train_tokens_per_s", peer_train),
                          ("ours_generate_tokens_per_s", ours_gen), ("peer_generate_tokens_per_s", peer_gen)):
        row.update({key: measured["median"], f"{key}_min": measured["min"], f"{key}_max": measured["max"]})
    row["train_ratio"] = ours_train["median"] / peer_train["median"]
    row["generate_ratio"] = ours_gen["median"] / peer_gen["median"]
    return row


COMPARE_SPEEDS = ("ours_train_tokens_per_s", "peer_train_tokens_per_s", "ours_generate_tokens_per_s",
                  "peer_generate_tokens_per_s")


def compare_busy_note(rows: list[dict[str, Any]]) -> Optional[str]:
    return busy_note(rows, COMPARE_SPEEDS, name=lambda r: f"{r['preset']} {r['dtype']}")


COMPARE_HEADER = [
    "| preset | dtype | batch x block | train tok/s, ours | train tok/s, HF Llama | ratio "
    "| generate tok/s, ours | generate tok/s, HF Llama | ratio |",
    "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
]


def compare_table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([*COMPARE_HEADER, *(compare_row(r) for r in rows)])


def compare_row(r: dict[str, Any]) -> str:
    """One row of the side-by-side table (speeds are medians; see :func:`compare_busy_note`)."""
    return (f"| {r['preset']} | {r['dtype']} | {r['batch_size']} x {r['block_size']} | "
            f"{r['ours_train_tokens_per_s']:,.0f} | {r['peer_train_tokens_per_s']:,.0f} | {r['train_ratio']:.2f}x | "
            f"{r['ours_generate_tokens_per_s']:,.0f} | {r['peer_generate_tokens_per_s']:,.0f} | "
            f"{r['generate_ratio']:.2f}x |")


def write_results(out_dir: Path, name: str, markdown: str, rows: list[dict[str, Any]], machine: str) -> None:
    make_dirs(out_dir)
    atomic_write_text(out_dir / f"{name}.md", f"Machine: {machine}\n\n{markdown}\n")
    atomic_write_text(out_dir / f"{name}.json", json.dumps({"machine": machine, "rows": rows}, indent=2))


def profile_training(preset: str, out_path: Path, steps: int = 3, batch_size: int = 32,
                     block_size: Optional[int] = None, dtype_spec: str = "auto",
                     device_spec: str = "auto") -> str:
    """A torch.profiler Chrome trace of a few training steps; returns the top-operator table."""
    device = resolve_device(device_spec)
    dtype = resolve_dtype(dtype_spec, device)
    config = preset_model_config(preset, block_size)
    model = Transformer(config).to(device)
    step = training_step_fn(model, batch_size, config.block_size, VOCAB_SIZE, device, dtype, _our_loss)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    make_dirs(out_path.parent)
    prof.export_chrome_trace(str(out_path))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=20)
