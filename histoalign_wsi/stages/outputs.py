"""The output stages: the cohort table and metrics, heatmaps, QuPath GeoJSON, the
segmentation evaluation and the report. None of them imports torch (tested)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..slides.cohort import read_labels
from .pipeline import open_for

__all__ = ["run_evaluate_segmentation", "run_export_geojson", "run_heatmap", "run_report", "run_summarize"]

log = logging.getLogger(__name__)


def run_summarize(
    predictions: Sequence[Path],
    out: Path,
    *,
    labels: Path | None = None,
    metrics: Path | None = None,
    confusion: Path | None = None,
    cfg: Config | None = None,
    failed: Sequence[tuple[str, str]] = (),
) -> Path:
    """``predictions.csv`` (and, with labels, the metrics and confusion matrix, which
    record the label sheet's content hash). Without labels, a ``metrics`` or ``confusion``
    file left by an earlier labelled run is removed: no rule of this run made it. The
    site key (``cfg``'s slide sheet, the label sheet, ``site_pattern``) adds a ``site``
    column and per-site metrics; ``cfg.bootstrap`` draws the intervals."""
    from ..outputs.intervals import Bootstrap
    from ..outputs.predictions import summarize
    from ..provenance import HashCache
    from ..sites import sites_for
    from ..slides.cohort import read_patients
    from ..zeroshot.prediction import Prediction

    sheet = read_labels(labels) if labels else None
    if sheet is None:
        for stale in (metrics, confusion):
            if stale is not None and stale.is_file():
                stale.unlink()
                log.info("removed %s: no label sheet in this run", stale)
    streamed = (Prediction.read(p) for p in predictions)  # one at a time: flat memory
    labels_hash = HashCache().sha256(labels) if labels else None
    summarize(
        streamed,
        out,
        labels=sheet,
        metrics_json=metrics if sheet is not None else None,
        confusion_png=confusion if sheet is not None else None,
        labels_hash=labels_hash,
        failed=failed,
        sites=(
            (lambda ids: sites_for(ids, slides=cfg.slides, labels=labels, pattern=cfg.site_pattern))
            if cfg is not None
            else None
        ),
        patients=read_patients(labels) if labels else None,
        boot=Bootstrap(cfg.bootstrap.resamples, cfg.bootstrap.seed) if cfg is not None else Bootstrap(),
    )
    return out


def _attention(path: Path | None) -> Any:
    import pandas as pd

    return pd.read_parquet(path) if path is not None else None


def run_heatmap(
    tile_scores_path: Path,
    prediction: Path,
    slide_path: Path,
    out: Path,
    cfg: Config,
    *,
    attention: Path | None = None,
) -> Path:
    from ..outputs.heatmaps import write_heatmaps
    from ..zeroshot import tile_scores
    from ..zeroshot.prediction import Prediction

    pred = Prediction.read(prediction)
    with open_for(slide_path, cfg) as slide:
        return write_heatmaps(
            slide,
            tile_scores.read(tile_scores_path),
            pred.colors,
            out,
            max_size=cfg.heatmap.max_size,
            alpha=cfg.heatmap.alpha,
            max_megapixels=cfg.max_read_megapixels,
            attention=_attention(attention),
            fmt=cfg.heatmap.format,
            mpp=cfg.heatmap.mpp,
        )


def run_export_geojson(
    tile_scores_path: Path,
    prediction: Path,
    out: Path,
    cfg: Config,
    *,
    store: Path | None = None,
    dims: tuple[int, int] | None = None,
    tissue: Path | None = None,
    gzip: bool = False,
    attention: Path | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    from ..features.store import open_store
    from ..outputs.geojson import export_geojson
    from ..zeroshot.prediction import Prediction

    mpp = None
    if store is not None:
        meta = open_store(store).attrs["slide"]
        dims, mpp = (int(meta["level0_dims"][0]), int(meta["level0_dims"][1])), float(meta["mpp"])
    if dims is None:
        raise ConfigError("export-geojson needs --store or --dims for the slide's size")
    polygons = json.loads(Path(tissue).read_text())["polygons"] if tissue else None
    return export_geojson(
        tile_scores_path,
        out,
        colors=Prediction.read(prediction).colors,
        level0_dims=dims,
        mpp=mpp,
        tissue_polygons=polygons,
        regions=cfg.geojson.regions,
        threshold=cfg.geojson.threshold,
        simplify_px=cfg.geojson.simplify_px,
        gzip_output=True if gzip or cfg.geojson.gzip else None,
        attention=_attention_map(attention),
        provenance=provenance,
    )


def _attention_map(path: Path | None) -> dict[tuple[int, int], float] | None:
    """Finest-scale attention by tile position (the GeoJSON's tiles are the finest)."""
    a = _attention(path)
    if a is None or not len(a):
        return None if a is None else {}
    fine = a[a["scale"] == min(a["scale"], key=lambda s: float(str(s).removesuffix("mpp")))]
    return {
        (int(x), int(y)): float(v) for x, y, v in zip(fine["x"], fine["y"], fine["attention"], strict=True)
    }


def run_evaluate_segmentation(
    tile_scores_path: Path,
    truth: Path,
    cfg: Config,
    *,
    mode: str = "argmax",
    dims: tuple[int, int] | None = None,
    out: Path | None = None,
) -> Mapping[str, Any]:
    from ..outputs.metrics import write_json
    from ..outputs.segmentation import evaluate_segmentation
    from ..zeroshot import tile_scores

    res = evaluate_segmentation(
        tile_scores.read(tile_scores_path), truth, mode=mode, threshold=cfg.geojson.threshold, dims=dims
    )
    if out is not None:
        write_json(res, out)
    return res


def run_report(
    predictions_csv: Path,
    out: Path,
    cfg: Config | None = None,
    *,
    results: Path | None = None,
    embed: bool | None = None,
    show: Sequence[str] | None = None,
) -> Path:
    from ..outputs.report import PAGE_SIZE, write_report

    return write_report(
        predictions_csv,
        out,
        results=results,
        show=show,
        embed=cfg.report.embed if embed is None and cfg is not None else bool(embed),
        page_size=cfg.report.page_size if cfg is not None else PAGE_SIZE,
    )
