"""The cohort table (``predictions.csv``) from per-slide prediction JSONs, and metrics
against a label sheet."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._atomic import atomic_file
from .errors import ConfigError
from .evaluation import classification_metrics, plot_confusion, write_json

__all__ = ["cohort_table", "load_predictions", "summarize"]


def load_predictions(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in paths]


def cohort_table(preds: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    classes: list[str] = list(preds[0]["classes"]) if preds else []
    rows = []
    for p in preds:
        if list(p["classes"]) != classes:
            raise ConfigError(
                f"slide {p['slide_id']!r} was scored with classes {p['classes']}, others with {classes}"
            )
        row: dict[str, Any] = {
            "slide_id": p["slide_id"],
            "predicted_class": p["predicted_class"],
            "status": p["status"],
            "untrained": p["untrained"],
        }
        for c in classes:
            row[f"prob_{c}"] = (p["probabilities"] or {}).get(c, np.nan)
        row["n_tiles"] = sum(int(v["n_tiles"]) for v in p["per_scale"].values())
        rows.append(row)
    return pd.DataFrame(rows).sort_values("slide_id").reset_index(drop=True) if rows else pd.DataFrame()


def summarize(
    pred_jsons: Sequence[str | Path],
    out_csv: str | Path,
    *,
    labels: Mapping[str, str] | None = None,
    metrics_json: str | Path | None = None,
    confusion_png: str | Path | None = None,
) -> pd.DataFrame:
    """Write ``predictions.csv`` (and, with labels, ``metrics.json`` + confusion PNG).

    Raises
    ------
    ConfigError
        The label sheet names slides that were not scored, or classes not in the bag.
    """
    preds = load_predictions(pred_jsons)
    table = cohort_table(preds)
    if labels:
        classes = list(preds[0]["classes"]) if preds else []
        ids = set(table["slide_id"]) if len(table) else set()
        unknown_slides = sorted(set(labels) - ids)
        if unknown_slides:
            raise ConfigError(f"label sheet names slides that were not scored: {', '.join(unknown_slides)}")
        unknown_cls = sorted({v for v in labels.values()} - set(classes))
        if unknown_cls:
            raise ConfigError(
                f"label sheet uses classes not in the prompt bag: {', '.join(unknown_cls)} "
                f"(bag classes: {', '.join(classes)})"
            )
        table["label"] = table["slide_id"].map(labels)
    with atomic_file(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    if labels and metrics_json is not None:
        scored = table[(table["status"] == "ok") & table["label"].notna()]
        classes = list(preds[0]["classes"])
        probs = scored[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)
        m = classification_metrics(
            scored["label"].tolist(), scored["predicted_class"].tolist(), probs, classes
        )
        m["untrained"] = bool(table["untrained"].any())
        m["excluded_no_tissue"] = sorted(table.loc[table["status"] != "ok", "slide_id"].tolist())
        write_json(m, metrics_json)
        if confusion_png is not None:
            plot_confusion(m["confusion_matrix"], confusion_png)
    return table
