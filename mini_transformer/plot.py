"""Plots as PNG: a run's training curves (loss, learning rate, gradient norm) and attention maps.

matplotlib is an optional extra (``plot``); it is imported on first use, with the file-only Agg
backend so plots work on servers without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from .atomic import atomic_write
from .errors import UserError
from .training.metrics import read_metrics

MAX_LABELLED_TOKENS = 48  # beyond this, tick labels are unreadable; the axes stay unlabelled


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a one-line UserError if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'mini-transformer[plot]'") from None
    return plt


def plot_run(out_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` and ``lr_grad_norm.png`` into ``out_dir`` from its ``metrics.jsonl``."""
    out = Path(out_dir)
    if not (out / "metrics.jsonl").is_file():
        raise UserError(f"no metrics.jsonl in {str(out)!r}; pass the training.out_dir of a run")
    plt = pyplot()
    records = read_metrics(out)
    train = [(r["iter"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["iter"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        raise UserError(f"{out / 'metrics.jsonl'} holds no losses yet; train for at least log_interval steps")

    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"loss: {out.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_png(fig, out / "loss.png")
    plt.close(fig)
    written.append(out / "loss.png")

    lr = [(r["iter"], r["lr"]) for r in records if r.get("train_loss") is not None and r.get("lr") is not None]
    norm = [(r["iter"], r["grad_norm"]) for r in records if r.get("grad_norm") is not None]
    if lr or norm:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        if lr:
            ax1.plot(*zip(*lr), color="tab:green")
        ax1.set_ylabel("learning rate")
        ax1.grid(alpha=0.3)
        if norm:
            ax2.plot(*zip(*norm), color="tab:red", linewidth=1)
        ax2.set_ylabel("grad norm (before clipping)")
        ax2.set_xlabel("iteration")
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        _save_png(fig, out / "lr_grad_norm.png")
        plt.close(fig)
        written.append(out / "lr_grad_norm.png")
    return written


def _save_png(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


# -- attention maps ---------------------------------------------------------------------------

def plot_attention_file(npz_path: str | Path, png_path: Optional[str | Path] = None) -> Path:
    """Draw the ``.npz`` written by :func:`mini_transformer.generation.save_attention` as a PNG grid.

    The PNG goes next to the ``.npz`` (same name) unless ``png_path`` says otherwise; returns its path.
    """
    npz_path = Path(npz_path)
    with np.load(npz_path, allow_pickle=False) as data:
        weights, labels = data["attention"], [str(s) for s in data["labels"]]
    png = Path(png_path) if png_path is not None else npz_path.with_suffix(".png")
    plot_attention(weights, labels, png)
    return png


def plot_attention(weights: np.ndarray, labels: Sequence[str], path: str | Path) -> None:
    """A grid of heatmaps of ``weights`` (L, H, T, T): one row per layer, one column per head;
    query down, key across. ``labels`` are the T tokens' display strings."""
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
