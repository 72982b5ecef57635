"""Evaluation: classification metrics (against a label sheet) and segmentation Dice/IoU."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn import metrics as skm

from .._atomic import atomic_file
from .._json import finite_json

__all__ = ["HEADLINE", "classification_metrics", "dice_iou", "write_json"]

#: the cohort metrics every metrics file and the report give, in this order
HEADLINE = (
    "accuracy",
    "balanced_accuracy",
    "kappa",
    "macro_f1",
    "weighted_f1",
    "auc_macro_ovr",
    "auc_macro_ovo",
)


def _auc(pos: NDArray[np.bool_], score: NDArray[np.float64]) -> float | None:
    return float(skm.roc_auc_score(pos, score)) if 0 < pos.sum() < len(pos) else None


def _auc_ovo(
    yt: NDArray[np.str_], probs: NDArray[np.float64], classes: list[str], present: list[str]
) -> float | None:
    """Hand & Till's one-vs-one macro AUC over pairs of classes present in the labels:
    per pair, the mean of AUC(a vs b by p_a) and AUC(b vs a by p_b)."""
    pairs = []
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            m = (yt == a) | (yt == b)
            ka, kb = classes.index(a), classes.index(b)
            ab, ba = _auc(yt[m] == a, probs[m, ka]), _auc(yt[m] == b, probs[m, kb])
            if ab is not None and ba is not None:
                pairs.append((ab + ba) / 2)
    return float(np.mean(pairs)) if pairs else None


def _kappa(yt: NDArray[np.str_], yp: NDArray[np.str_], labels: list[str]) -> float | None:
    """Cohen's kappa (agreement beyond chance); undefined when chance agreement is total
    (a single class everywhere)."""
    cm = skm.confusion_matrix(yt, yp, labels=labels).astype(np.float64)
    n = cm.sum()
    expected = float((cm.sum(axis=0) * cm.sum(axis=1)).sum() / n**2)
    return None if expected >= 1.0 else float((np.trace(cm) / n - expected) / (1.0 - expected))


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], probs: NDArray[np.float64], classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, Cohen's kappa, macro and weighted F1, per-class P/R/F1,
    one-vs-rest and one-vs-one macro AUC, and the confusion matrix (CONCH's metric set).

    ``probs`` is [n, K] in the order of ``classes``. Every averaged metric runs over the
    classes present in ``y_true`` (listed as ``classes_present``; the others as
    ``classes_absent``), so a bag class nobody has neither drags F1 down nor is skipped
    by one metric and counted by another. A prediction that is not a class (a slide
    without tiles) counts as wrong in accuracy, balanced accuracy and F1, and gets its own
    confusion-matrix column; a row of ``probs`` that is not finite (that slide has no
    probabilities) is left out of the AUCs, which rank probabilities: ``n_auc`` says how
    many slides they saw.
    """
    classes = list(classes)
    yt, yp = np.asarray(list(y_true), dtype=str), np.asarray(list(y_pred), dtype=str)
    present = [c for c in classes if c in set(yt.tolist())]
    absent = [c for c in classes if c not in present]
    extra = sorted(set(yp.tolist()) - set(classes))
    base: dict[str, Any] = {
        "n": len(yt),
        "classes_present": present,
        "classes_absent": absent,
        "confusion_matrix": {
            "labels": classes + extra,
            "matrix": skm.confusion_matrix(yt, yp, labels=classes + extra).tolist() if len(yt) else [],
        },
    }
    if len(yt) == 0:
        return base | dict.fromkeys(HEADLINE) | {"per_class": {}, "note": "no labelled slide was scored"}
    p, r, f, s = skm.precision_recall_fscore_support(yt, yp, labels=classes, zero_division=0)
    probs = np.asarray(probs, np.float64).reshape(len(yt), len(classes))
    scored = np.isfinite(probs).all(axis=1)
    ys, ps = yt[scored], probs[scored]
    ranked = [c for c in present if c in set(ys.tolist())]
    aucs = {c: _auc(ys == c, ps[:, k]) if c in ranked else None for k, c in enumerate(classes)}
    valid = [v for v in aucs.values() if v is not None]
    return base | {
        "accuracy": float(np.mean(yt == yp)),
        "balanced_accuracy": float(np.mean([r[classes.index(c)] for c in present])),
        "kappa": _kappa(yt, yp, classes + extra),
        "macro_f1": float(skm.f1_score(yt, yp, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(yt, yp, labels=present, average="weighted", zero_division=0)),
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
        "auc_macro_ovo": _auc_ovo(ys, ps, classes, ranked),
        "n_auc": int(scored.sum()),
    }


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
    """Write ``obj`` as JSON; never a NaN (see :func:`finite_json`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(
            json.dumps(finite_json(obj), indent=2, allow_nan=False, ensure_ascii=False), encoding="utf-8"
        )
    return Path(path)
