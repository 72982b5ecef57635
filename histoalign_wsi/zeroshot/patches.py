"""Zero-shot classification of a folder of image patches whose parent folder names are
the labels (a mapping file maps folder names to prompt-bag classes)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from numpy.typing import NDArray
from PIL import Image

from ..errors import ConfigError
from ..features.adapters import LoadedEncoder
from .alignment import AlignmentSpec, fused_logits
from .pooling import softmax
from .text import TextEmbeddings
from .tile_scores import class_columns

__all__ = ["PatchPredictions", "classify_patches", "encode_patches", "find_patches", "read_mapping"]

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


@dataclass(frozen=True)
class PatchPredictions:
    """Per-patch labels, predictions and probabilities [n, K] in class order."""

    classes: tuple[str, ...]
    images: tuple[Path, ...]
    folders: tuple[str, ...]
    labels: tuple[str, ...]
    probs: NDArray[np.float32]
    features: dict[str, NDArray[np.float32]] = field(default_factory=dict, repr=False)

    @property
    def predicted(self) -> list[str]:
        return [self.classes[k] for k in self.probs.argmax(axis=1)]

    def table(self) -> pd.DataFrame:
        df = pd.DataFrame(
            {
                "image": [str(p) for p in self.images],
                "folder": list(self.folders),
                "label": list(self.labels),
                "predicted_class": self.predicted,
            }
        )
        probs = pd.DataFrame(self.probs, columns=class_columns(self.classes, "prob"))
        return pd.concat([df, probs], axis=1)


def classify_patches(
    root: str | Path,
    encoders: Sequence[LoadedEncoder],
    text: TextEmbeddings,
    spec: AlignmentSpec,
    *,
    mapping: Mapping[str, str] | None = None,
    batch_size: int = 32,
) -> PatchPredictions:
    """Zero-shot probabilities of every patch under ``root`` (label = mapped folder name)."""
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
    feats = encode_patches([p for p, _ in items], encoders, batch_size=batch_size)
    return PatchPredictions(
        classes=tuple(classes),
        images=tuple(p for p, _ in items),
        folders=tuple(f for _, f in items),
        labels=tuple(labels),
        probs=softmax(fused_logits(feats, text, spec)),
        features=feats,
    )


def encode_patches(
    images: Sequence[Path], encoders: Sequence[LoadedEncoder], *, batch_size: int = 32
) -> dict[str, NDArray[np.float32]]:
    """L2-normalised features [n, D] of every image, per encoder (each its own transform)."""
    transforms = {e.name: e.pil_transform() for e in encoders}
    out: dict[str, list[NDArray[np.float32]]] = {e.name: [] for e in encoders}
    for i in range(0, len(images), batch_size):
        imgs = [Image.open(p).convert("RGB") for p in images[i : i + batch_size]]
        for e in encoders:
            x = torch.stack([transforms[e.name](im) for im in imgs]).to(e.device)
            out[e.name].append(e.encode_image(x).cpu().numpy().astype(np.float32))
    return {n: np.concatenate(v) for n, v in out.items()}
