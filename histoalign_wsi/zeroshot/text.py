"""Text embeddings of a prompt bag per encoder, cached on disk by weights hash and bag
content hash, and saved as one ``.npz`` the scoring stage reads."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from .._atomic import atomic_file
from ..config import Config
from ..errors import StoreError
from .prompts import PromptBag

if TYPE_CHECKING:  # the stages that only read text embeddings (score, calibrate) import no torch
    from ..features.adapters import LoadedEncoder

__all__ = ["EncoderText", "TextEmbeddings", "embed_bag", "load_text", "save_text", "text_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderText:
    encoder: str
    emb: NDArray[np.float32]  # [P, D], L2-normalised
    cls: NDArray[np.int32]  # [P] class index per prompt
    groups: tuple[str, ...]
    weights_sha256: str
    logit_scale: float
    untrained: bool


@dataclass(frozen=True)
class TextEmbeddings:
    bag_name: str
    bag_hash: str
    classes: tuple[str, ...]
    colors: dict[str, tuple[int, int, int]]
    protocol: str  # how the bag became prompts: "histoalign" or "conch"
    encoders: dict[str, EncoderText]


def _embed(enc: LoadedEncoder, texts: Sequence[str], batch: int = 256) -> NDArray[np.float32]:
    out = [enc.encode_text(texts[i : i + batch]).cpu().numpy() for i in range(0, len(texts), batch)]
    return np.concatenate(out).astype(np.float32)


def embed_bag(
    bag: PromptBag,
    encoders: Sequence[LoadedEncoder],
    *,
    protocol: str = "histoalign",
    cache_dir: str | Path | None = None,
) -> TextEmbeddings:
    """Embed every prompt of ``bag`` (as ``protocol`` makes them) with each encoder's own
    text tower (cached by weights, bag content and protocol)."""
    texts, cls, groups = bag.texts(protocol=protocol)
    per: dict[str, EncoderText] = {}
    for enc in encoders:
        cached = None
        if cache_dir is not None:
            key = f"{enc.name}-{enc.weights_sha256[-16:]}-{bag.content_hash}-{protocol}.npy"
            cached = Path(cache_dir) / key
        if cached is not None and cached.is_file():
            emb = np.load(cached)
            log.debug("text embeddings of %s from cache %s", enc.name, cached)
        else:
            emb = _embed(enc, texts)
            if cached is not None:
                with atomic_file(cached) as tmp, tmp.open("wb") as fh:
                    np.save(fh, emb)
        per[enc.name] = EncoderText(
            encoder=enc.name,
            emb=emb,
            cls=np.asarray(cls, np.int32),
            groups=tuple(groups),
            weights_sha256=enc.weights_sha256,
            logit_scale=enc.logit_scale,
            untrained=enc.entry.untrained,
        )
    return TextEmbeddings(bag.name, bag.content_hash, tuple(bag.class_names), bag.colors(), protocol, per)


def save_text(te: TextEmbeddings, path: str | Path) -> Path:
    meta = {
        "bag_name": te.bag_name,
        "bag_hash": te.bag_hash,
        "classes": list(te.classes),
        "colors": {k: list(v) for k, v in te.colors.items()},
        "protocol": te.protocol,
        "encoders": {
            n: {
                "weights_sha256": e.weights_sha256,
                "logit_scale": e.logit_scale,
                "untrained": e.untrained,
                "groups": list(e.groups),
            }
            for n, e in te.encoders.items()
        },
    }
    arrays: dict[str, NDArray[np.generic]] = {"meta": np.array(json.dumps(meta))}
    for n, e in te.encoders.items():
        arrays[f"{n}.emb"] = e.emb
        arrays[f"{n}.cls"] = e.cls
    with atomic_file(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return Path(path)


def load_text(path: str | Path) -> TextEmbeddings:
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise StoreError(f"text embeddings {str(path)!r} do not exist") from exc
    meta = json.loads(str(z["meta"]))
    encs = {
        n: EncoderText(
            n,
            z[f"{n}.emb"],
            z[f"{n}.cls"],
            tuple(m["groups"]),
            m["weights_sha256"],
            float(m["logit_scale"]),
            bool(m["untrained"]),
        )
        for n, m in meta["encoders"].items()
    }
    colors = {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in meta["colors"].items()}
    return TextEmbeddings(
        meta["bag_name"], meta["bag_hash"], tuple(meta["classes"]), colors, str(meta["protocol"]), encs
    )


def text_for(cfg: Config, text_path: str | Path | None, cache: str | Path | None) -> TextEmbeddings:
    """Text embeddings from ``text_path``, or the configured bag embedded now by the
    configured encoders (as ``cfg.protocol`` makes its prompts; cached in ``cache``)."""
    if text_path is not None:
        return load_text(text_path)  # no model, no torch: the scoring stages stay light
    from ..features.adapters import load_encoders, resolve_device
    from .prompts import load_bag

    encs = load_encoders(cfg, device=resolve_device(cfg.device))
    return embed_bag(load_bag(cfg.prompt_bag), encs, protocol=cfg.protocol, cache_dir=cache)
