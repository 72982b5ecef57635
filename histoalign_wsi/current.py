"""Which per-slide outputs in a results folder are current: made from the slide, settings,
weights, bag and code of this run, checked along the whole chain (tissue and tiles,
features, scores) against the records :mod:`histoalign_wsi.provenance` says each stage
would write now. The failure hook lists only current predictions; files of slides no
longer in the cohort are named, and removed only when asked. Imports no model framework
(it reads the stores' ``zarr.json`` directly)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .provenance import Expected, differs, digest
from .slides.cohort import SlideEntry

__all__ = ["PER_SLIDE", "current_predictions", "orphans", "prune"]

log = logging.getLogger(__name__)

#: per-slide folders under the results folder, and the suffix of each slide's entry
PER_SLIDE: Mapping[str, str] = {
    "tissue": ".png",
    "tiles": ".zarr",
    "features": ".zarr",
    "predictions": ".json",
    "tile_scores": ".parquet",
    "heatmaps": "",
    "geojson": ".geojson",
    "attention": ".parquet",
    "slides": ".tsv",
}


def _record(path: Path) -> Any:
    """A store's (``zarr.json``) or a JSON file's provenance record; None if unreadable."""
    f = path / "zarr.json" if path.suffix == ".zarr" else path
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict):
        return None
    return (d.get("attributes") or {}).get("provenance") if path.suffix == ".zarr" else d.get("provenance")


def _text_record(path: Path) -> Any:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"])).get("provenance")
    except Exception:  # damaged or absent: nothing scored from it is current
        return None


def current_predictions(
    results: str | Path,
    cohort: Mapping[str, SlideEntry],
    expected: Expected,
    *,
    calibration: bool,
) -> tuple[list[Path], dict[str, str]]:
    """(the prediction files of the cohort that are current, slide -> why each other
    prediction file is not)."""
    res = Path(results)
    stale: dict[str, str] = {}
    text = _text_record(res / "text_embeddings.npz")
    why_text = differs(text, expected.text()) if text is not None else "no text embeddings"
    cal = res / "calibration.json"
    cal_hash = expected.file(cal) if calibration and cal.is_file() else None
    ok: list[Path] = []
    for sid in sorted(cohort):
        pred = res / "predictions" / f"{sid}.json"
        if not pred.is_file():
            continue
        e = cohort[sid]
        try:
            prep = expected.prepare(e.path, e.mpp)
        except OSError as exc:  # the slide is gone or unreadable
            stale[sid] = f"slide unreadable: {exc.strerror or exc}"
            continue
        enc = expected.encode(digest(prep))
        checks = (
            ("tiles", differs(_record(res / "tiles" / f"{sid}.zarr"), prep)),
            ("features", differs(_record(res / "features" / f"{sid}.zarr"), enc)),
            ("text embeddings", why_text),
            ("calibration", "missing" if calibration and cal_hash is None else None),
        )
        bad = next(((what, why) for what, why in checks if why is not None), None)
        if bad is None:
            score = expected.score(digest(enc), digest(expected.text()), cal_hash)
            why = differs((_record(pred) or {}).get("score"), score)
            bad = ("scores", why) if why is not None else None
        if bad is None:
            ok.append(pred)
        else:
            stale[sid] = f"{bad[0]}: {bad[1]}"
    expected.cache.save()
    return ok, stale


def orphans(results: str | Path, slide_ids: set[str]) -> list[Path]:
    """Per-slide files and folders of slides not in the cohort (removed or renamed)."""
    res = Path(results)
    out = []
    for folder, suffix in PER_SLIDE.items():
        d = res / folder
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            if folder == "tissue" and p.suffix == ".json":
                sid = p.name.removesuffix(".json")
            elif suffix and not p.name.endswith(suffix):
                continue
            else:
                sid = p.name.removesuffix(suffix) if suffix else p.name
            if sid not in slide_ids:
                out.append(p)
    return out


def prune(paths: list[Path]) -> None:
    """Remove what :func:`orphans` found (only when the user asks: ``prune: true``)."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
