"""FLOPs and MFU: what a training step costs, and what this machine's matmuls deliver.

The cost is analytic, from the model config. FLOPs per token follow the usual accounting
(Kaplan et al. 2020, nanoGPT, PaLM appendix B): a matmul with an (m x n) weight costs 2mn FLOPs
per token forward and 4mn backward, so

    forward  = 2 * N_matmul + 4 * n_layers * T * d_model
    training = 6 * N_matmul + 12 * n_layers * T * d_model

N_matmul is every weight that takes part in a matmul: the non-embedding parameters in the
blocks plus the LM head (vocab x d_model, counted even when tied, since the product is computed).
Norm parameters are left out (they cost O(d) per token), and so are the elementwise options
(qk_norm, the logit softcap). T is the context (``block_size``); the attention term counts the
full T x T scores, as the kernels compute them.

The ceiling is measured, not looked up: :func:`measure_matmul_flops` times the fastest large
matmul on this device in the training dtype when a run starts. So the ``mfu`` the training loop
reports is the model's FLOP rate as a fraction of that measured matmul rate, not of the
hardware's rated peak (which is higher: a measured matmul rarely reaches the data-sheet figure).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import ModelConfig


@dataclass
class ParameterCount:
    total: int
    embedding: int
    non_embedding: int
    matmul: int  # weights used in matmuls per token: blocks + LM head
    block_matrices: int  # the blocks' weight matrices (attention's qkv and proj, the feed-forward's)


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Analytic parameter count; equals ``Transformer(config).num_parameters()``."""
    d, h, V, L = config.d_model, config.hidden_size, config.vocab_size or 0, config.n_layers
    qkv_out = (config.n_heads + 2 * config.kv_heads) * config.head_dim
    b = 1 if config.bias else 0
    qk_norm = 2 * config.head_dim if config.qk_norm else 0  # one RMSNorm weight for q, one for k
    attn = d * qkv_out + b * qkv_out + d * d + b * d + qk_norm
    up = 2 * h if config.activation == "swiglu" else h  # SwiGLU's up holds the gate too
    ffn = d * up + b * up + h * d + b * d
    norm = d if config.norm == "rmsnorm" else d * (1 + b)
    per_layer = attn + ffn + 2 * norm
    embedding = V * d
    head = 0 if config.tie_embeddings else V * d
    non_embedding = L * per_layer + norm + head
    block_matrices = L * (d * qkv_out + d * d + d * up + h * d)
    return ParameterCount(
        total=embedding + non_embedding,
        embedding=embedding,
        non_embedding=non_embedding,
        matmul=block_matrices + V * d,
        block_matrices=block_matrices,
    )


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> tuple[float, float]:
    """(forward, training step) FLOPs per token at context ``seq_len`` (default block_size)."""
    T = seq_len or config.block_size
    n = count_parameters(config).matmul
    attention = 4 * config.n_layers * T * config.d_model
    forward = 2 * n + attention
    return float(forward), float(3 * forward)


def model_flops_utilization(train_flops_per_token: float, tokens_per_s: float, matmul_flops_per_s: float) -> float:
    """The model's training FLOP rate on one device as a fraction of ``matmul_flops_per_s``.

    ``tokens_per_s`` is one device's share; ``matmul_flops_per_s`` is the rate
    :func:`measure_matmul_flops` measured on this machine, not the hardware's rated peak.
    """
    return train_flops_per_token * tokens_per_s / matmul_flops_per_s


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                         min_seconds: float = 0.45) -> float:
    """This device's matmul throughput (FLOP/s) for ``dtype``: the ceiling MFU is measured against.

    The fastest of the single products timed over the last two thirds of ``min_seconds``: a
    ceiling is what the device can do, and on a shared machine the median of a short burst can
    catch a busy moment (MFU above 100% in the progress bar). The product is 1024 square on CPU
    and 8192 square on a GPU (4096 with under 3 GiB free), which a 1024 product leaves mostly
    idle. Inputs are random, from a private generator: constant or zero inputs run faster than
    real data on some GPUs, and the global RNG stays untouched (resumed runs stay exact).
    """
    if size is None:
        size = 1024
        if device.type == "cuda":
            # Three 8192 x 8192 matrices take 768 MiB in fp32: smaller where memory is short.
            free, _ = torch.cuda.mem_get_info(device)
            size = 8192 if free > 4 * 3 * 8192**2 * 4 else 4096
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((size, size), device=device, dtype=dtype, generator=generator)
    b = torch.randn((size, size), device=device, dtype=dtype, generator=generator)
    try:
        return _fastest_matmul_rate(a, b, device, min_seconds)
    finally:
        del a, b
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the probe's blocks back before training allocates


def _fastest_matmul_rate(a: torch.Tensor, b: torch.Tensor, device: torch.device, min_seconds: float) -> float:
    size = a.shape[0]
    # Warm up for a third of the time: the first products of a process run slower (thread pool
    # start-up, clocks ramping).
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds / 3:
        torch.mm(a, b)
        synchronize(device)
    fastest, start = float("inf"), time.perf_counter()
    while True:
        begin = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        end = time.perf_counter()
        fastest = min(fastest, end - begin)
        if end - start >= min_seconds:
            return 2 * size**3 / fastest


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA and MPS are asynchronous), so timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
