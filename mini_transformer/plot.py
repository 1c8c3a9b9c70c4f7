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
from .errors import SettingError, UserError
from .training.metrics import read_metrics

MAX_LABELLED_TOKENS = 48  # beyond this, tick labels are unreadable; the axes stay unlabelled
MAX_LABEL_CHARS = 10  # a longer token label is cut (with an ellipsis) to fit the figure's margin


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a one-line UserError if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'mini-transformer[plot]'") from None
    return plt


def plot_run(out_dir: str | Path, time_png: Optional[str | Path] = None) -> list[Path]:
    """Write ``loss.png`` and ``lr_grad_norm.png`` into ``out_dir`` from its ``metrics.jsonl``, and
    the val loss against wall time (:func:`plot_val_loss_vs_time`) to ``time_png`` (default
    ``out_dir/val_loss_vs_time.png``) when the evaluations are timed."""
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
    timed = _timed_val_losses(records)
    if timed[0] or timed[1] or time_png is not None:
        written.append(_draw_val_loss_vs_time([(out.name, *_checked(out, timed))],
                                              Path(time_png or out / "val_loss_vs_time.png")))
    return written


def plot_val_loss_vs_time(out_dirs: Sequence[str | Path], png: str | Path) -> Path:
    """Val loss against wall time of one or more runs in one figure: which run gets lower,
    sooner. Each run's exact final val loss (the whole split) is the large marker at its end.
    The evaluation at step 0 (about ln(vocabulary size)) is left out: it would squeeze the rest."""
    runs = []
    for out_dir in out_dirs:
        out = Path(out_dir)
        if not (out / "metrics.jsonl").is_file():
            raise UserError(f"no metrics.jsonl in {str(out)!r}; pass the training.out_dir of a run")
        runs.append((out.name, *_checked(out, _timed_val_losses(read_metrics(out)))))
    return _draw_val_loss_vs_time(runs, Path(png))


Points = list[tuple[float, float]]  # (minutes, loss)


def _timed_val_losses(records: list[dict]) -> tuple[Points, Points]:
    """The timed evaluations after step 0, and the final exact val loss (at most one point)."""
    val = [(r["time_s"] / 60, r["val_loss"]) for r in records
           if r.get("val_loss") is not None and r.get("time_s") is not None and r["iter"] > 0]
    final = [(r["time_s"] / 60, r["final_val_loss"]) for r in records if r.get("final_val_loss") is not None]
    return val, final[-1:]


def _checked(out: Path, timed: tuple[Points, Points]) -> tuple[Points, Points]:
    if not (timed[0] or timed[1]):
        raise UserError(f"{out / 'metrics.jsonl'} has no timed val losses (runs trained before they were "
                        "timed have none); train the run again to plot it against wall time")
    return timed


def _draw_val_loss_vs_time(runs: list[tuple[str, Points, Points]], png: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, val, final in runs:
        line, = ax.plot(*zip(*val), "o-", label=name, linewidth=1.5, markersize=3) if val else ax.plot([], [])
        if final:
            ax.plot(*zip(*final), "D", color=line.get_color(), markersize=8,
                    label=f"{name}: exact val loss {final[0][1]:.4f}")
    ax.set_xlabel("wall time since the run started (minutes)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title("val loss against wall time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_png(fig, png)
    plt.close(fig)
    return png


def _save_png(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


# -- attention maps ---------------------------------------------------------------------------

HEADS_PER_ROW = 4  # a layer's heads in rows of four: each panel stays large enough to read


def plot_attention_file(npz_path: str | Path, out_dir: Optional[str | Path] = None, layer: Optional[int] = None,
                        head: Optional[int] = None) -> list[Path]:
    """Draw the ``.npz`` written by :func:`mini_transformer.generation.save_attention` as PNGs.

    One figure per layer, ``<name>-layer<L>.png`` next to the ``.npz`` (or in ``out_dir``),
    with that layer's heads; ``layer`` and ``head`` draw only that layer or that head
    (``<name>-layer<L>-head<H>.png``). Returns the paths written.
    """
    npz_path = Path(npz_path)
    with np.load(npz_path, allow_pickle=False) as data:
        weights, labels = data["attention"], [str(s) for s in data["labels"]]
    n_layers, n_heads = weights.shape[:2]
    layers = [_check_index("attention_layer", layer, n_layers, "layers")] if layer is not None else range(n_layers)
    heads = [_check_index("attention_head", head, n_heads, "heads per layer")] if head is not None else None
    directory = Path(out_dir) if out_dir is not None else npz_path.parent
    written = []
    for index in layers:
        suffix = f"-head{head}" if head is not None else ""
        png = directory / f"{npz_path.stem}-layer{index}{suffix}.png"
        plot_attention_layer(weights, labels, index, png, heads)
        written.append(png)
    return written


def _check_index(setting: str, value: int, count: int, what: str) -> int:
    if not 0 <= value < count:
        raise SettingError(f"{setting} {value} is out of range: the model has {count} {what} "
                           f"(0 to {count - 1}); choose one of them", setting=setting)
    return value


def plot_attention_layer(weights: np.ndarray, labels: Sequence[str], layer: int, path: str | Path,
                         heads: Optional[Sequence[int]] = None) -> None:
    """Write :func:`attention_figure` as a PNG."""
    plt = pyplot()
    fig = attention_figure(weights, labels, layer, heads)
    try:
        atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def attention_figure(weights: np.ndarray, labels: Sequence[str], layer: int, heads: Optional[Sequence[int]] = None):
    """One layer of ``weights`` (L, H, T, T): a heatmap per head (all, or ``heads``), query down,
    key across, with a colour bar for the weights. ``labels`` are the T tokens' display strings."""
    plt = pyplot()
    heads = list(range(weights.shape[1])) if heads is None else list(heads)
    T = weights.shape[-1]
    cols = min(len(heads), HEADS_PER_ROW)
    rows = -(-len(heads) // cols)
    # Inches per panel: room for T labels; one head alone gets a larger figure.
    panel = max(3.0, min(10.0, 1.0 + 0.2 * T)) if len(heads) == 1 else max(3.0, min(7.0, 1.0 + 0.12 * T))
    # Fixed margins in inches (labels are cut to MAX_LABEL_CHARS) instead of a layout engine,
    # which measures every tick label several times: seconds per figure on a busy CPU.
    gap, left, right, bottom, top = 0.7, 0.8, 1.3, 0.8, 0.8
    width, height = left + cols * panel + (cols - 1) * gap + right, bottom + rows * panel + (rows - 1) * gap + top
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(rows, cols, left=left / width, right=1 - right / width, bottom=bottom / height,
                            top=1 - top / height, wspace=gap / panel, hspace=gap / panel)
    ticks = [_printable(s) for s in labels] if T <= MAX_LABELLED_TOKENS else None
    font = max(4.5, min(9.0, 0.55 * panel * 72 / T))  # points: about half a row's height
    image = None
    for k, head in enumerate(heads):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        image = ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=9)
        if ticks is not None:
            ax.set_xticks(range(T), ticks, fontsize=font, rotation=90)
            ax.set_yticks(range(T), ticks, fontsize=font)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    bar = fig.add_axes((1 - 0.85 / width, bottom / height, 0.2 / width, 1 - (bottom + top) / height))
    fig.colorbar(image, cax=bar, label="attention weight (each row sums to 1)")
    fig.suptitle(f"layer {layer}: query (row) attends to key (column)", fontsize=11, y=1 - 0.3 / height)
    return fig


def _printable(text: str) -> str:
    """Token labels with whitespace made visible (a newline would break the axis)."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423") or "\u2205"
    return shown if len(shown) <= MAX_LABEL_CHARS else shown[:MAX_LABEL_CHARS - 1] + "\u2026"
