"""The cohort's site signature stage (``site_signature.json``): per encoder, how well a
linear probe predicts the site from the stored features, with its interval, beside
chance and a label-permutation control."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import ConfigError

__all__ = ["PERMUTATIONS", "run_site_signature"]

log = logging.getLogger(__name__)

#: label permutations of the control (their mean is reported)
PERMUTATIONS = 5


def run_site_signature(
    stores: Sequence[Path], out: Path, cfg: Config, *, labels_sheet: Path | None = None
) -> dict[str, Any]:
    """Predict each slide's site from its per-scale mean features, per encoder, and
    write ``out`` (JSON). Sites come from the configuration (slide sheet, label sheet,
    ``site_pattern``); folds group by patient when the label sheet has ``patient_id``.

    Raises
    ------
    ConfigError
        No site key, or too few sites or patients to cross-validate.
    """
    from ..learn.bags import BagSource
    from ..learn.site_probe import encoder_features, oof_site_probs, permuted_sites
    from ..outputs.intervals import Bootstrap, format_ci, units_of, with_intervals
    from ..outputs.metrics import write_json
    from ..provenance import HashCache, digest, make_record
    from ..sites import sites_for
    from ..slides.cohort import read_patients

    sheet = labels_sheet or (Path(cfg.labels) if cfg.labels else None)
    source = BagSource(stores)
    ids = sorted(source.ids)
    key = sites_for(ids, slides=cfg.slides, labels=sheet, pattern=cfg.site_pattern)
    if key is None:
        raise ConfigError(
            "site-signature needs a site key: a 'site' column in the slide or label sheet, or site_pattern"
        )
    patients = read_patients(sheet) if sheet else None
    units, unit = units_of(ids, patients)
    sites = [key.sites[s] for s in ids]
    boot = Bootstrap(cfg.bootstrap.resamples, cfg.bootstrap.seed)
    folds, seed = cfg.fit.folds, cfg.fit.seed
    result: dict[str, Any] = {"encoders": {}}
    split: dict[str, Any] = {}
    for name, x in encoder_features(source, ids).items():
        try:
            probs, names, split = oof_site_probs(x, sites, units, folds=folds, seed=seed)
        except ConfigError as exc:  # a cohort too small to cross-validate: said, not a failed run
            log.warning("site signature skipped: %s", exc)
            result = {"skipped": str(exc), "encoders": {}}
            break
        pred = [names[k] for k in probs.argmax(axis=1)]
        m = with_intervals(sites, pred, probs.astype(np.float64), names, groups=units, boot=boot)
        control = []
        for r in range(PERMUTATIONS):
            shuffled = permuted_sites(sites, units, seed + 1 + r)
            pp, nn, _ = oof_site_probs(x, shuffled, units, folds=folds, seed=seed)
            control.append(
                with_intervals(
                    shuffled,
                    [nn[k] for k in pp.argmax(axis=1)],
                    pp.astype(np.float64),
                    nn,
                    boot=Bootstrap(resamples=0),
                )["balanced_accuracy"]
            )
        result["encoders"][name] = {
            "balanced_accuracy": m["balanced_accuracy"],
            "auc_macro_ovr": m["auc_macro_ovr"],
            "ci": {k: m["ci"][k] for k in ("balanced_accuracy", "auc_macro_ovr")},
            "chance": 1.0 / len(names),
            "permuted": float(np.mean(control)),
            "permuted_each": control,
        }
        log.info(
            "site signature %s: balanced accuracy %s (chance %.3f, permuted %.3f)",
            name,
            format_ci(m["balanced_accuracy"], m["ci"]["balanced_accuracy"]),
            1.0 / len(names),
            float(np.mean(control)),
        )
    from ..features.store import open_store

    opened = sorted(digest(open_store(p).attrs.get("provenance")) for p in stores)
    result |= {
        "n_slides": len(ids),
        "n_sites": len(key.names),
        "sites": key.summary() | {"per_site": {s: sites.count(s) for s in key.names}},
        "split": split,
        "bootstrap": boot.describe(unit, len(set(units))),
        "permutations": PERMUTATIONS,
        "untrained": source.untrained,
        "meaning": "well above chance: the features carry the site; labels confounded with site "
        "will look learnable",
        "provenance": make_record(
            "site_signature",
            cfg,
            {"features": digest(opened), "labels": HashCache().sha256(sheet) if sheet else None},
        ),
    }
    write_json(result, out)
    return result
