"""Attention maps: every layer's and head's weights for a token sequence, saved as ``.npz``.

Drawing them is the plotting module's job (:func:`mini_transformer.plot.plot_attention_file`
turns the ``.npz`` into a PNG grid); generation itself never imports matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..atomic import atomic_write, make_dirs
from ..errors import UserError
from ..model import Transformer
from .engine import check_inference_mode


def attention_weights(model: Transformer, token_ids: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Weights (n_layers, n_heads, T, T) for the last ``block_size`` tokens, and those tokens."""
    ids = list(token_ids)[-model.config.block_size:]
    if not ids:
        raise UserError("no tokens to visualise; generate or pass at least one token")
    check_inference_mode(model)  # the model's mode is the caller's; active dropout is refused
    idx = torch.tensor([ids], device=model.device)  # (1, T)
    maps = model.attention_maps(idx)  # n_layers x (1, H, T, T)
    return torch.stack([m[0] for m in maps]).float().cpu().numpy(), ids


def save_attention(
    model: Transformer,
    token_ids: Sequence[int],
    out_dir: str | Path,
    labels: Optional[Sequence[str]] = None,
    name: str = "attention",
) -> Path:
    """Write ``<name>.npz`` into ``out_dir`` and return its path.

    It holds ``attention`` (L, H, T, T) float32, ``tokens`` (T,) int64 and ``labels`` (T,) str:
    the display strings of the tokens (``labels``, e.g. each id decoded alone, of which the last
    ``T`` are used; the ids as text when None).
    """
    weights, ids = attention_weights(model, token_ids)
    out = make_dirs(out_dir)
    npz_path = out / f"{name}.npz"
    shown = [str(t) for t in ids] if labels is None else [str(s) for s in list(labels)[-len(ids):]]
    atomic_write(npz_path, lambda f: np.savez_compressed(
        f, attention=weights, tokens=np.array(ids, dtype=np.int64), labels=np.array(shown)))
    return npz_path
