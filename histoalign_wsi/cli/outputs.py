"""Subcommands that write what users read: the cohort table, heatmaps, GeoJSON,
segmentation metrics, the report; and unlocking a results folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import stages
from ..config import Config
from .common import Subparsers, opts, print_json
from .common import add as _add

__all__ = ["output_commands"]


def _summarize(a: argparse.Namespace, cfg: Config) -> int:
    failed = [(r.slide_id, r.error) for r in getattr(a, "failed", [])]
    stages.run_summarize(
        a.predictions,
        a.out,
        labels=a.labels,
        metrics=a.metrics,
        confusion=a.confusion,
        cfg=cfg,
        failed=failed,
    )
    return 0


def _run_record(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_record(cfg, a.results, a.out)
    return 0


def _heatmap(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_heatmap(a.tile_scores, a.prediction, a.slide, a.out, cfg, attention=a.attention)
    return 0


def _export(a: argparse.Namespace, cfg: Config) -> int:
    dims = tuple(a.dims) if a.dims else None
    kw = opts(a, "store", "tissue", "gzip", "attention")
    stages.run_export_geojson(a.tile_scores, a.prediction, a.out, cfg, dims=dims, **kw)
    return 0


def _evaluate_seg(a: argparse.Namespace, cfg: Config) -> int:
    dims = tuple(a.dims) if a.dims else None
    print_json(
        stages.run_evaluate_segmentation(a.tile_scores, a.truth, cfg, mode=a.mode, dims=dims, out=a.out)
    )
    return 0


def _unlock(a: argparse.Namespace, cfg: Config) -> int:
    info = stages.run_unlock(a.results, force=a.force)
    print(f"removed the lock of {info}" if info else f"{a.results} was not locked")
    return 0


def _report(a: argparse.Namespace, cfg: Config) -> int:
    show = None if a.show is None else [s for s in a.show.split(",") if s]
    stages.run_report(a.predictions, a.out, cfg, results=a.results, embed=a.embed, show=show)
    return 0


# --- the parser -------------------------------------------------------------------------


# --- the parser ----------------------------------------------------------------------


def output_commands(sub: Subparsers) -> None:
    p = _add(sub, "summarize", _summarize, "cohort predictions.csv, and metrics when labels are given")
    p.add_argument("predictions", type=Path, nargs="+", help="prediction JSONs")
    p.add_argument("--out", type=Path, required=True, help="predictions.csv")
    p.add_argument("--labels", type=Path)
    p.add_argument("--metrics", type=Path, help="metrics.json (needs --labels)")
    p.add_argument("--confusion", type=Path, help="confusion-matrix PNG (needs --labels)")

    p = _add(sub, "run-record", _run_record, "run.json: what reproduces every figure of a run")
    p.add_argument("--results", type=Path, required=True, help="the run's results folder")
    p.add_argument("--out", type=Path, required=True, help="run.json")

    p = _add(sub, "heatmap", _heatmap, "per-class probability heatmaps and an argmax map (PNG)")
    p.add_argument("tile_scores", type=Path)
    p.add_argument("--prediction", type=Path, required=True, help="the slide's prediction JSON (colours)")
    p.add_argument("--slide", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--attention", type=Path, help="a head's per-tile attention (.parquet): adds the attention map"
    )

    p = _add(sub, "export-geojson", _export, "QuPath GeoJSON: tiles, class regions, tissue")
    p.add_argument("tile_scores", type=Path)
    p.add_argument("--prediction", type=Path, required=True, help="the slide's prediction JSON (colours)")
    p.add_argument("--store", type=Path, help="feature store (for the slide's dimensions)")
    p.add_argument("--dims", type=int, nargs=2, metavar=("W", "H"), help="level-0 size if no --store")
    p.add_argument("--tissue", type=Path, help="tissue JSON from 'tissue' (exported as annotation)")
    p.add_argument("--gzip", action="store_true", help="write gzip (also implied by a .gz name)")
    p.add_argument(
        "--attention", type=Path, help="a head's per-tile attention (.parquet): an 'attention' measurement"
    )
    p.add_argument("--out", type=Path, required=True)

    p = _add(sub, "evaluate-segmentation", _evaluate_seg, "Dice and IoU per class against ground truth")
    p.add_argument("tile_scores", type=Path)
    p.add_argument(
        "--truth", type=Path, required=True, help="masks.json (PNG masks at a stated scale) or a GeoJSON"
    )
    p.add_argument(
        "--mode",
        choices=("argmax", "threshold"),
        default="argmax",
        help="argmax map or p >= geojson.threshold",
    )
    p.add_argument("--dims", type=int, nargs=2, metavar=("W", "H"), help="level-0 size (GeoJSON truth)")
    p.add_argument("--out", type=Path)

    p = _add(sub, "unlock", _unlock, "clear the results-folder lock a killed workflow run left")
    p.add_argument("results", type=Path, help="the results folder")
    p.add_argument("--force", action="store_true", help="even if its pid now belongs to a live process")

    p = _add(sub, "report", _report, "the cohort's HTML report (heatmaps linked, or inlined with --embed)")
    p.add_argument("predictions", type=Path, help="predictions.csv")
    p.add_argument("--results", type=Path, help="results folder (default: the CSV's folder)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--show",
        help="comma-separated sections this run made (metrics,heads,reports,distill; empty: none); "
        "default: every one whose file exists",
    )
    p.add_argument(
        "--embed",
        action="store_true",
        default=None,
        help="inline every image: one file to send (a small cohort); default: config report.embed",
    )
