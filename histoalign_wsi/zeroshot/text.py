"""Text embeddings of a prompt bag per encoder, cached on disk by weights hash and bag
content hash, and saved as one ``.npz`` the scoring stage reads. Every cache entry and
every saved file is checked when read (shape, finite, unit norm): a damaged cache entry is
recomputed, naming it; a damaged ``.npz`` is refused, naming it."""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    provenance: Mapping[str, Any] | None = None  # what they were made from (provenance.py)
    ordered: bool = False  # the bag's classes are ordered (grades)
    other: tuple[str, ...] = ()  # "other tissue" classes: tile decisions only

    @property
    def decision(self) -> list[int]:
        """Indices of the classes a slide can be predicted as."""
        return [k for k, c in enumerate(self.classes) if c not in self.other]


#: how far from 1 an embedding's norm may be (float16 stores round to ~1e-3)
NORM_TOL = 1e-2


def embedding_problem(emb: Any, *, rows: int | None = None, dim: int | None = None) -> str | None:
    """Why ``emb`` is not a [rows, dim] block of finite unit vectors (None: it is)."""
    if not isinstance(emb, np.ndarray) or emb.ndim != 2:
        return "not a 2-D array"
    if rows is not None and emb.shape[0] != rows:
        return f"{emb.shape[0]} rows where {rows} prompts were expected"
    if dim is not None and emb.shape[1] != dim:
        return f"width {emb.shape[1]} where the encoder gives {dim}"
    if not np.issubdtype(emb.dtype, np.floating):
        return f"dtype {emb.dtype} is not floating point"
    if not np.isfinite(emb).all():
        return "holds NaN or infinite values"
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    if len(norms) and np.abs(norms - 1.0).max() > NORM_TOL:
        return f"rows are not unit vectors (norms {norms.min():.3g} to {norms.max():.3g})"
    return None


def _embed(enc: LoadedEncoder, texts: Sequence[str], batch: int = 256) -> NDArray[np.float32]:
    out = [enc.encode_text(texts[i : i + batch]).cpu().numpy() for i in range(0, len(texts), batch)]
    return np.concatenate(out).astype(np.float32)


def embed_bag(
    bag: PromptBag,
    encoders: Sequence[LoadedEncoder],
    *,
    protocol: str = "histoalign",
    cache_dir: str | Path | None = None,
    recompute: bool = False,
) -> TextEmbeddings:
    """Embed every prompt of ``bag`` (as ``protocol`` makes them) with each encoder's own
    text tower (cached by weights, bag content and protocol; ``recompute`` ignores the
    cache and rewrites its entries)."""
    texts, cls, groups = bag.texts(protocol=protocol)
    per: dict[str, EncoderText] = {}
    for enc in encoders:
        cached = None
        if cache_dir is not None:
            key = f"{enc.name}-{enc.weights_sha256[-16:]}-{bag.content_hash}-{protocol}.npy"
            cached = Path(cache_dir) / key
        emb = _from_cache(cached, len(texts), enc.entry.embed_dim) if cached and not recompute else None
        if emb is None:
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
    return TextEmbeddings(
        bag.name,
        bag.content_hash,
        tuple(bag.class_names),
        bag.colors(),
        protocol,
        per,
        ordered=bag.ordered,
        other=bag.other_classes,
    )


def _from_cache(path: Path, rows: int, dim: int) -> NDArray[np.float32] | None:
    """A cache entry, when it is whole; a damaged one is named and recomputed."""
    if not path.is_file():
        return None
    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        log.warning("text-embedding cache entry %s is unreadable (%s); recomputing it", path, exc)
        return None
    problem = embedding_problem(emb, rows=rows, dim=dim)
    if problem is not None:
        log.warning("text-embedding cache entry %s is damaged (%s); recomputing it", path, problem)
        return None
    log.debug("text embeddings from cache %s", path)
    return np.asarray(emb, dtype=np.float32)


def save_text(te: TextEmbeddings, path: str | Path) -> Path:
    meta = {
        "provenance": dict(te.provenance) if te.provenance is not None else None,
        "ordered": te.ordered,
        "other": list(te.other),
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
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise StoreError(f"text embeddings {str(path)!r} are not a readable .npz: {exc}") from exc
    try:
        meta = json.loads(str(z["meta"]))
        encs = _read_encoders(z, meta, str(path))
        colors = {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in meta["colors"].items()}
        te = TextEmbeddings(
            meta["bag_name"],
            meta["bag_hash"],
            tuple(meta["classes"]),
            colors,
            str(meta["protocol"]),
            encs,
            meta.get("provenance"),
            bool(meta.get("ordered", False)),
            tuple(meta.get("other", ())),
        )
    except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise StoreError(f"text embeddings {str(path)!r} are damaged or not ours: {exc}") from exc
    return te


def _read_encoders(z: Any, meta: Mapping[str, Any], path: str) -> dict[str, EncoderText]:
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
    n_classes = len(meta["classes"])
    for n, e in encs.items():
        problem = embedding_problem(e.emb, rows=len(e.cls))
        bad_index = e.cls.ndim != 1 or (len(e.cls) and not 0 <= e.cls.min() <= e.cls.max() < n_classes)
        if problem is None and bad_index:
            problem = f"class indices outside the {n_classes} classes"
        if problem is None and len(set(e.cls.tolist())) != n_classes:
            problem = "a class has no prompt"
        if problem is not None:
            raise StoreError(f"text embeddings {path!r}: encoder {n!r}: {problem}")
    return encs


def text_for(cfg: Config, text_path: str | Path | None, cache: str | Path | None) -> TextEmbeddings:
    """Text embeddings from ``text_path``, or the configured bag embedded now by the
    configured encoders (as ``cfg.protocol`` makes its prompts; cached in ``cache``)."""
    if text_path is not None:
        return load_text(text_path)  # no model, no torch: the scoring stages stay light
    from ..features.adapters import load_encoders, resolve_device
    from .prompts import load_bag

    encs = load_encoders(cfg, device=resolve_device(cfg.device))
    return embed_bag(load_bag(cfg.prompt_bag), encs, protocol=cfg.protocol, cache_dir=cache)
