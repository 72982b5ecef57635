"""Patch-level few-shot curves: for k labelled patches per class (seeded draws), zero-shot,
a linear probe and Tip-Adapter are scored on the same held-out patches (every patch not
drawn, or, when patches carry a patient key, every patch of a patient not drawn), as in
the CLIP/PLIP/CONCH evaluations.

Tip-Adapter (Zhang et al., ECCV 2022) is training-free: the zero-shot logits plus
``alpha * exp(-beta * (1 - f . F_train)) @ onehot(y_train)``, an affinity-weighted vote of
the k-shot cache. alpha = 1 and beta = 5.5 are the official code's starting values
(``init_alpha``, ``init_beta`` in its configs); its published runs then search both on a
validation split (``search_hp``: beta over 200 steps of (0.1, 7], alpha over 20 of
(0.1, 3]). Here the defaults are used as they are; ``tip_search=True`` runs that same
grid on a held-out half of the shots (each class's shots split in two: one half is the
cache, the other the validation set), then builds the cache from every shot with the
values found. It needs two shots per class; with one, the defaults are used and the row
says so. The test patches never take part in either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError
from .heads import fit_linear_full, linear_probs

__all__ = [
    "METHODS",
    "TIP_ALPHA",
    "TIP_BETA",
    "FewShotData",
    "draw",
    "few_shot_curves",
    "summarize_curves",
    "tip_search",
]

METHODS = ("zero-shot", "linear probe", "Tip-Adapter")
TIP_ALPHA = 1.0
TIP_BETA = 5.5

Scorer = Callable[[Sequence[str], NDArray[np.float32]], Mapping[str, Any]]


@dataclass(frozen=True)
class FewShotData:
    """Patches: features [n, D] (L2-normalised), labels [n] (class index), zero-shot
    logits [n, K], and the class names."""

    features: NDArray[np.float32]
    labels: NDArray[np.int64]
    zero_shot_logits: NDArray[np.float32]
    classes: tuple[str, ...]

    @classmethod
    def from_encoders(
        cls,
        feats: Mapping[str, NDArray[np.float32]],
        labels: Sequence[str],
        zs: NDArray[np.float32],
        classes: Sequence[str],
    ) -> FewShotData:
        """Encoders' features side by side, renormalised (each encoder weighs the same)."""
        x = np.concatenate([feats[n] for n in sorted(feats)], axis=1).astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        y = np.array([list(classes).index(c) for c in labels], np.int64)
        return cls(x, y, zs.astype(np.float32), tuple(classes))


def draw(
    labels: NDArray[np.int64],
    k: int,
    seed: int,
    classes: Sequence[str],
    groups: Sequence[str] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train, test) indices: k per class drawn with ``seed``; test is every patch not
    drawn. With ``groups`` (a patient per patch) the k shots of a class come from whole
    patients drawn at random, and test is every patch of the patients not drawn: the
    other patches of a drawn patient are in neither set.

    Raises
    ------
    ConfigError
        A class has k or fewer patches (none would be left to test on), or, by group,
        too few patients to draw k shots and leave one to test on.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        train = []
        for c in range(len(classes)):
            idx = np.flatnonzero(labels == c)
            if len(idx) == 0:
                continue
            if k >= len(idx):
                raise ConfigError(
                    f"{k}-shot needs more than {k} patches of class {classes[c]!r}, which has {len(idx)}"
                )
            train.append(rng.choice(idx, size=k, replace=False))
        tr = np.sort(np.concatenate(train))
        te = np.setdiff1d(np.arange(len(labels)), tr)
        assert not np.intersect1d(tr, te).size  # never trained and tested on the same patch
        return tr, te
    g = np.asarray(groups)
    drawn_groups: set[str] = set()
    picked: list[int] = []
    for c in range(len(classes)):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        need = k
        for grp in rng.permutation(np.unique(g[idx])).tolist():
            if need == 0:
                break
            own = rng.permutation(idx[g[idx] == grp])[:need]
            picked += own.tolist()
            need -= len(own)
            drawn_groups.add(grp)
        left = idx[~np.isin(g[idx], list(drawn_groups))]
        if need > 0 or len(left) == 0:
            raise ConfigError(
                f"{k}-shot by patient needs more patches of class {classes[c]!r} than its "
                f"{len(np.unique(g[idx]))} patients give while leaving one patient to test on"
            )
    tr = np.sort(np.asarray(picked, np.int64))
    te = np.flatnonzero(~np.isin(g, list(drawn_groups))).astype(np.int64)
    assert not set(g[tr]) & set(g[te])  # never trained and tested on one patient
    return tr, te


def _softmax(z: NDArray[np.floating]) -> NDArray[np.float32]:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def tip_adapter(
    data: FewShotData,
    tr: NDArray[np.int64],
    te: NDArray[np.int64],
    *,
    alpha: float = TIP_ALPHA,
    beta: float = TIP_BETA,
) -> NDArray[np.float32]:
    """Tip-Adapter probabilities of the test patches."""
    k = len(data.classes)
    onehot = np.eye(k, dtype=np.float32)[data.labels[tr]]
    affinity = np.exp(-beta * (1.0 - data.features[te] @ data.features[tr].T))
    return _softmax(data.zero_shot_logits[te] + alpha * affinity @ onehot)


#: the official search grid (``search_scale: [7, 3]``, ``search_step: [200, 20]``)
TIP_BETAS = tuple(i * (7 - 0.1) / 200 + 0.1 for i in range(200))
TIP_ALPHAS = tuple(i * (3 - 0.1) / 20 + 0.1 for i in range(20))


def tip_search(data: FewShotData, tr: NDArray[np.int64], *, seed: int) -> tuple[float, float] | None:
    """(alpha, beta) with the best accuracy on a held-out half of the shots ``tr`` (the
    cache holds the other half), or None when a class has fewer than two shots. Only the
    shots are read: the test patches take no part."""
    rng = np.random.default_rng(seed)
    cache: list[int] = []
    val: list[int] = []
    for k in range(len(data.classes)):
        own = rng.permutation(tr[data.labels[tr] == k])
        if len(own) < 2:
            return None
        half = len(own) // 2
        cache += own[:half].tolist()
        val += own[half:].tolist()
    c, v = np.array(sorted(cache), np.int64), np.array(sorted(val), np.int64)
    onehot = np.eye(len(data.classes), dtype=np.float32)[data.labels[c]]
    sims = data.features[v] @ data.features[c].T
    zs, y = data.zero_shot_logits[v], data.labels[v]
    best, found = -1.0, (TIP_ALPHA, TIP_BETA)
    for beta in TIP_BETAS:
        vote = np.exp(-beta * (1.0 - sims)) @ onehot
        for alpha in TIP_ALPHAS:
            acc = float(((zs + alpha * vote).argmax(axis=1) == y).mean())
            if acc > best:  # the first best in the grid's order: deterministic
                best, found = acc, (alpha, beta)
    return found


def few_shot_curves(
    data: FewShotData,
    *,
    shots: Sequence[int],
    repeats: int,
    seed: int,
    score: Scorer,
    groups: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    search: bool = False,
    sites: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (k, repeat, method) with ``score(test labels, probabilities)``; draws
    and tests by ``groups`` (a patient per patch) when given. ``progress(1)`` is called
    after every draw. ``search`` adds a row "Tip-Adapter (searched)" per draw, its alpha
    and beta found on the shots alone (:func:`tip_search`). With ``sites`` (a site per
    patch: ``cv: site``) each site is held out in turn: the shots come from the other
    sites only, and the test is every patch of the held-out site."""
    rows: list[dict[str, Any]] = []
    names = np.array(data.classes)
    for k, r, held, (tr, te) in _splits(data, shots, repeats, seed, groups, sites):
        y_true = names[data.labels[te]].tolist()
        k_cls = len(data.classes)
        coef, intercept, c = fit_linear_full(data.features[tr], data.labels[tr], k_cls, seed=seed + r)
        results = {
            "zero-shot": _softmax(data.zero_shot_logits[te]),
            "linear probe": linear_probs(coef, intercept, data.features[te], k_cls),
            "Tip-Adapter": tip_adapter(data, tr, te),
        }
        extra: dict[str, dict[str, Any]] = {"linear probe": {"C": c}}
        if search:
            hp = tip_search(data, tr, seed=seed + r)
            alpha, beta = hp or (TIP_ALPHA, TIP_BETA)
            results["Tip-Adapter (searched)"] = tip_adapter(data, tr, te, alpha=alpha, beta=beta)
            extra["Tip-Adapter (searched)"] = {"alpha": alpha, "beta": beta, "searched": hp is not None}
        for method, probs in results.items():
            row = {"shots": k, "repeat": r, "method": method, "n_train": len(tr), "n_test": len(te)}
            row |= {"held_out_site": held} if held is not None else {}
            rows.append(row | dict(score(y_true, probs)) | extra.get(method, {}))
        if progress is not None:
            progress(1)
    return rows


def _splits(
    data: FewShotData,
    shots: Sequence[int],
    repeats: int,
    seed: int,
    groups: Sequence[str] | None,
    sites: Sequence[str] | None,
) -> Iterator[tuple[int, int, str | None, tuple[NDArray[np.int64], NDArray[np.int64]]]]:
    """(k, repeat, held-out site, (train, test)) of every draw."""
    site = np.asarray(sites) if sites is not None else None
    for held in sorted(set(site.tolist())) if site is not None else [None]:
        pool = np.flatnonzero(site != held) if site is not None else np.arange(len(data.labels))
        test = np.flatnonzero(site == held) if site is not None else None
        g = None if groups is None else [groups[i] for i in pool.tolist()]
        for k in shots:
            for r in range(repeats):
                tr, te = draw(data.labels[pool], k, seed * 100_003 + r, data.classes, g)
                tr, te = pool[tr], (pool[te] if test is None else test)
                if site is not None:  # held out means held out: no patch of the site in training
                    assert not set(site[tr].tolist()) & set(site[te].tolist())
                yield k, r, held, (tr, te)


def summarize_curves(rows: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean and sd of ``metric`` per (method, shots)."""
    out = []
    for method in METHODS:
        for k in sorted({r["shots"] for r in rows}):
            v = [
                r[metric] for r in rows if r["method"] == method and r["shots"] == k and r[metric] is not None
            ]
            if v:
                out.append(
                    {
                        "method": method,
                        "shots": k,
                        "mean": float(np.mean(v)),
                        "sd": float(np.std(v)),
                        # the draws are the resamples: their 2.5th to 97.5th percentile
                        "ci_95": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))],
                        "n": len(v),
                    }
                )
    return out
