"""Evaluation: classification metrics (against a label sheet) and segmentation Dice/IoU."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn import metrics as skm

from ._atomic import atomic_file

__all__ = ["classification_metrics", "dice_iou", "plot_confusion"]


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], probs: NDArray[np.float64], classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class P/R/F1, one-vs-rest AUC, confusion.

    ``probs`` is [n, K] in the order of ``classes``. AUC is computed per class where the
    class has both positives and negatives; ``auc_macro`` averages those.
    """
    classes = list(classes)
    yt, yp = list(y_true), list(y_pred)
    p, r, f, s = skm.precision_recall_fscore_support(yt, yp, labels=classes, zero_division=0)
    aucs: dict[str, float | None] = {}
    for k, c in enumerate(classes):
        pos = np.array([t == c for t in yt])
        aucs[c] = float(skm.roc_auc_score(pos, probs[:, k])) if 0 < pos.sum() < len(pos) else None
    valid = [v for v in aucs.values() if v is not None]
    return {
        "n": len(yt),
        "accuracy": float(skm.accuracy_score(yt, yp)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(yt, yp)) if yt else 0.0,
        "macro_f1": float(skm.f1_score(yt, yp, labels=classes, average="macro", zero_division=0)),
        "per_class": {
            c: {
                "precision": float(p[k]),
                "recall": float(r[k]),
                "f1": float(f[k]),
                "support": int(s[k]),
                "auc_ovr": aucs[c],
            }
            for k, c in enumerate(classes)
        },
        "auc_macro_ovr": float(np.mean(valid)) if valid else None,
        "confusion_matrix": {
            "labels": classes,
            "matrix": skm.confusion_matrix(yt, yp, labels=classes).tolist(),
        },
    }


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


def dice_iou(pred: NDArray[np.bool_], truth: NDArray[np.bool_]) -> dict[str, float]:
    """Dice and IoU of two boolean masks of the same shape (1.0 when both are empty)."""
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    inter = float(np.logical_and(pred, truth).sum())
    a, b = float(pred.sum()), float(truth.sum())
    union = a + b - inter
    if a + b == 0:
        return {"dice": 1.0, "iou": 1.0}
    return {"dice": 2 * inter / (a + b), "iou": inter / union}


def write_json(obj: Any, path: str | Path) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))
    return Path(path)
