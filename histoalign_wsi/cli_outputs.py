"""Subcommands of the outputs (heatmap, export-geojson, evaluate-segmentation, report)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from .config import Config

__all__ = ["register"]


def _pred(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _cmd_heatmap(a: argparse.Namespace, cfg: Config) -> int:
    from .heatmaps import write_heatmaps
    from .stages import open_for

    p = _pred(a.prediction)
    colors = {c: tuple(v) for c, v in p["colors"].items()}
    with open_for(a.slide, cfg, mpp=None) as slide:
        write_heatmaps(
            slide,
            pd.read_parquet(a.tile_scores),
            p["classes"],
            colors,
            a.out,
            slide_id=p["slide_id"],
            max_size=cfg.heatmap.max_size,
            alpha=cfg.heatmap.alpha,
        )
    return 0


def _cmd_export(a: argparse.Namespace, cfg: Config) -> int:
    from .geojson_export import export_geojson
    from .store import open_store

    p = _pred(a.prediction)
    dims = tuple(open_store(a.store).attrs["slide"]["level0_dims"]) if a.store else tuple(a.dims)
    tissue = json.loads(Path(a.tissue).read_text())["polygons"] if a.tissue else None
    gz = True if a.gzip or cfg.geojson.gzip else None
    export_geojson(
        a.tile_scores,
        a.out,
        slide_id=p["slide_id"],
        classes=p["classes"],
        colors={c: tuple(v) for c, v in p["colors"].items()},
        level0_dims=dims,
        tissue_polygons=tissue,
        threshold=cfg.geojson.threshold,
        simplify_px=cfg.geojson.simplify_px,
        gzip_output=gz,
    )
    return 0


def _cmd_evaluate_seg(a: argparse.Namespace, cfg: Config) -> int:
    from .evaluation import write_json
    from .segmentation import evaluate_segmentation

    p = _pred(a.prediction)
    dims = tuple(a.dims) if a.dims else None
    res = evaluate_segmentation(
        a.tile_scores, a.truth, classes=p["classes"], threshold=cfg.geojson.threshold, dims=dims
    )
    print(json.dumps(res, indent=2))
    if a.out:
        write_json(res, a.out)
    return 0


def _cmd_report(a: argparse.Namespace, cfg: Config) -> int:
    from .report import write_report

    write_report(a.predictions, a.out, results=a.results)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], reg: Any) -> None:
    p = reg(sub, "heatmap", _cmd_heatmap, "per-class probability heatmaps and an argmax map (PNG)")
    p.add_argument("tile_scores", type=Path)
    p.add_argument("--prediction", type=Path, required=True, help="the slide's prediction JSON")
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")

    p = reg(sub, "export-geojson", _cmd_export, "QuPath GeoJSON: tiles, class regions, tissue")
    p.add_argument("tile_scores", type=Path)
    p.add_argument("--prediction", type=Path, required=True)
    p.add_argument("--store", type=Path, help="feature store (for the slide's dimensions)")
    p.add_argument("--dims", type=int, nargs=2, metavar=("W", "H"), help="level-0 size if no --store")
    p.add_argument("--tissue", type=Path, help="tissue JSON from 'tissue' (exported as annotation)")
    p.add_argument("--gzip", action="store_true", help="write gzip (also implied by a .gz name)")
    p.add_argument("--out", type=Path, required=True)

    p = reg(sub, "evaluate-segmentation", _cmd_evaluate_seg, "Dice and IoU per class against ground truth")
    p.add_argument("tile_scores", type=Path)
    p.add_argument("--prediction", type=Path, required=True)
    p.add_argument(
        "--truth", type=Path, required=True, help="masks.json (PNG masks at a stated scale) or a GeoJSON"
    )
    p.add_argument("--dims", type=int, nargs=2, metavar=("W", "H"), help="level-0 size (GeoJSON truth)")
    p.add_argument("--out", type=Path)

    p = reg(sub, "report", _cmd_report, "one self-contained HTML report for the cohort")
    p.add_argument("predictions", type=Path, help="predictions.csv")
    p.add_argument("--results", type=Path, help="results folder (default: the CSV's folder)")
    p.add_argument("--out", type=Path, required=True)
