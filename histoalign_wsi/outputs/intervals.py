"""Seeded bootstrap 95 % intervals for every classification metric, overall and per
group (site), resampling patients when a patient key exists, else slides.

The resampling scheme (documented so that anyone can recompute an interval):
``rng = numpy.random.default_rng(seed)``; the units (patients, else slides) are sorted;
each of the ``resamples`` draws takes ``rng.integers(0, G, G)`` units with replacement
and every row (slide) of each drawn unit, in draw order; the interval is the 2.5th and
97.5th percentile (numpy's linear rule) of the metric over the draws where it is defined
(an AUC needs both classes; ``n_defined`` counts those draws). The metrics are computed
here from the confusion counts and ranks, the same definitions as
:func:`histoalign_wsi.outputs.metrics.classification_metrics` (tested against it and
against scikit-learn), so 1,000 resamples cost milliseconds per metric.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "METRICS",
    "Bootstrap",
    "draws",
    "fast_metrics",
    "format_ci",
    "group_table",
    "proportion_ci",
    "units_of",
    "with_intervals",
]

#: the metrics that carry an interval
METRICS = ("accuracy", "balanced_accuracy", "kappa", "macro_f1", "weighted_f1", "auc_macro_ovr")
#: what a group (site) with one class present gets
ONE_CLASS = ("accuracy",)


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: ``resamples`` (0: no intervals), ``seed``, ``level``."""

    resamples: int = 1000
    seed: int = 0
    level: float = 0.95

    def describe(self, unit: str, n_units: int) -> dict[str, Any]:
        return {
            "method": "percentile bootstrap",
            "level": self.level,
            "resamples": self.resamples,
            "seed": self.seed,
            "unit": unit,
            "n_units": n_units,
        }


def draws(groups: Sequence[str], resamples: int, seed: int) -> Iterator[NDArray[np.intp]]:
    """Row indices of each resample: ``G`` units drawn with replacement (see the module)."""
    uniq, inv = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    order = np.argsort(inv, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inv, minlength=len(uniq)))[:-1])
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        pick = rng.integers(0, len(uniq), len(uniq))
        yield np.concatenate([members[g] for g in pick])


def _auc(pos: NDArray[np.bool_], score: NDArray[np.float64]) -> float | None:
    n1 = int(pos.sum())
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        return None
    from scipy.stats import rankdata  # lazily: the CLI's start-up stays light

    ranks = rankdata(score)  # average ranks for ties: the Mann-Whitney form of the AUC
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fast_metrics(
    y: NDArray[np.intp], p: NDArray[np.intp], probs: NDArray[np.float64], k: int
) -> dict[str, Any]:
    """The :data:`METRICS` of integer labels ``y`` (0..k-1), predictions ``p`` (-1: not a
    class, counted wrong) and probabilities [n, k] (a row with a NaN: out of the AUC)."""
    n = len(y)
    if n == 0:
        return dict.fromkeys(METRICS)
    pc = np.where(p < 0, k, p)
    cm = np.bincount(y * (k + 1) + pc, minlength=k * (k + 1)).reshape(k, k + 1).astype(np.float64)
    rows, cols = cm.sum(axis=1), cm.sum(axis=0)
    present = rows > 0
    tp = np.diag(cm[:, :k])
    recall = np.divide(tp, rows, out=np.zeros(k), where=rows > 0)
    precision = np.divide(tp, cols[:k], out=np.zeros(k), where=cols[:k] > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    expected = float((rows * cols[:k]).sum() / n**2)
    scored = np.isfinite(probs).all(axis=1)
    ys, ps = y[scored], probs[scored]
    aucs = [a for c in np.unique(ys) if (a := _auc(ys == c, ps[:, c])) is not None]
    return {
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(recall[present].mean()),
        "kappa": None if expected >= 1.0 else float((tp.sum() / n - expected) / (1.0 - expected)),
        "macro_f1": float(f1[present].mean()),
        "weighted_f1": float((f1 * rows).sum() / rows.sum()),
        "auc_macro_ovr": float(np.mean(aucs)) if aucs else None,
    }


def _encode(
    y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in y_true], np.intp)
    p = np.array([index.get(c, -1) for c in y_pred], np.intp)
    return y, p


def with_intervals(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    probs: NDArray[np.float64],
    classes: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    boot: Bootstrap = Bootstrap(),
    metrics: Sequence[str] = METRICS,
) -> dict[str, Any]:
    """Each metric's value and its bootstrap interval: ``{metric: value, "ci": {metric:
    [low, high]}, "n_defined": {metric: draws}}``; ``groups`` (a patient per row) are the
    resampled units, else the rows themselves."""
    y, p = _encode(y_true, y_pred, classes)
    pr = np.asarray(probs, np.float64).reshape(len(y), len(classes))
    point = fast_metrics(y, p, pr, len(classes))
    out: dict[str, Any] = {m: point[m] for m in metrics}
    if boot.resamples <= 0 or len(y) == 0:
        return out | {"ci": dict.fromkeys(metrics), "n_defined": dict.fromkeys(metrics, 0)}
    units = list(groups) if groups is not None else [str(i) for i in range(len(y))]
    values: dict[str, list[float]] = {m: [] for m in metrics}
    for idx in draws(units, boot.resamples, boot.seed):
        m_b = fast_metrics(y[idx], p[idx], pr[idx], len(classes))
        for m in metrics:
            if m_b[m] is not None:
                values[m].append(m_b[m])
    tail = 100 * (1 - boot.level) / 2
    ci = {
        m: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] if v else None
        for m, v in values.items()
    }
    return out | {"ci": ci, "n_defined": {m: len(v) for m, v in values.items()}}


def group_table(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    probs: NDArray[np.float64],
    classes: Sequence[str],
    by: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    boot: Bootstrap = Bootstrap(),
    metrics: Sequence[str] = ("balanced_accuracy", "macro_f1", "auc_macro_ovr"),
) -> dict[str, Any]:
    """One row per value of ``by`` (a site per slide): slides, the metrics with intervals.
    A group with one class present gets accuracy only, and says why."""
    keys = np.asarray(by, dtype=str)
    pr = np.asarray(probs, np.float64).reshape(len(keys), len(classes))
    out: dict[str, Any] = {}
    for site in sorted(set(keys.tolist())):
        rows = np.flatnonzero(keys == site).tolist()
        yt = [y_true[i] for i in rows]
        present = sorted(set(yt), key=list(classes).index)
        one = len(present) < 2
        res = with_intervals(
            yt,
            [y_pred[i] for i in rows],
            pr[rows],
            classes,
            groups=[groups[i] for i in rows] if groups is not None else None,
            boot=boot,
            metrics=ONE_CLASS if one else ("accuracy", *metrics),
        )
        res["n"] = len(rows)
        res["classes_present"] = present
        if one:
            res["note"] = (
                f"one class at this site ({present[0]!r}): balanced accuracy, macro F1 and AUC "
                "need two; accuracy only"
            )
        out[site] = res
    return out


def proportion_ci(
    hits: Sequence[bool], *, groups: Sequence[str] | None = None, boot: Bootstrap = Bootstrap()
) -> list[float] | None:
    """The bootstrap interval of a proportion (a Recall@K: the share of rows that hit),
    by the same draws as every other interval."""
    h = np.asarray(hits, np.float64)
    if boot.resamples <= 0 or not len(h):
        return None
    units = list(groups) if groups is not None else [str(i) for i in range(len(h))]
    vals = [float(h[idx].mean()) for idx in draws(units, boot.resamples, boot.seed)]
    tail = 100 * (1 - boot.level) / 2
    return [float(np.percentile(vals, tail)), float(np.percentile(vals, 100 - tail))]


def format_ci(value: float | None, ci: Sequence[float] | None) -> str:
    """``0.812 [0.731, 0.880]`` (or ``n/a``)."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def units_of(ids: Sequence[str], patients: Mapping[str, str] | None) -> tuple[list[str], str]:
    """The resampled unit of each slide (its patient, else itself) and its name."""
    if patients:
        return [patients.get(s, s) for s in ids], "patient"
    return list(ids), "slide"
