"""Cohort calibration: the per-class mean tile logit over every tile of the cohort, per
scale, computed out of core with dask arrays over the zarr feature stores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dask.array as da
import numpy as np

from .alignment import class_logits, fuse_encoders
from .config import Config
from .evaluation import write_json
from .store import FeatureStore, open_store
from .text import EncoderText, TextEmbeddings
from .tiling import scale_name

__all__ = ["cohort_offsets", "write_calibration"]


def cohort_offsets(stores: Sequence[str | Path], text: TextEmbeddings, cfg: Config) -> dict[str, list[float]]:
    """``{scale: [mean logit per class]}``; slides are streamed chunk by chunk, never loaded whole."""
    k = len(text.classes)
    opened: list[FeatureStore] = [open_store(p) for p in stores]
    out: dict[str, list[float]] = {}
    for s in (scale_name(m) for m in cfg.tiling.scales_mpp):
        per_enc = {}
        for name, t in text.encoders.items():
            arrays = [da.from_zarr(st.features_array(s, name)) for st in opened if len(st.scale(s).coords)]
            if not arrays:
                continue

            def block_logits(x: np.ndarray, t: EncoderText = t) -> np.ndarray:
                return class_logits(
                    np.asarray(x, np.float32),
                    t,
                    k,
                    rule=cfg.alignment.rule,
                    temperature=cfg.alignment.temperature,
                    topk=cfg.alignment.topk,
                )

            feats = da.concatenate(arrays, axis=0)
            per_enc[name] = feats.map_blocks(block_logits, dtype=np.float32, chunks=(feats.chunks[0], (k,)))
        if not per_enc:
            continue
        fused = fuse_encoders(per_enc, cfg.encoder_weights)
        out[s] = [float(v) for v in da.asarray(fused).mean(axis=0).compute()]
    return out


def write_calibration(
    stores: Sequence[str | Path], text: TextEmbeddings, cfg: Config, out: str | Path
) -> Path:
    return write_json(cohort_offsets(stores, text, cfg), out)
