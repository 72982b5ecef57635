"""Image features and text embeddings must share one space: an encoder whose image
projection is dropped is refused at load, and features that are not projected, or not of
the text's width, are refused at score, each in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import zarr

from histoalign_wsi.config import load_config
from histoalign_wsi.errors import EncoderError, StoreError
from histoalign_wsi.features import adapters
from histoalign_wsi.features.registry import load_registry
from histoalign_wsi.features.store import open_store
from histoalign_wsi.zeroshot.scoring import score_store
from tests.planting import build_store, make_text, planted_features


def _small_demo(embed: int, width: int):  # type: ignore[no-untyped-def]
    demo = load_registry()["demo"]
    cfg = dict(demo.model_cfg or {})
    cfg["embed_dim"] = embed
    cfg["vision_cfg"] = dict(cfg["vision_cfg"]) | {"width": width}
    cfg["text_cfg"] = dict(cfg["text_cfg"])
    return dataclasses.replace(demo, embed_dim=embed, model_cfg=cfg)


def test_an_encoder_without_its_image_projection_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _small_demo(32, 48)
    enc = adapters.load_encoder(entry)  # the projection applied: loads
    assert enc.attrs()["space"] == {
        "projected": True,
        "dim": 32,
        "weights_sha256": enc.weights_sha256,
        "unit_norm": True,
    }
    real = adapters._demo

    def dropped(e, dev):  # type: ignore[no-untyped-def]
        loaded = real(e, dev)
        loaded.model.visual.proj = None  # the trunk's pooled features, as TRIDENT's conch_v1 stores them
        return loaded

    monkeypatch.setattr(adapters, "_demo", dropped)
    with pytest.raises(
        EncoderError, match=r"image features have width 48 but text embeddings 32.*projection"
    ):
        adapters.load_encoder(entry)


def test_features_outside_the_text_space_are_refused_at_score(tmp_path: Path) -> None:
    text = make_text()
    cfg = load_config(overrides={"encoders": ["demo"], "scales_mpp": [0.5]})
    good = build_store(tmp_path / "good.zarr", {0.5: planted_features(text, 16, {0: (1.0, 1.0)}, seed=0)})
    assert score_store(open_store(good), text, cfg).prediction.status == "ok"
    rng = np.random.default_rng(0)
    wide = rng.normal(size=(16, 48))
    wide = (wide / np.linalg.norm(wide, axis=1, keepdims=True)).astype(np.float32)
    bad = build_store(tmp_path / "wide.zarr", {0.5: wide}, slide_id="wide")
    with pytest.raises(StoreError, match=r"width 48 but the text embeddings 32: not one image-text space"):
        score_store(open_store(bad), text, cfg)
    arr = zarr.open_group(good, mode="r+")["scales/0.50mpp/features/demo"]
    arr.attrs["space"] = {"projected": False, "dim": 32}
    with pytest.raises(StoreError, match="not projected into the joint image-text space"):
        score_store(open_store(good), text, cfg)
