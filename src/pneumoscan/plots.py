"""Training-history and calibration figures (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .atomic import atomic_path

# Figures are built with matplotlib's object API (Figure, no pyplot): nothing global such as the
# backend of an application that embeds pneumoscan is changed, and no GUI is ever needed.


def new_figure(figsize: tuple[float, float], ncols: int = 1):
    """A detached figure and its axes (one, or ``ncols`` side by side)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def save_png(fig: Figure, path: Path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def plot_history(history: list[dict], path: Path) -> None:
    """Loss, accuracy, sensitivity/specificity, AUROC and learning rate per epoch in one PNG."""
    ep = [h["epoch"] for h in history]
    fig, axes = new_figure((22, 4), 5)
    panels = [
        ("Loss", [("train", "train_loss"), ("validation", "val_loss")]),
        ("Accuracy", [("train", "train_accuracy"), ("validation", "val_accuracy")]),
        ("Validation sensitivity / specificity", [("sensitivity", "val_sensitivity"),
                                                  ("specificity", "val_specificity")]),
        ("Validation AUROC", [("AUROC", "val_auroc")]),
        ("Learning rate", [("lr", "lr")]),
    ]
    for ax, (title, series) in zip(axes, panels):
        for label, key in series:
            ax.plot(ep, [h[key] for h in history], marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    axes[-1].set_yscale("log")
    fig.tight_layout()
    save_png(fig, path)


def plot_reliability(series: dict[str, list[dict]], path: Path, title: str = "") -> None:
    """Reliability diagram: accuracy against confidence per bin, one line per named set of bins."""
    fig, ax = new_figure((5.5, 5))
    ax.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect calibration")
    for name, bins in series.items():
        used = [b for b in bins if b["count"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "o-", ms=4, label=name)
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("confidence of the predicted class (15 bins)")
    ax.set_ylabel("observed accuracy")
    ax.set_title(f"Reliability diagram {title}".strip())
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
