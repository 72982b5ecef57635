"""The cohort table (``predictions.csv``) from per-slide predictions, and metrics against
a label sheet."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from .._atomic import atomic_file
from ..csvcells import inert_table
from ..errors import ConfigError
from ..provenance import STAGE_VERSIONS, digest
from ..sites import SiteKey
from ..zeroshot.prediction import Prediction
from ..zeroshot.tile_scores import class_columns
from .intervals import Bootstrap, format_ci, group_table, units_of, with_intervals
from .metrics import classification_metrics, write_json
from .plots import plot_confusion

log = logging.getLogger(__name__)

__all__ = ["check_labels", "cohort_table", "every_j", "summarize", "weighted_kappa"]


def cohort_table(preds: Iterable[Prediction]) -> pd.DataFrame:
    """One row per slide: id, prediction, status, untrained, ``prob_*`` per class, tiles.
    ``preds`` may be a generator: only the rows are kept, so memory stays flat."""
    classes: tuple[str, ...] = ()
    cols: list[str] = []
    rows: list[dict[str, Any]] = []
    for p in preds:
        if not rows:
            classes, cols = p.classes, class_columns(p.classes, "prob")
        if p.classes != classes:
            raise ConfigError(
                f"slide {p.slide_id!r} was scored with classes {list(p.classes)}, others with {list(classes)}"
            )
        row: dict[str, Any] = {
            "slide_id": p.slide_id,
            "predicted_class": p.predicted_class,
            "status": p.status,
            "untrained": p.untrained,
        }
        for c, col in zip(classes, cols, strict=True):
            row[col] = (p.probabilities or {}).get(c, np.nan)
        row["n_tiles"] = p.n_tiles
        row["provenance"] = digest(dict(p.provenance)) if p.provenance else ""
        rows.append(row)
    if not rows:
        return pd.DataFrame(
            columns=["slide_id", "predicted_class", "status", "untrained", *cols, "n_tiles", "provenance"]
        )
    return pd.DataFrame(rows).sort_values("slide_id").reset_index(drop=True)


def check_labels(labels: Mapping[str, str], slide_ids: Sequence[str], classes: Sequence[str]) -> None:
    """Refuse a label sheet naming slides that were not scored or classes not in the bag."""
    unknown_slides = sorted(set(labels) - set(slide_ids))
    if unknown_slides:
        raise ConfigError(f"label sheet names slides that were not scored: {', '.join(unknown_slides)}")
    unknown_cls = sorted(set(labels.values()) - set(classes))
    if unknown_cls:
        raise ConfigError(
            f"label sheet uses classes not in the prompt bag: {', '.join(unknown_cls)} "
            f"(bag classes: {', '.join(classes)})"
        )


def weighted_kappa(labelled: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """Quadratic weighted kappa for a bag whose classes are ordered (grades): the slides
    whose prediction is a class (a slide without tiles has no place on the scale)."""
    from sklearn.metrics import cohen_kappa_score

    graded = labelled[labelled["predicted_class"].isin(list(classes))]
    value = None
    if len(graded):
        with np.errstate(invalid="ignore", divide="ignore"):
            k = float(
                cohen_kappa_score(
                    graded["label"], graded["predicted_class"], labels=list(classes), weights="quadratic"
                )
            )
        value = k if np.isfinite(k) else None  # undefined: one class everywhere
    return {"value": value, "n": len(graded), "order": list(classes)}


def every_j(
    labelled: pd.DataFrame, by_j: Mapping[str, Mapping[str, Any]], classes: Sequence[str], configured: Any
) -> dict[str, Any]:
    """The CONCH protocol's metrics at every j it computed (CONCH's MI-Zero notebook
    reports j in 1, 5, 10, 50, 100). Only the configured j is the prediction: choosing the
    best j by these figures would choose on the test slides."""
    js = sorted({j for v in by_j.values() for j in v}, key=int)
    out: dict[str, Any] = {
        "configured_j": configured,
        "note": "each j on the same slides; the prediction uses configured_j. Picking the best j "
        "by these is choosing on the test set: not a held-out figure",
        "by_j": {},
    }
    for j in js:
        pred, probs = [], []
        for sid, cls in zip(labelled["slide_id"], labelled["predicted_class"], strict=True):
            r = by_j.get(sid, {}).get(j)
            pred.append(r["predicted_class"] if r else cls)  # a slide without tiles has no j
            probs.append([r["probabilities"][c] for c in classes] if r else [np.nan] * len(classes))
        m = classification_metrics(labelled["label"].tolist(), pred, np.array(probs, np.float64), classes)
        keys = ("n", "accuracy", "balanced_accuracy", "kappa", "macro_f1", "auc_macro_ovr", "n_auc")
        out["by_j"][j] = {k: m[k] for k in keys}
    return out


#: the status of a slide a batch recorded as failed
FAILED = "failed"


def _with_failed(table: pd.DataFrame, failed: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """The cohort table with a row per failed slide (status ``failed``, its error line)."""
    table = table.assign(error="")
    if not failed:
        return table
    done = set(table["slide_id"])
    rows = [
        {
            "slide_id": s,
            "predicted_class": FAILED,
            "status": FAILED,
            "untrained": False,
            "n_tiles": 0,
            "provenance": "",
            "error": " ".join(str(e).split()),
        }
        for s, e in failed
        if s not in done
    ]
    out = pd.concat([table, pd.DataFrame(rows)], ignore_index=True) if len(table) else pd.DataFrame(rows)
    return out.sort_values("slide_id").reset_index(drop=True)


def _intervals(
    labelled: pd.DataFrame,
    classes: Sequence[str],
    probs: np.ndarray,
    key: SiteKey | None,
    patients: Mapping[str, str] | None,
    boot: Bootstrap,
) -> dict[str, Any]:
    """The headline metrics' intervals, and the per-site table when sites are known."""
    ids = labelled["slide_id"].tolist()
    units, unit = units_of(ids, patients)
    yt, yp = labelled["label"].tolist(), labelled["predicted_class"].tolist()
    res = with_intervals(yt, yp, probs, classes, groups=units, boot=boot)
    out: dict[str, Any] = {
        "ci": res["ci"],
        "bootstrap": boot.describe(unit, len(set(units))) | {"n_defined": res["n_defined"]},
    }
    log.info(
        "balanced accuracy %s, macro F1 %s, AUC %s (%d slides; 95%% bootstrap over %ss)",
        format_ci(res["balanced_accuracy"], res["ci"]["balanced_accuracy"]),
        format_ci(res["macro_f1"], res["ci"]["macro_f1"]),
        format_ci(res["auc_macro_ovr"], res["ci"]["auc_macro_ovr"]),
        len(ids),
        unit,
    )
    if key is not None:
        by = [key.sites[s] for s in ids]
        out["per_site"] = {
            "by": key.by,
            "sites": group_table(yt, yp, probs, classes, by, groups=units, boot=boot),
        }
    return out


def summarize(
    preds: Iterable[Prediction],
    out_csv: str | Path,
    *,
    labels: Mapping[str, str] | None = None,
    metrics_json: str | Path | None = None,
    confusion_png: str | Path | None = None,
    labels_hash: str | None = None,
    sites: Callable[[Sequence[str]], SiteKey | None] | None = None,
    patients: Mapping[str, str] | None = None,
    boot: Bootstrap | None = None,
    failed: Sequence[tuple[str, str]] = (),
) -> pd.DataFrame:
    """Write ``predictions.csv`` (and, with labels, ``metrics.json`` + confusion PNG).

    Slides without tiles count as wrong in accuracy, balanced accuracy and F1 (their
    prediction is not a class), are left out of the AUCs (they have no probabilities to
    rank; ``n_auc`` counts the slides the AUCs saw), and are listed with their own count.
    A slide in ``failed`` (id, error line: a batch recorded it) gets a row with status
    ``failed``, no probabilities and its ``error``; it is left out of the metrics, which
    name it (``failed``). Every headline metric carries a seeded bootstrap interval
    (``ci``; patients resampled when ``patients`` is given), and with ``sites`` (the site
    key of the slide ids) the table has a ``site`` column and ``metrics.json`` a per-site
    table (``per_site``).

    Raises
    ------
    ConfigError
        The label sheet names slides that were not scored, or classes not in the bag.
    """
    first: list[tuple[str, ...]] = []
    ordered: list[bool] = []
    by_j: dict[str, dict[str, Any]] = {}  # slide -> the CONCH protocol's result at every j
    chosen: list[Any] = []

    def remember(ps: Iterable[Prediction]) -> Iterator[Prediction]:
        for p in ps:
            if not first:
                first.append(p.classes)
                ordered.append(bool(p.prompt_bag.get("ordered")))
            if isinstance(p.extra.get("topj"), Mapping):
                by_j[p.slide_id] = dict(p.extra["topj"])
                chosen[:] = [p.pooling.get("topj")]
            yield p

    table = _with_failed(cohort_table(remember(preds)), failed)
    classes = list(first[0]) if first else []
    ids = table["slide_id"].tolist()
    key = sites(ids) if sites is not None else None
    if key is not None:
        table.insert(1, "site", table["slide_id"].map(key.sites))
    if labels:
        check_labels(labels, ids, classes)
        table["label"] = table["slide_id"].map(labels)
    with atomic_file(out_csv) as tmp:
        inert_table(table).to_csv(tmp, index=False)
    if labels and metrics_json is not None:
        labelled = table[table["label"].notna() & (table["status"] != FAILED)]
        probs = labelled[class_columns(classes, "prob")].to_numpy(dtype=np.float64)
        m = classification_metrics(  # a slide without tiles: wrong, and out of the AUCs
            labelled["label"].tolist(), labelled["predicted_class"].tolist(), probs, classes
        )
        if ordered and ordered[0]:
            m["quadratic_weighted_kappa"] = weighted_kappa(labelled, classes)
        if by_j:
            m["topj"] = every_j(labelled, by_j, classes, chosen[0] if chosen else None)
        m.update(_intervals(labelled, classes, probs, key, patients, boot or Bootstrap()))
        m["untrained"] = bool(table["untrained"].any())
        without = labelled[labelled["status"] != "ok"]
        m["n_without_tiles"] = len(without)
        m["slides_without_tiles"] = sorted(without["slide_id"].tolist())
        lost = table[(table["status"] == FAILED) & table["label"].notna()]
        m["failed"] = {
            "n": len(lost),
            "slides": sorted(lost["slide_id"].tolist()),
            "note": "labelled slides that failed (failed_slides.tsv): not in these metrics",
        }
        m["provenance"] = {
            "stage": "summarize",
            "version": STAGE_VERSIONS["summarize"],
            "package_version": __version__,
            "inputs": {"labels": labels_hash, "predictions": digest(table["provenance"].tolist())},
        }
        write_json(m, metrics_json)
        if confusion_png is not None:
            plot_confusion(m["confusion_matrix"], confusion_png)
    return table
