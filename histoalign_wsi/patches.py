"""Zero-shot classification of a folder of image patches whose parent folder names are
the labels (a mapping file maps folder names to prompt-bag classes)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from ._atomic import atomic_file
from .alignment import class_logits, fuse_encoders
from .config import Config
from .encoders import LoadedEncoder
from .errors import ConfigError
from .evaluation import classification_metrics, plot_confusion, write_json
from .pooling import softmax
from .text import TextEmbeddings

__all__ = ["classify_patches", "find_patches", "read_mapping"]

log = logging.getLogger(__name__)

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_mapping(path: str | Path) -> dict[str, str]:
    """Folder name -> class, from YAML (a mapping) or CSV (``folder,class``)."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        raw = yaml.safe_load(p.read_text())
        if not isinstance(raw, dict):
            raise ConfigError(f"mapping file {str(p)!r} must hold a mapping folder: class")
        return {str(k): str(v) for k, v in raw.items()}
    with p.open(newline="") as fh:
        return {r[0].strip(): r[1].strip() for r in csv.reader(fh) if len(r) >= 2 and r[0] != "folder"}


def find_patches(root: str | Path) -> list[tuple[Path, str]]:
    """(image, parent folder name) for every image under ``root``, sorted."""
    r = Path(root)
    if not r.is_dir():
        raise ConfigError(f"patch folder {str(r)!r} does not exist")
    out = sorted((p, p.parent.name) for p in r.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.parent != r)
    if not out:
        raise ConfigError(f"patch folder {str(r)!r} holds no images in sub-folders")
    return out


def classify_patches(
    root: str | Path,
    encoders: Sequence[LoadedEncoder],
    text: TextEmbeddings,
    cfg: Config,
    outdir: str | Path,
    *,
    mapping: Mapping[str, str] | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Classify every patch; write ``predictions.csv``, ``metrics.json`` and a confusion PNG."""
    items = find_patches(root)
    classes = list(text.classes)
    mapping = dict(mapping or {})
    labels = [mapping.get(f, f) for _, f in items]
    bad = sorted(set(labels) - set(classes))
    if bad:
        raise ConfigError(
            f"patch folders {bad} are not classes of the bag ({', '.join(classes)}); "
            "give a mapping file (folder: class)"
        )
    per_enc: dict[str, list[np.ndarray]] = {e.name: [] for e in encoders}
    transforms = {e.name: e.pil_transform() for e in encoders}
    for i in range(0, len(items), batch_size):
        imgs = [Image.open(p).convert("RGB") for p, _ in items[i : i + batch_size]]
        for e in encoders:
            x = torch.stack([transforms[e.name](im) for im in imgs]).to(e.device)
            feats = e.encode_image(x).cpu().numpy()
            per_enc[e.name].append(
                class_logits(
                    feats,
                    text.encoders[e.name],
                    len(classes),
                    rule=cfg.alignment.rule,
                    temperature=cfg.alignment.temperature,
                    topk=cfg.alignment.topk,
                )
            )
    fused = fuse_encoders({n: np.concatenate(v) for n, v in per_enc.items()}, cfg.encoder_weights)
    probs = softmax(fused)
    pred = [classes[k] for k in probs.argmax(axis=1)]
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(
        {
            "image": [str(p) for p, _ in items],
            "folder": [f for _, f in items],
            "label": labels,
            "predicted_class": pred,
        }
    )
    for k, c in enumerate(classes):
        df[f"prob_{c}"] = probs[:, k]
    with atomic_file(out / "predictions.csv") as tmp:
        df.to_csv(tmp, index=False)
    m = classification_metrics(labels, pred, probs.astype(np.float64), classes)
    m["untrained"] = any(e.entry.untrained for e in encoders)
    m["encoders"] = {e.name: e.weights_sha256 for e in encoders}
    write_json(m, out / "metrics.json")
    plot_confusion(m["confusion_matrix"], out / "confusion_matrix.png")
    return m
