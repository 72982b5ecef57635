"""The site signature (Howard et al., Nat Commun 12:4423, 2021): can a linear probe tell
which hospital a slide came from, from its per-scale mean features? Per encoder,
cross-validated grouped by patient, beside chance and a label-permutation control (the
same probe on site labels shuffled across patients)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError
from .bags import BagSource
from .heads import fit_linear_full, linear_probs

__all__ = ["encoder_features", "oof_site_probs"]


def encoder_features(source: BagSource, ids: Sequence[str]) -> dict[str, NDArray[np.float32]]:
    """Per encoder, each slide's per-scale mean features side by side [n, scales x dim]."""
    dims = [source.dims[n] for n in source.encoders]
    offsets = np.cumsum([0, *dims])
    total = int(offsets[-1])
    pooled = np.stack([source.bag(s).pooled() for s in ids])  # [n, scales x total]
    out = {}
    for e, name in enumerate(source.encoders):
        cols = [
            np.arange(k * total + offsets[e], k * total + offsets[e + 1])
            for k in range(len(source.scale_names))
        ]
        out[name] = pooled[:, np.concatenate(cols)]
    return out


def oof_site_probs(
    x: NDArray[np.float32],
    sites: Sequence[str],
    groups: Sequence[str],
    *,
    folds: int,
    seed: int,
) -> tuple[NDArray[np.float32], list[str], dict[str, Any]]:
    """Out-of-fold site probabilities [n, n_sites] of a logistic regression, with folds
    grouped by ``groups`` (patients) and stratified by site; (probabilities, site names,
    the split).

    Raises
    ------
    ConfigError
        Fewer than two sites, or a site with a single patient (nothing to hold out).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    names = sorted(set(sites))
    y = np.array([names.index(s) for s in sites], np.int64)
    g = np.asarray(groups)
    per_site = {names[k]: len(np.unique(g[y == k])) for k in range(len(names))}
    k = min(folds, *per_site.values()) if per_site else 0
    if len(names) < 2 or k < 2:
        raise ConfigError(
            "the site signature needs two sites with two patients (slides) each or more; "
            f"found {', '.join(f'{s}: {n}' for s, n in per_site.items()) or 'none'}"
        )
    probs = np.zeros((len(y), len(names)), np.float32)
    split = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (tr, te) in enumerate(split.split(x, y, g)):
        assert not set(g[tr]) & set(g[te])  # a patient never on both sides
        coef, icpt, _ = fit_linear_full(x[tr], y[tr], len(names), seed=seed + f)
        probs[te] = linear_probs(coef, icpt, x[te], len(names))
    return probs, names, {"by": f"patient (stratified {k}-fold by site)", "folds": k}


def permuted_sites(sites: Sequence[str], groups: Sequence[str], seed: int) -> list[str]:
    """Site labels shuffled across patients (a patient keeps one site): the control."""
    first: dict[str, str] = {}
    for s, g in zip(sites, groups, strict=True):
        first.setdefault(g, s)
    pats = sorted(first)
    shuffled = np.random.default_rng(seed).permutation([first[p] for p in pats]).tolist()
    by_patient: Mapping[str, str] = dict(zip(pats, shuffled, strict=True))
    return [by_patient[g] for g in groups]
