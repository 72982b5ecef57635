"""Feature stores with planted signals: tile features placed near chosen class text
embeddings (plus noise), without any real weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from histoalign_wsi.features.store import create_features, open_store, write_tiling
from histoalign_wsi.slides.tiling import ScaleGrid, Tiling
from histoalign_wsi.zeroshot.prediction import Prediction
from histoalign_wsi.zeroshot.text import EncoderText, TextEmbeddings
from histoalign_wsi.zeroshot.tile_scores import class_columns

D = 32
SHA = "f" * 64


def unit(x: NDArray[np.float64]) -> NDArray[np.float32]:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_text(
    classes: Sequence[str] = ("TUM", "STR", "NORM"),
    *,
    per_class: int = 8,
    seed: int = 0,
    encoder: str = "demo",
    sha: str = SHA,
    scale: float = 50.0,
) -> TextEmbeddings:
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(len(classes), D)))
    emb, cls = [], []
    for k in range(len(classes)):
        emb.append(unit(centres[k] + 0.3 * rng.normal(size=(per_class, D)) / np.sqrt(D)))
        cls += [k] * per_class
    et = EncoderText(
        encoder, np.concatenate(emb), np.array(cls, np.int32), tuple(["name"] * len(cls)), sha, scale, False
    )
    colors = {c: (40 * i % 255, 100, 200) for i, c in enumerate(classes)}
    return TextEmbeddings("planted", "0" * 16, tuple(classes), colors, "histoalign", {encoder: et})


def class_vector(text: TextEmbeddings, k: int, encoder: str = "demo") -> NDArray[np.float32]:
    t = text.encoders[encoder]
    return unit(t.emb[t.cls == k].mean(axis=0))


def planted_features(
    text: TextEmbeddings,
    n: int,
    mix: Mapping[int, tuple[float, float]],
    *,
    seed: int,
    noise: float = 1.0,
    encoder: str = "demo",
) -> NDArray[np.float32]:
    """n tiles: for each class k, a fraction of tiles at ``signal * class_vector + noise``;
    the rest are pure noise (neutral)."""
    rng = np.random.default_rng(seed)
    x = noise * rng.normal(size=(n, D)) / np.sqrt(D)
    start = 0
    for k, (frac, signal) in mix.items():
        m = round(frac * n)
        x[start : start + m] += signal * class_vector(text, k, encoder)
        start += m
    return unit(x)


def build_store(
    path: Path,
    feats: Mapping[float, NDArray[np.float32]],
    *,
    slide_id: str = "s",
    encoder: str = "demo",
    sha: str = SHA,
    order_seed: int | None = None,
) -> Path:
    """A feature store whose scale ``mpp`` has ``feats[mpp]`` (rows laid on a nested grid)."""
    mpps = sorted(feats)
    grids = []
    for m in mpps:
        f = round(m / mpps[0])
        size = 448 * f
        n = len(feats[m])
        side = 64 // f
        coords = np.array([((i % side) * size, (i // side) * size) for i in range(n)], np.int32).reshape(
            -1, 2
        )
        grids.append(ScaleGrid(m, size, coords, np.ones(n, np.float32)))
    for j, g in enumerate(grids):
        for c in grids[j + 1 :]:
            lookup = {tuple(xy): i for i, xy in enumerate(c.coords.tolist())}
            g.parents[c.name] = np.array(
                [
                    lookup.get(((x // c.size0) * c.size0, (y // c.size0) * c.size0), -1)
                    for x, y in g.coords.tolist()
                ],
                np.int32,
            )
    tiling = Tiling(0.25, (64 * 448, 64 * 448), 224, 0.25, tuple(grids))
    write_tiling(
        path,
        tiling,
        slide_attrs={"id": slide_id, "path": f"{slide_id}.svs", "level0_dims": [28672, 28672], "mpp": 0.25},
        tissue_attrs={},
        config_hash="x",
    )
    import zarr

    dim = next(iter(feats.values())).shape[1]
    root = zarr.open_group(path, mode="r+")
    for m, g in zip(mpps, grids, strict=True):
        arr = create_features(
            root[f"scales/{g.name}/features"],
            encoder,
            len(g),
            dim,  # type: ignore[arg-type]
            {"encoder": encoder, "weights_sha256": sha, "embedding_dim": dim, "normalized": True},
        )
        if len(g):
            arr[...] = feats[m].astype(np.float16)
    assert open_store(path).validate() == []
    return path


def planted_table(
    scale: str,
    mpp: float,
    coords: NDArray[np.int32],
    size0: int,
    probs: NDArray[np.floating],
    classes: Sequence[str],
) -> pd.DataFrame:
    """A tile-score table of one scale with planted probabilities (logits = log p)."""
    df = pd.DataFrame(
        {
            "scale": scale,
            "mpp": mpp,
            "x": coords[:, 0],
            "y": coords[:, 1],
            "size0": size0,
            "tissue_fraction": np.ones(len(coords), np.float32),
        }
    )
    p = np.asarray(probs, np.float32).reshape(-1, len(classes))
    probs_df = pd.DataFrame(p, columns=class_columns(classes, "prob"))
    logits_df = pd.DataFrame(np.log(np.maximum(p, 1e-9)), columns=class_columns(classes, "logit"))
    return pd.concat([df, probs_df, logits_df], axis=1)


def make_prediction(
    slide_id: str, classes: Sequence[str], colors: Mapping[str, tuple[int, int, int]], **kw: Any
) -> Prediction:
    """A prediction with neutral defaults for every field not given."""
    fields: dict[str, Any] = {
        "slide_id": slide_id,
        "slide_path": f"{slide_id}.svs",
        "classes": tuple(classes),
        "colors": dict(colors),
        "status": "ok",
        "predicted_class": classes[0],
        "probabilities": {c: 1 / len(classes) for c in classes},
        "prompt_bag": {"name": "planted", "hash": "0"},
        "encoders": [],
        "untrained": False,
        "alignment": {"rule": "centroid"},
        "pooling": {"method": "topk"},
        "calibrated": False,
        "per_scale": {},
    }
    return Prediction(**(fields | kw))


def synthetic_cohort(res: Path, n: int) -> None:
    """A results folder of ``n`` slides' predictions (9 classes, JSON and the cohort
    table) whose heatmaps are links to one small image (links cost nothing): what the
    report reads, at any cohort size."""
    from PIL import Image

    classes = [f"class {k} é" for k in range(9)]
    colors = {c: (20 * k, 100, 200) for k, c in enumerate(classes)}
    (res / "predictions").mkdir(parents=True)
    img = res / "one.webp"
    Image.fromarray(np.full((96, 128, 3), 120, np.uint8)).save(img)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        sid = f"slide {i:05d}"
        p = rng.dirichlet(np.ones(9))
        pred = classes[int(p.argmax())]
        make_prediction(
            sid,
            classes,
            colors,
            predicted_class=pred,
            probabilities=dict(zip(classes, map(float, p), strict=True)),
            extra={"region_area_mm2": {pred: float(i % 7)}},
        ).write(res / "predictions" / f"{sid}.json")
        hm = res / "heatmaps" / sid
        hm.mkdir(parents=True)
        for name in ("argmax_thumb.webp", "argmax.webp"):
            (hm / name).symlink_to(img)
        rows.append(
            {"slide_id": sid, "predicted_class": pred, "status": "ok", "untrained": True, "n_tiles": i % 50}
        )
    pd.DataFrame(rows).to_csv(res / "predictions.csv", index=False)


def site_offset_cohort(
    folder: Path, text: TextEmbeddings, *, per_site: int = 9, push: float = 0.9, seed: int = 0
) -> tuple[list[Path], dict[str, str], dict[str, str]]:
    """Stores of three sites (A, B, C) whose every tile is pushed toward one class per
    site (A: class 0, B: 1, C: 2): a planted per-site logit offset over real class
    signal. Returns (stores, slide -> site, slide -> label)."""
    classes = text.classes
    rng = np.random.default_rng(seed)
    stores, sites, labels = [], {}, {}
    for b, site in enumerate(("A", "B", "C")):
        for i in range(per_site):
            k = i % len(classes)
            x = planted_features(text, 40, {k: (1.0, 1.2)}, seed=int(rng.integers(1 << 30)))
            x = unit(x + push * class_vector(text, b))
            sid = f"{site}{i}"
            stores.append(build_store(folder / f"{sid}.zarr", {0.5: x}, slide_id=sid))
            sites[sid], labels[sid] = site, classes[k]
    return stores, sites, labels
