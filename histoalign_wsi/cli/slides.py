"""Subcommands on slides: metadata, demo slides, tissue and tiles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import stages
from ..config import Config
from .common import Subparsers, at_least, mpp_value, print_json
from .common import add as _add

__all__ = ["slide_commands"]


def _info(a: argparse.Namespace, cfg: Config) -> int:
    print_json(stages.run_info(a.slide, cfg, mpp=a.mpp))
    return 0


def _make_demo(a: argparse.Namespace, cfg: Config) -> int:
    paths = stages.run_make_demo_slides(
        a.outdir, truth=a.truth, n=a.n, width=a.width, height=a.height, seed=a.seed, ome_every=a.ome_every
    )
    truth = a.truth or a.outdir.parent / f"{a.outdir.name}_truth"
    print("\n".join(map(str, paths)))
    print(f"ground truth (masks, labels.csv): {truth}", file=sys.stderr)
    return 0


def _make_demo_data(a: argparse.Namespace, cfg: Config) -> int:
    from ..demo_data import make_demo_data  # the generator only: no model, no torch

    made = make_demo_data(a.outdir, n_slides=a.n, seed=a.seed)
    for what, where in made.items():
        print(f"{what:<8} {where}")
    return 0


def _tissue(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_tissue(a.slide, a.out, cfg, mpp=a.mpp)
    return 0


def _tile(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_tile(a.slide, a.out, cfg, tissue_png=a.tissue, slide_id=a.slide_id, mpp=a.mpp)
    return 0


# --- the parser ----------------------------------------------------------------------


def slide_commands(sub: Subparsers) -> None:
    p = _add(sub, "info", _info, "print slide metadata as JSON")
    p.add_argument("slide", type=Path)
    p.add_argument("--mpp", type=mpp_value, help="level-0 MPP to use instead of the metadata's")

    p = _add(
        sub,
        "make-demo-slides",
        _make_demo,
        "write generated pyramidal slides with planted regions, and their masks and labels.csv in "
        "OUTDIR_truth/ (rerunning leaves identical files untouched)",
    )
    p.add_argument("outdir", type=Path)
    p.add_argument("--n", type=at_least(1), default=2, help="number of slides (alternately TUM/STR-dominant)")
    p.add_argument("--width", type=at_least(512), default=8192, help="level-0 width at 0.25 µm/px")
    p.add_argument("--height", type=at_least(512), default=6144)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ome-every", type=at_least(0), default=2, help="every Nth slide is OME-TIFF (0: none)")
    p.add_argument("--truth", type=Path, help="folder for masks and labels.csv (default: OUTDIR_truth)")

    p = _add(
        sub,
        "make-demo-data",
        _make_demo_data,
        "sample data for every README command: a labelled slide cohort with patient ids, patch "
        "folders, a report sheet and an unpaired report corpus (generated; rerunning changes nothing)",
    )
    p.add_argument("outdir", type=Path)
    p.add_argument("--n", type=at_least(2), default=10, help="slides in the cohort (alternately TUM/STR)")
    p.add_argument("--seed", type=int, default=0)

    p = _add(sub, "tissue", _tissue, "detect tissue: mask PNG (+ JSON with scale, polygons)")
    p.add_argument("slide", type=Path)
    p.add_argument("--out", type=Path, required=True, help="mask PNG path")
    p.add_argument("--mpp", type=mpp_value)

    p = _add(sub, "tile", _tile, "lay nested multi-scale tiles and write the tile store")
    p.add_argument("slide", type=Path)
    p.add_argument("--out", type=Path, required=True, help="tile store (.zarr)")
    p.add_argument("--tissue", type=Path, help="mask PNG from 'tissue' (detected anew if absent)")
    p.add_argument("--slide-id", help="id recorded in the store (default: from the file name)")
    p.add_argument("--mpp", type=mpp_value)
