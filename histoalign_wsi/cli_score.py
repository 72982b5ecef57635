"""Subcommands of prompts, scoring and evaluation, registered by :mod:`histoalign_wsi.cli_more`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError

__all__ = ["register"]


def _text_for(cfg: Config, text_path: Path | None, cache: Path | None) -> Any:
    from .prompts import load_bag
    from .stages import load_encoders, resolve_device
    from .text import embed_bag, load_text

    if text_path is not None:
        return load_text(text_path)
    encs = load_encoders(cfg, device=resolve_device(cfg.device))
    return embed_bag(
        load_bag(cfg.prompt_bag), encs, descriptions=not cfg.pooling.conch_protocol, cache_dir=cache
    )


def _cmd_embed_prompts(a: argparse.Namespace, cfg: Config) -> int:
    from .text import save_text

    cache = a.cache or Path(cfg.results) / "cache" / "text"
    save_text(_text_for(cfg, None, cache), a.out)
    return 0


def _cmd_calibrate(a: argparse.Namespace, cfg: Config) -> int:
    from .calibration import write_calibration
    from .text import load_text

    write_calibration(a.stores, load_text(a.text), cfg, a.out)
    return 0


def _cmd_score(a: argparse.Namespace, cfg: Config) -> int:
    from .cohort import read_labels
    from .predictions import summarize
    from .scoring import score_store, write_scores
    from .store import open_store

    if (a.prediction or a.tile_scores) and len(a.stores) != 1:
        raise ConfigError("--prediction/--tile-scores name one slide's outputs: give exactly one store")
    if not (a.prediction and a.tile_scores) and a.out is None:
        raise ConfigError("give --out DIR, or both --prediction and --tile-scores")
    text = _text_for(cfg, a.text, Path(a.out or ".") / "cache" / "text")
    calib = json.loads(Path(a.calibration).read_text()) if a.calibration else None
    written = []
    for sp in a.stores:
        store = open_store(sp)
        scores = score_store(store, text, cfg, calibration=calib)
        sid = store.slide_id
        pj = Path(a.prediction) if a.prediction else Path(a.out) / "predictions" / f"{sid}.json"
        tp = Path(a.tile_scores) if a.tile_scores else Path(a.out) / "tile_scores" / f"{sid}.parquet"
        write_scores(scores, pj, tp)
        written.append(pj)
    if a.out is not None and not a.prediction:
        labels = read_labels(a.labels) if a.labels else (read_labels(cfg.labels) if cfg.labels else None)
        out = Path(a.out)
        summarize(
            written,
            out / "predictions.csv",
            labels=labels,
            metrics_json=out / "metrics.json",
            confusion_png=out / "confusion_matrix.png",
        )
    return 0


def _cmd_summarize(a: argparse.Namespace, cfg: Config) -> int:
    from .cohort import read_labels
    from .predictions import summarize

    labels = read_labels(a.labels) if a.labels else None
    summarize(a.predictions, a.out, labels=labels, metrics_json=a.metrics, confusion_png=a.confusion)
    return 0


def _cmd_classify_patches(a: argparse.Namespace, cfg: Config) -> int:
    from .patches import classify_patches, read_mapping
    from .stages import load_encoders, resolve_device

    text = _text_for(cfg, a.text, a.out / "cache")
    encs = load_encoders(cfg, device=resolve_device(cfg.device))
    m = classify_patches(
        a.dir, encs, text, cfg, a.out, mapping=read_mapping(a.mapping) if a.mapping else None
    )
    print(
        json.dumps(
            {
                k: m[k]
                for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "auc_macro_ovr", "untrained")
            },
            indent=2,
        )
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], reg: Any) -> None:
    p = reg(sub, "embed-prompts", _cmd_embed_prompts, "embed the prompt bag with each encoder's text tower")
    p.add_argument("--out", type=Path, required=True, help="text embeddings (.npz)")
    p.add_argument("--cache", type=Path, help="cache folder (default {results}/cache/text)")

    p = reg(sub, "calibrate", _cmd_calibrate, "per-class mean tile logit over the cohort (dask, out of core)")
    p.add_argument("stores", type=Path, nargs="+")
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="calibration JSON")

    p = reg(sub, "score", _cmd_score, "score feature stores: per-slide predictions and tile scores")
    p.add_argument("stores", type=Path, nargs="+")
    p.add_argument("--text", type=Path, help="text embeddings from embed-prompts (made now if absent)")
    p.add_argument("--out", type=Path, help="results folder: predictions/, tile_scores/, predictions.csv")
    p.add_argument("--prediction", type=Path, help="one slide's prediction JSON")
    p.add_argument("--tile-scores", type=Path, help="one slide's tile-score table (.parquet)")
    p.add_argument("--calibration", type=Path, help="calibration JSON from 'calibrate'")
    p.add_argument("--labels", type=Path, help="label sheet slide_id,label (metrics)")

    p = reg(sub, "summarize", _cmd_summarize, "cohort predictions.csv, and metrics when labels are given")
    p.add_argument("predictions", type=Path, nargs="+", help="prediction JSONs")
    p.add_argument("--out", type=Path, required=True, help="predictions.csv")
    p.add_argument("--labels", type=Path)
    p.add_argument("--metrics", type=Path, help="metrics.json (needs --labels)")
    p.add_argument("--confusion", type=Path, help="confusion-matrix PNG (needs --labels)")

    p = reg(
        sub,
        "classify-patches",
        _cmd_classify_patches,
        "zero-shot on a folder of patches (class = sub-folder)",
    )
    p.add_argument("dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mapping", type=Path, help="folder -> class (YAML mapping or CSV folder,class)")
    p.add_argument("--text", type=Path)

    from . import cli_outputs

    cli_outputs.register(sub, reg)
