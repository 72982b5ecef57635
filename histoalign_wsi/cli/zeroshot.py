"""Zero-shot subcommands: prompt embeddings, calibration, scoring, patch folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import stages
from ..config import Config
from .common import Subparsers, existing, existing_dir, opts, print_json
from .common import add as _add

__all__ = ["zeroshot_commands"]


def _embed_prompts(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_embed_prompts(a.out, cfg, cache=a.cache)
    return 0


def _calibrate(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_calibrate(a.stores, a.text, a.out, cfg)
    return 0


def _screen(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_screen_prompts(a.stores, a.text, a.out, cfg)
    return 0


def _score(a: argparse.Namespace, cfg: Config) -> int:
    kw = opts(a, "out", "prediction", "tile_scores", "calibration", "screening", "labels")
    stages.run_score(a.stores, cfg, text_path=a.text, **kw)
    return 0


def _classify_patches(a: argparse.Namespace, cfg: Config) -> int:
    m = stages.run_classify_patches(a.dir, a.out, cfg, text_path=a.text, mapping=a.mapping)
    keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auc_macro_ovr", "untrained")
    print_json({k: m[k] for k in keys} | {"ci_95": {k: m["ci"][k] for k in keys[1:5]}})
    return 0


# --- the parser ----------------------------------------------------------------------


def zeroshot_commands(sub: Subparsers) -> None:
    p = _add(sub, "embed-prompts", _embed_prompts, "embed the prompt bag with each encoder's text tower")
    p.add_argument("--out", type=Path, required=True, help="text embeddings (.npz)")
    p.add_argument("--cache", type=Path, help="cache folder (default {results}/cache/text)")

    p = _add(sub, "calibrate", _calibrate, "per-class mean tile logit over the cohort (dask, out of core)")
    p.add_argument("stores", type=existing, nargs="+")
    p.add_argument("--text", type=existing, required=True)
    p.add_argument("--out", type=Path, required=True, help="calibration JSON")

    p = _add(sub, "screen-prompts", _screen, "protocol keep: KEEP's label-free prompt-set screening")
    p.add_argument("stores", type=existing, nargs="+")
    p.add_argument("--text", type=existing, required=True)
    p.add_argument("--out", type=Path, required=True, help="prompt_screening.json")

    p = _add(sub, "score", _score, "score feature stores: per-slide predictions and tile scores")
    p.add_argument("stores", type=Path, nargs="+")
    p.add_argument("--text", type=Path, help="text embeddings from embed-prompts (made now if absent)")
    p.add_argument("--out", type=Path, help="results folder: predictions/, tile_scores/, predictions.csv")
    p.add_argument("--prediction", type=Path, help="one slide's prediction JSON")
    p.add_argument("--tile-scores", type=Path, help="one slide's tile-score table (.parquet)")
    p.add_argument("--calibration", type=Path, help="calibration JSON from 'calibrate'")
    p.add_argument(
        "--screening", type=Path, help="protocol keep: prompt_screening.json from 'screen-prompts'"
    )
    p.add_argument("--labels", type=Path, help="label sheet slide_id,label (metrics)")

    p = _add(
        sub, "classify-patches", _classify_patches, "zero-shot on a folder of patches (class = sub-folder)"
    )
    p.add_argument("dir", type=existing_dir)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mapping", type=existing, help="folder -> class (YAML mapping or CSV folder,class)")
    p.add_argument("--text", type=Path)
