"""Subcommands on features: the workflow's batches, encoding, the encoder registry and
store inspection."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import stages
from ..config import Config
from .common import Subparsers, print_json
from .common import add as _add

__all__ = ["feature_commands"]


def _encode(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_encode(a.tiles, a.slide, a.out, cfg, threads=a.threads)
    return 0


def _batch(a: argparse.Namespace, cfg: Config) -> int:
    from ..batches import FAILED, parse_spec

    if a.stage == "pick":
        stages.pick_slides(parse_spec(a.spec), a.upstream, a.out)
        return 0

    state = {
        "text": a.text,
        "calibration": a.calibration,
        "screening": a.screening,
        "attention": a.attention,
        "threads": a.threads,
    }
    rows = stages.run_batch(
        a.stage, parse_spec(a.spec), a.results, a.out, cfg, upstream=a.upstream, token=a.token, **state
    )
    for r in rows:
        if r.status == FAILED:
            print(f"histoalign-wsi batch {a.stage}: slide {r.slide_id!r} failed: {r.error}", file=sys.stderr)
    return 0


def _encoders(a: argparse.Namespace, cfg: Config) -> int:
    rows = stages.run_encoders(cfg)
    if a.json:
        print_json(rows)
    else:
        for r in rows:
            print(f"{r['name']:<16} {r['kind']:<10} dim={r['embed_dim']:<5} {r['status']}")
    return 0


def _inspect(a: argparse.Namespace, cfg: Config) -> int:
    summary = stages.run_inspect(a.store)
    print_json(summary)
    return 1 if summary["problems"] else 0


# --- the parser ----------------------------------------------------------------------


def feature_commands(sub: Subparsers) -> None:
    p = _add(sub, "batch", _batch, "run a per-slide stage over a batch of slides (what the workflow calls)")
    p.add_argument(
        "stage",
        choices=("prepare", "encode", "finish", "pick"),
        help="tissue+tile, encode, score+outputs; pick: these slides' manifest rows (fails if one failed)",
    )
    p.add_argument("--spec", required=True, help="the batch's slides as JSON [[slide_id, path, mpp], ...]")
    p.add_argument("--results", type=Path, required=True, help="results folder (per-slide files go there)")
    p.add_argument("--out", type=Path, required=True, help="the batch manifest (.tsv) to write")
    p.add_argument("--upstream", type=Path, help="the previous stage's manifest of this batch")
    p.add_argument("--token", default="", help="the workflow's retry token (recorded in the manifest)")
    p.add_argument("--text", type=Path, help="finish: text embeddings (.npz)")
    p.add_argument("--calibration", type=Path, help="finish: calibration offsets")
    p.add_argument("--screening", type=Path, help="finish: KEEP's screened prompt sets (protocol: keep)")
    p.add_argument("--attention", action="store_true", help="finish: add the abmil head's attention")

    p = _add(sub, "encode", _encode, "encode tiles at every scale with every configured encoder")
    p.add_argument("tiles", type=Path, help="tile store from 'tile'")
    p.add_argument("--slide", type=Path, required=True, help="the slide the tiles came from")
    p.add_argument("--out", type=Path, required=True, help="feature store (.zarr)")

    p = _add(sub, "encoders", _encoders, "list the encoder registry and what is available here")
    p.add_argument("--json", action="store_true")

    p = _add(sub, "inspect", _inspect, "validate a feature store against the schema and summarise it")
    p.add_argument("store", type=Path)
