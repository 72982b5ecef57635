"""What the report shows of the slide-level heads, when ``fit`` and ``predict`` ran: the
cross-validated metrics of each head with the attention MIL's ablation beside it, and each
head's prediction per slide (a column of the slide table)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from .report_sites import ci_cell, per_site_table

__all__ = ["head_predictions", "heads_section"]

_METRICS = (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"), ("auc_macro_ovr", "AUC"))


def _cell(mean: Any, sd: Any) -> str:
    if not isinstance(mean, (int, float)):
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if isinstance(sd, (int, float)) else f"{mean:.3f}"


def heads_section(res: Path) -> str:
    """The table of ``models/cv_metrics.json`` (empty without it)."""
    path = res / "models" / "cv_metrics.json"
    if not path.is_file():
        return ""
    cv = json.loads(path.read_text(encoding="utf-8"))
    heads: dict[str, Any] = cv.get("heads", {})
    ths = "".join(f"<th>{html.escape(label)}</th>" for _, label in _METRICS)
    out = [f"<h2>Slide-level heads</h2><div class='scroll'><table id='heads'><tr><th>head</th>{ths}</tr>"]
    for name, h in heads.items():
        mean, sd = h.get("mean", {}), h.get("sd", {})
        tds = "".join(f"<td>{_cell(mean.get(k), sd.get(k))}</td>" for k, _ in _METRICS)
        note = " (ablation: abmil without scale embeddings)" if name == "abmil_noscale" else ""
        out.append(f"<tr><td>{html.escape(name)}{note}</td>{tds}</tr>")
    split: dict[str, Any] = cv.get("split") or {}
    first: dict[str, Any] = next(iter(heads.values()), {})
    by = split.get("by") or ("patient" if cv.get("grouped") else "slide")
    out.append(
        f"</table></div><p>Mean ± SD over {len(first.get('folds', []))} "
        f"cross-validation folds, split by {html.escape(str(by))}, on {int(cv.get('n_slides', 0))} labelled "
        "slides; every number is on slides the head did not see. The slide table shows each "
        "head's prediction, and a slide's detail the abmil head's attention.</p>"
    )
    pooled = cv.get("pooled") or {}
    if pooled:
        out.append(
            "<h3>Out-of-fold, with 95 % bootstrap intervals</h3><div class='scroll'><table id='heads-ci'>"
            f"<tr><th>head</th>{ths}</tr>"
        )
        for name, p in pooled.items():
            out.append(
                f"<tr><td>{html.escape(name)}</td>"
                + "".join(f"<td>{ci_cell(p, k)}</td>" for k, _ in _METRICS)
                + "</tr>"
            )
        out.append("</table></div>")
        for name, p in pooled.items():
            out.append(per_site_table(p.get("per_site"), f"{name} per site (out-of-fold)"))
    return "".join(out)


def head_predictions(res: Path) -> tuple[list[str], dict[str, dict[str, list[Any]]]]:
    """(head names, slide id -> {head: [predicted class, its probability]}) from
    ``heads/{head}/predictions.csv``."""
    names: list[str] = []
    per_slide: dict[str, dict[str, list[Any]]] = {}
    folder = res / "heads"
    if not folder.is_dir():
        return names, per_slide
    for csv in sorted(folder.glob("*/predictions.csv")):
        name = csv.parent.name
        table = pd.read_csv(csv, dtype={"slide_id": str})
        probs = [c for c in table.columns if c.startswith("prob_")]
        names.append(name)
        best = table[probs].max(axis=1) if probs else pd.Series([None] * len(table))
        for sid, pred, top in zip(table["slide_id"], table["predicted_class"], best, strict=True):
            value = None if top is None or pd.isna(top) else round(float(top), 4)
            per_slide.setdefault(str(sid), {})[name] = [str(pred), value]
    return names, per_slide
