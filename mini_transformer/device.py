"""Device and precision choices: what ``device: auto`` and ``dtype: auto`` mean on this machine."""

from __future__ import annotations

import contextlib

import torch

from .errors import SettingError, UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    # torch knows more device types (meta, xla, ...) than the project runs on.
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not _mps_available():
        raise SettingError(f"device {spec!r} requested but MPS (Apple's GPU) is not available; use the cpu device",
                           setting="device", fixes=[{"device": "cpu"}])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"device {spec!r} requested but CUDA is not available; use the cpu device",
                           setting="device", fixes=[{"device": "cpu"}])
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SettingError(f"device {spec!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                           "device(s); use cuda (the first) or cuda:N with N below that", setting="device")
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def allow_tf32_on_cuda(device: torch.device) -> tuple[bool, bool]:
    """On a CUDA device, let fp32 matmuls and convolutions use TF32 tensor cores.

    What nanoGPT and litgpt do: fp32 weights and activations keep their range, the products
    run several times faster on Ampere and later GPUs, and training curves do not change in
    practice. Left alone on CPU, and by ``bench``, whose fp32 rows time strict fp32 for both
    models. Returns the previous settings, for :func:`restore_tf32`.
    """
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return previous


def restore_tf32(previous: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices in hardware (AMX or AVX-512 BF16)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return "AMX" in capability or "AVX512_BF16" in capability or bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cpuinfo_field(name: str) -> str:
    """The first ``name: value`` line of /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (``avx512_bf16``, ``amx_bf16``, ...); empty elsewhere."""
    return set(cpuinfo_field("flags").split())


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the hardware runs it fast (recent CUDA GPUs, AMX CPUs), else fp32."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    dtype = DTYPES[spec]
    if dtype is torch.float16 and device.type == "cpu":
        raise UserError("dtype fp16 needs a CUDA device; on CPU use bf16 (fast with AMX) or fp32")
    return dtype


def inference_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """The weights' dtype for generation; None keeps the checkpoint's.

    ``auto``: bf16 (fp16 before Ampere) on CUDA, where decoding is bound by reading the weights
    and half the bytes is nearly twice the speed for large models. On CPU the checkpoint's fp32
    stays: PyTorch's one-row bf16 products run slower than fp32 ones there (BENCHMARKS.md).
    """
    if spec == "auto":
        return resolve_dtype("auto", device) if device.type == "cuda" else None
    return resolve_dtype(spec, device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in fp32. Weights stay fp32."""
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
