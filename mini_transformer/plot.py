"""Training curves as PNG: loss (train and val), learning rate and gradient norm."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write
from .errors import UserError


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
    from .training.metrics import read_metrics

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
