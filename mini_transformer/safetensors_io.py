"""safetensors files: written atomically, read memory-mapped, one clear error for a bad file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write_named
from .errors import UserError, first_line


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                      metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``tensors`` (contiguous, CPU, no two sharing memory) to ``path`` atomically.

    safetensors writes the file straight from the tensors' memory. Serializing to ``bytes``
    first would hold two more copies of the weights: a 1.1B-parameter fp32 import peaked at
    13.2 GB that way, against 4.9 GB (BENCHMARKS.md).
    """
    atomic_write_named(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """The tensors in ``path``; a UserError naming ``what`` is wrong and the ``fix`` otherwise.

    The file is memory-mapped (privately: writing to a tensor never changes the file), so the
    tensors cost no memory until they are read, and loading never holds the file's bytes and
    the tensors at once. safetensors checks the header against the file size on opening, so a
    truncated or foreign file fails here, not at first use.
    """
    if not path.is_file():
        raise UserError(f"{what} {path} is missing; {fix}")
    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError) as exc:
        first = first_line(exc)
        raise UserError(f"{what} {path} are corrupt ({first}); {fix}") from None
