"""Evaluations of learned slide embeddings: slide<->report retrieval (Recall@K beside its
chance level), zero-shot diagnosis against a prompt bag's class embeddings, and a k-fold
linear probe. Metrics of probabilities come from the caller's scorer (the outputs stage
owns them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .heads import Scorer, fit_linear_full, linear_probs

__all__ = [
    "RECALL_AT",
    "class_centroids",
    "hits_at_k",
    "probe_cv",
    "recall_at_k",
    "retrieval",
    "zero_shot_probs",
]

RECALL_AT = (1, 5, 10)


def hits_at_k(sim: NDArray[np.float32], ks: Sequence[int] = RECALL_AT) -> dict[str, NDArray[np.bool_]]:
    """Row i's match is column i: per row, whether its match ranks within the top k
    (ties count against: a match tied with another column ranks below it)."""
    diag = np.diag(sim)[:, None]
    rank = (sim > diag).sum(axis=1) + (sim == diag).sum(axis=1) - 1
    return {f"R@{k}": rank < k for k in ks}


def recall_at_k(sim: NDArray[np.float32], ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """The fraction of rows whose match ranks within the top k (:func:`hits_at_k`)."""
    return {k: float(np.mean(v)) for k, v in hits_at_k(sim, ks).items()}


def retrieval(
    z: NDArray[np.float32], t: NDArray[np.float32], ks: Sequence[int] = RECALL_AT
) -> dict[str, Any]:
    """Slide->report and report->slide Recall@K of matched rows of ``z`` and ``t``, with
    chance (k/n) beside each."""
    sim = z @ t.T
    n = len(z)
    return {
        "n": n,
        "slide_to_report": recall_at_k(sim, ks),
        "report_to_slide": recall_at_k(sim.T, ks),
        "chance": {f"R@{k}": min(1.0, k / n) for k in ks},
        "hits": {"slide_to_report": hits_at_k(sim, ks), "report_to_slide": hits_at_k(sim.T, ks)},
    }


def class_centroids(emb: NDArray[np.float32], cls: NDArray[np.int32], k: int) -> NDArray[np.float32]:
    """One unit vector per class: the normalised mean of its unit prompt embeddings."""
    c = np.stack([emb[cls == i].mean(axis=0) for i in range(k)])
    return (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)


def zero_shot_probs(
    z: NDArray[np.float32], centroids: NDArray[np.float32], scale: float
) -> NDArray[np.float32]:
    """Softmax over classes of ``scale`` times the cosine of each slide to each class."""
    logits = scale * (z @ centroids.T)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def probe_cv(
    x: NDArray[np.float32],
    labels: Sequence[str],
    classes: Sequence[str],
    score: Scorer,
    *,
    folds: int = 5,
    seed: int = 0,
    groups: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Stratified (grouped) k-fold logistic regression on rows of ``x``: per-fold metrics
    and their mean; folds fall to the smallest class's count when it has fewer slides."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.array([list(classes).index(s) for s in labels], np.int64)
    g = np.array([(groups or {}).get(i, str(i)) for i in range(len(y))])
    per_class = [len(np.unique(g[y == c])) for c in np.unique(y)]
    k = int(min(folds, *per_class)) if per_class else 0
    if k < 2 or len(per_class) < 2:
        return {"skipped": "a probe needs two classes with at least two slides (patients) each"}
    split = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    per_fold = []
    for f, (tr, te) in enumerate(split.split(x, y, g)):
        coef, icpt, _ = fit_linear_full(x[tr], y[tr], len(classes), seed=seed + f)
        probs = linear_probs(coef, icpt, x[te], len(classes))
        per_fold.append(score([labels[i] for i in te], probs))
    keys = [key for key in per_fold[0] if key != "n"]
    mean = {key: _nanmean([m.get(key) for m in per_fold]) for key in keys}
    return {"folds": k, "per_fold": per_fold, "mean": mean}


def _nanmean(v: Sequence[Any]) -> float | None:
    xs = [float(x) for x in v if x is not None]
    return float(np.mean(xs)) if xs else None
