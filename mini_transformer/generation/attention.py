"""Attention visualisation: every layer's and head's weights to ``.npz``, and a PNG grid of heatmaps.

The PNG needs matplotlib (the optional extra ``plot``); it is imported only here, lazily, with the
non-interactive Agg backend so it works on servers without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import UserError
from ..model import Transformer
from ..plot import pyplot

MAX_LABELLED_TOKENS = 48  # beyond this, tick labels are unreadable; the axes stay unlabelled


def attention_weights(model: Transformer, token_ids: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Weights (n_layers, n_heads, T, T) for the last ``block_size`` tokens, and those tokens."""
    ids = list(token_ids)[-model.config.block_size:]
    if not ids:
        raise UserError("no tokens to visualise; generate or pass at least one token")
    idx = torch.tensor([ids], device=model.tok_emb.weight.device)  # (1, T)
    was_training = model.training
    model.eval()
    try:
        maps = model.attention_maps(idx)  # n_layers x (1, H, T, T)
    finally:
        model.train(was_training)
    return torch.stack([m[0] for m in maps]).float().cpu().numpy(), ids


def save_attention(
    model: Transformer,
    token_ids: Sequence[int],
    out_dir: str | Path,
    labels: Optional[Sequence[str]] = None,
    name: str = "attention",
    plot: bool = True,
) -> tuple[Path, Optional[Path]]:
    """Write ``<name>.npz`` (``attention``: (L, H, T, T), ``tokens``: (T,)) and ``<name>.png``.

    ``labels`` are the display strings of the tokens (e.g. each id decoded alone); the last
    ``T`` are used. Returns the two paths (the PNG's is None when ``plot`` is False).
    """
    weights, ids = attention_weights(model, token_ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz_path = out / f"{name}.npz"
    shown = [str(t) for t in ids] if labels is None else [str(s) for s in list(labels)[-len(ids):]]
    atomic_write(npz_path, lambda f: np.savez_compressed(
        f, attention=weights, tokens=np.array(ids, dtype=np.int64), labels=np.array(shown)))
    png_path = None
    if plot:
        png_path = out / f"{name}.png"
        plot_attention(weights, shown, png_path)
    return npz_path, png_path


def plot_attention(weights: np.ndarray, labels: Sequence[str], path: str | Path) -> None:
    """A grid of heatmaps: one row per layer, one column per head; query down, key across."""
    plt = pyplot()
    n_layers, n_heads, T, _ = weights.shape
    size = max(1.6, min(4.0, 0.12 * T))
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(size * n_heads, size * n_layers), squeeze=False)
    ticks = [_printable(s) for s in labels] if T <= MAX_LABELLED_TOKENS else None
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=7)
            if ticks is not None:
                ax.set_xticks(range(T), ticks, fontsize=5, rotation=90)
                ax.set_yticks(range(T), ticks, fontsize=5)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.supxlabel("key (attended to)", fontsize=8)
    fig.supylabel("query (attending)", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def _printable(text: str) -> str:
    """Token labels with whitespace made visible (a newline would break the axis)."""
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423") or "\u2205"
