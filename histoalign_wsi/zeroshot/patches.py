"""Zero-shot classification of a folder of image patches whose parent folder names are
the labels (a mapping file maps folder names to prompt-bag classes)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from PIL import Image

from ..errors import ConfigError
from ..textfiles import decode_text, read_yaml
from .alignment import AlignmentSpec, fused_logits
from .pooling import softmax
from .text import TextEmbeddings
from .tile_scores import class_columns

if TYPE_CHECKING:
    from ..features.adapters import LoadedEncoder

__all__ = [
    "MAX_PATCH_MEGAPIXELS",
    "PatchPredictions",
    "classify_patches",
    "encode_patches",
    "find_patches",
    "open_patch",
    "read_mapping",
]

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: the largest patch image read (million pixels); patches are tiles of a few hundred
#: pixels, and a larger image in a patch folder is refused before it is decoded
MAX_PATCH_MEGAPIXELS = 25.0


#: the class of a folder left out (a YAML ``null`` or an empty CSV cell)
LEFT_OUT = ""


def read_mapping(path: str | Path) -> dict[str, str]:
    """Folder name -> class, from YAML (a mapping) or CSV (``folder,class``); a folder
    mapped to nothing (``null``, ``~`` or an empty cell) is left out of the run."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        raw = read_yaml(p, what="mapping file")
        if not isinstance(raw, dict):
            raise ConfigError(f"mapping file {str(p)!r} must hold a mapping folder: class")
        return {str(k): LEFT_OUT if v is None else str(v) for k, v in raw.items()}
    text = decode_text(p, what="mapping file")
    rows = csv.reader(text.splitlines())
    return {r[0].strip(): r[1].strip() for r in rows if len(r) >= 2 and r[0] != "folder"}


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


def labelled_patches(
    root: str | Path, classes: Sequence[str], mapping: Mapping[str, str] | None = None
) -> tuple[list[tuple[Path, str]], list[str]]:
    """(patches with their folder, the class of each): every folder must map to a class
    of the bag, checked before any model loads (a wrong folder name is refused at once)."""
    mapping = dict(mapping or {})
    items = [(p, f) for p, f in find_patches(root) if mapping.get(f, f) != LEFT_OUT]
    if not items:
        raise ConfigError(f"patch folder {str(root)!r}: the mapping leaves every folder out")
    labels = [mapping.get(f, f) for _, f in items]
    bad = sorted(set(labels) - set(classes))
    if bad:
        raise ConfigError(
            f"patch folders {bad} are not classes of the bag ({', '.join(classes)}); "
            "give a mapping file (folder: class)"
        )
    return items, labels


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
    classes = list(text.classes)
    items, labels = labelled_patches(root, classes, mapping)
    feats = encode_patches([p for p, _ in items], encoders, batch_size=batch_size)
    return PatchPredictions(
        classes=tuple(classes),
        images=tuple(p for p, _ in items),
        folders=tuple(f for _, f in items),
        labels=tuple(labels),
        probs=softmax(fused_logits(feats, text, spec)),
        features=feats,
    )


def open_patch(path: Path, *, max_megapixels: float = MAX_PATCH_MEGAPIXELS) -> Image.Image:
    """The patch as RGB; refused in one line naming the file when it is not an image,
    is damaged, or declares more than ``max_megapixels`` (checked from its header,
    before any pixel is decoded)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the header alone is read here; our own limit follows
    try:
        im = Image.open(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"patch {str(path)!r} cannot be read as an image ({exc or type(exc).__name__})"
        ) from exc
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        with im:
            w, h = im.size
            if w * h > max_megapixels * 1e6:
                raise ConfigError(
                    f"patch {str(path)!r} is {w} x {h} pixels, more than the {max_megapixels:g} megapixels "
                    "a patch may have (crop it into tiles)"
                )
            return im.convert("RGB")
    except ConfigError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        why = str(exc) or type(exc).__name__
        raise ConfigError(f"patch {str(path)!r} cannot be read as an image ({why})") from exc


def encode_patches(
    images: Sequence[Path],
    encoders: Sequence[LoadedEncoder],
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> dict[str, NDArray[np.float32]]:
    """L2-normalised features [n, D] of every image, per encoder (each its own transform)."""
    import torch  # lazily: the folder checks before encoding stay light

    transforms = {e.name: e.pil_transform() for e in encoders}
    out: dict[str, list[NDArray[np.float32]]] = {e.name: [] for e in encoders}
    for i in range(0, len(images), batch_size):
        imgs = [open_patch(p) for p in images[i : i + batch_size]]
        for e in encoders:
            x = torch.stack([transforms[e.name](im) for im in imgs]).to(e.device)
            out[e.name].append(e.encode_image(x).cpu().numpy().astype(np.float32))
        if progress is not None:
            progress(len(imgs))
    return {n: np.concatenate(v) for n, v in out.items()}
