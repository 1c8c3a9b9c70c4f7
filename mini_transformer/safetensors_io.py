"""Reading safetensors files with one clear error for a missing or corrupt file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from .errors import UserError


def read_safetensors(path: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """The tensors in ``path``; a UserError naming ``what`` is wrong and the ``fix`` otherwise."""
    if not path.is_file():
        raise UserError(f"{what} {path} is missing; {fix}")
    try:
        return load_safetensors_bytes(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise UserError(f"{what} {path} are corrupt ({str(exc).splitlines()[0]}); {fix}") from None
