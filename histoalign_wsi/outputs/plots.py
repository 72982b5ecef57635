"""Figures of the evaluation: the confusion matrix and the few-shot curves (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_file

__all__ = ["plot_confusion", "plot_curves"]


def plot_confusion(cm: dict[str, Any], out_png: str | Path, *, title: str = "Confusion matrix") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, mat = cm["labels"], np.asarray(cm["matrix"])
    size = 1.2 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(mat, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(
                j,
                i,
                str(mat[i, j]),
                ha="center",
                va="center",
                color="white" if mat[i, j] > mat.max() / 2 else "black",
            )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_curves(
    curves: dict[str, list[dict[str, Any]]], out_png: str | Path, *, title: str = "few-shot"
) -> Path:
    """One panel per metric: mean against shots, one line per method, a band of one sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), squeeze=False)
    for ax, (metric, rows) in zip(axes[0], curves.items(), strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["shots"])
            k = np.array([r["shots"] for r in pts])
            m, sd = np.array([r["mean"] for r in pts]), np.array([r["sd"] for r in pts])
            (line,) = ax.plot(k, m, marker="o", label=method)
            ax.fill_between(k, m - sd, m + sd, color=line.get_color(), alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled patches per class (k)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(out_png)
