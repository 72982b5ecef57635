"""``results/run.json``: everything needed to reproduce every figure of a run, in one
file the report links: package versions, each encoder's weights hash and where the
weights came from, the prompt bag's hash and its full expanded prompt list, the protocol
and every scoring setting, the slide list with each slide's cheap fingerprint, the
splits any head used, and the headline metrics with their intervals."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import Config

__all__ = ["PACKAGES", "run_record"]

#: the packages whose versions change a figure
PACKAGES = (
    "histoalign-wsi",
    "torch",
    "torchvision",
    "open_clip_torch",
    "numpy",
    "scipy",
    "scikit-learn",
    "zarr",
    "openslide-python",
    "openslide-bin",
    "tiffslide",
    "pandas",
)
SCHEMA = "histoalign-run/1"


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _encoders(cfg: Config, hashes: Any) -> dict[str, Any]:
    from ..features.identity import encoder_identities
    from ..features.registry import get_entry, load_registry

    registry = load_registry(cfg.encoder_registry)
    ids = encoder_identities(cfg, hashes, offline=True)
    return {
        n: {
            "weights_sha256": ids[n]["weights"],
            "registry_entry": ids[n]["entry"],
            "weights_from": dict(get_entry(n, registry).weights) or "built in (seeded, untrained)",
            "untrained": get_entry(n, registry).untrained,
        }
        for n in cfg.encoders
    }


def _prompts(cfg: Config) -> dict[str, Any]:
    from ..zeroshot.prompts import load_bag

    bag = load_bag(cfg.prompt_bag)
    texts, cls, groups = bag.texts(protocol=cfg.protocol)
    return {
        "name": bag.name,
        "hash": bag.content_hash,
        "protocol": cfg.protocol,
        "classes": bag.class_names,
        "decision_classes": bag.decision_classes,
        "other_classes": list(bag.other_classes),
        "prompts": [
            {"class": bag.class_names[k], "group": g, "text": t}
            for t, k, g in zip(texts, cls, groups, strict=True)
        ],
    }


def _splits(results: Path) -> dict[str, Any]:
    cv = results / "models" / "cv_metrics.json"
    if not cv.is_file():
        return {}
    m = json.loads(cv.read_text(encoding="utf-8"))
    heads = {h: [f["slides"] for f in v.get("folds", [])] for h, v in m.get("heads", {}).items()}
    return {"fit": {"split": m.get("split"), "seed": m.get("seed"), "held_out_slides_per_fold": heads}}


def _metrics(results: Path) -> dict[str, Any] | None:
    path = results / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text(encoding="utf-8"))
    keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auc_macro_ovr")
    return {k: m.get(k) for k in keys} | {"ci": m.get("ci"), "bootstrap": m.get("bootstrap")}


def run_record(cfg: Config, results: Path, out: Path) -> dict[str, Any]:
    """Write ``out`` (``run.json``) for the run whose configuration is ``cfg`` and whose
    outputs are in ``results``. Slide fingerprints come from the run's hash cache (read
    once when the run started), so a 10,000-slide record costs no slide reads."""
    from ..outputs.metrics import write_json
    from ..provenance import HashCache
    from ..slides.cohort import discover_slides
    from ..stage_keys import STAGE_KEYS

    hashes = HashCache.for_results(results)
    slides = [
        {"slide_id": e.slide_id, "path": str(e.path), "fingerprint": hashes.fingerprint(e.path), "mpp": e.mpp}
        for e in sorted(discover_slides(cfg.slides, strict=cfg.strict_slides), key=lambda e: e.slide_id)
    ]
    scoring = {k: cfg.raw.get(k) for k in sorted({*STAGE_KEYS["score"], *STAGE_KEYS["calibrate"]})}
    doc = {
        "schema": SCHEMA,
        "packages": _versions(),
        "encoders": _encoders(cfg, hashes),
        "prompt_bag": _prompts(cfg),
        "scoring": scoring
        | {
            "calibration": cfg.calibration,
            "tiling": {"scales_mpp": list(cfg.tiling.scales_mpp), "tile_px": cfg.tiling.tile_px}
            | dict(cfg.raw.get("tiling", {})),
            "stain": cfg.raw.get("stain"),
        },
        "slides": slides,
        "labels": cfg.labels,
        "splits": _splits(results),
        "metrics": _metrics(results),
    }
    hashes.save()
    write_json(doc, out)
    return doc
