"""Cross-validation splits of labelled slides: stratified k-fold grouped by patient
(``kfold``), or by site (``site``: leave-one-site-out, or site-grouped k-fold when there
are more sites than folds), a patient always inside one site. Every split says what it
was, as outputs record it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError

__all__ = ["CV_KINDS", "Splits", "cv_splits", "site_groups"]

CV_KINDS = ("kfold", "site")


@dataclass(frozen=True)
class Splits:
    """The (train, test) row indices of every fold and how they were drawn."""

    folds: list[tuple[NDArray[np.intp], NDArray[np.intp]]]
    cv: str
    by: str
    held_out: list[str] = field(default_factory=list)  # the site each fold tests on

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"cv": self.cv, "by": self.by, "folds": len(self.folds)}
        if self.held_out:
            out["held_out_sites"] = self.held_out
        return out


def site_groups(
    ids: Sequence[str], sites: Mapping[str, str], patients: Mapping[str, str] | None
) -> NDArray[np.str_]:
    """The site of each slide, refusing a patient whose slides come from two sites (the
    patient could not stay on one side of a site split)."""
    seen: dict[str, str] = {}
    for s in ids:
        p = (patients or {}).get(s, s)
        if p in seen and seen[p] != sites[s]:
            raise ConfigError(
                f"patient {p!r} has slides at two sites ({seen[p]!r} and {sites[s]!r}); "
                "a site split cannot keep the patient on one side"
            )
        seen.setdefault(p, sites[s])
    return np.array([sites[s] for s in ids])


def cv_splits(
    ids: Sequence[str],
    y: NDArray[np.int64],
    *,
    folds: int,
    seed: int,
    cv: str = "kfold",
    patients: Mapping[str, str] | None = None,
    sites: Mapping[str, str] | None = None,
    classes: Sequence[str] = (),
) -> Splits:
    """The folds of ``ids`` (labels ``y``).

    Raises
    ------
    ConfigError
        Too few patients of a class for ``folds``, ``cv: site`` without sites or with
        one site, a patient at two sites, or an unknown ``cv``.
    """
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

    g = np.array([(patients or {}).get(s, s) for s in ids])
    x = np.zeros(len(ids))
    if cv == "site":
        if not sites:
            raise ConfigError("cv: site needs a site key (a 'site' column, or site_pattern)")
        site = site_groups(ids, sites, patients)
        names = sorted(set(site.tolist()))
        if len(names) < 2:
            raise ConfigError(
                f"cv: site needs two sites or more; the labelled slides have one ({names[0]!r})"
            )
        if len(names) <= folds:
            split = list(LeaveOneGroupOut().split(x, y, site))
            by = f"site (leave-one-site-out, {len(names)} sites)"
        else:
            sgk = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            split = list(sgk.split(x, y, site))
            by = f"site (site-grouped {folds}-fold, {len(names)} sites)"
        held = [",".join(sorted(set(site[te].tolist()))) for _, te in split]
        for tr, te in split:  # held out means held out: no site, hence no patient, on both sides
            assert not set(site[tr]) & set(site[te]) and not set(g[tr]) & set(g[te])
        return Splits(split, "site", by, held)
    if cv != "kfold":
        raise ConfigError(f"unknown cv {cv!r} (choose {', '.join(CV_KINDS)})")
    unit = "patients" if patients else "slides"
    per_class = {k: len(np.unique(g[y == k])) for k in np.unique(y)}
    least = min(per_class, key=lambda c: per_class[c])
    if folds < 2 or folds > per_class[least]:
        name = classes[int(least)] if classes else str(least)
        raise ConfigError(
            f"{folds}-fold cross-validation needs at least {max(folds, 2)} {unit} of every class "
            f"(and folds >= 2); class {name!r} has {per_class[least]} (lower 'folds' or add {unit})"
        )
    split = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y, g))
    for tr, te in split:
        assert not set(g[tr]) & set(g[te])
    return Splits(split, "kfold", f"{'patient' if patients else 'slide'} (stratified {folds}-fold)")
