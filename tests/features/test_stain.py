"""Stain normalisation: equal to independent reference computations on real H&E tiles,
removes a planted stain shift, never makes NaN, and is part of the encode settings."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from histoalign_wsi.errors import ConfigError
from histoalign_wsi.features.stain import StainNormalizer, StainReference
from histoalign_wsi.slides.synthetic import restain

SMALL = Path(__file__).parents[1] / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    """224 px tiles of the real slide with at least half tissue (NHWC uint8)."""
    import openslide

    s = openslide.OpenSlide(str(SMALL))
    img = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    out = [
        img[y : y + 224, x : x + 224]
        for y in range(0, img.shape[0] - 224, 224)
        for x in range(0, img.shape[1] - 224, 224)
        if (img[y : y + 224, x : x + 224].mean(axis=2) < 200).mean() >= 0.5
    ]
    return np.stack(out[:16])


def _run(method: str, t: np.ndarray, **kw: int) -> tuple[np.ndarray, StainNormalizer]:
    n = StainNormalizer(method, StainReference.load("builtin"), **kw)
    out = n(torch.from_numpy(np.ascontiguousarray(t)).permute(0, 3, 1, 2).contiguous())
    return out.permute(0, 2, 3, 1).numpy(), n


def _numpy_macenko(img: np.ndarray, he_ref: np.ndarray, max_ref: np.ndarray) -> np.ndarray:
    """Macenko et al. 2009 as torchstain's NumPy normaliser writes it (Io 240, alpha 1,
    beta 0.15), rounded instead of truncated: the independent reference."""
    io, alpha, beta = 240, 1, 0.15
    x = img.reshape(-1, 3).astype(float)
    od = -np.log((x + 1) / io)
    odhat = od[~np.any(od < beta, axis=1)]
    _, vecs = np.linalg.eigh(np.cov(odhat.T))
    that = odhat.dot(vecs[:, 1:3])
    phi = np.arctan2(that[:, 1], that[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v_min = vecs[:, 1:3].dot(np.array([(np.cos(lo), np.sin(lo))]).T)
    v_max = vecs[:, 1:3].dot(np.array([(np.cos(hi), np.sin(hi))]).T)
    he = (
        np.array((v_min[:, 0], v_max[:, 0])).T
        if v_min[0] > v_max[0]
        else np.array((v_max[:, 0], v_min[:, 0])).T
    )
    c = np.linalg.lstsq(he, od.T, rcond=None)[0]
    max_c = np.array([np.percentile(c[0, :], 99), np.percentile(c[1, :], 99)])
    c2 = c / (max_c / max_ref)[:, None]
    out = np.clip(io * np.exp(-he_ref.dot(c2)), 0, 255)
    return np.round(out.T.reshape(img.shape)).astype(np.uint8)


def test_macenko_equals_an_independent_numpy_computation(tiles: np.ndarray) -> None:
    ref = StainReference.load("builtin")
    want = np.stack([_numpy_macenko(t, np.array(ref.he), np.array(ref.max_c)) for t in tiles])
    got, norm = _run("macenko", tiles)
    d = np.abs(got.astype(int) - want.astype(int))
    assert norm.passed_through == 0 and d.max() <= 1 and d.mean() < 0.01


def test_reinhard_equals_scikit_image_lab_statistics(tiles: np.ndarray) -> None:
    from skimage.color import lab2rgb, rgb2lab

    ref = StainReference.load("builtin")
    want = []
    for t in tiles:
        lab = rgb2lab(t / 255.0)
        flat = lab.reshape(-1, 3)
        norm = (lab - flat.mean(0)) / flat.std(0, ddof=1) * np.array(ref.lab_std) + np.array(ref.lab_mean)
        with warnings.catch_warnings():  # lab2rgb warns when it clips negative Z
            warnings.simplefilter("ignore")
            want.append(np.clip(np.round(lab2rgb(norm) * 255), 0, 255))
    got, _ = _run("reinhard", tiles)
    d = np.abs(got.astype(float) - np.stack(want))
    assert np.percentile(d, 99.9) <= 1 and d.mean() < 0.05


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_planted_stain_shift_is_mostly_removed(tiles: np.ndarray, method: str) -> None:
    """The same tissue under another site's stain (optical density scaled per channel):
    after normalisation the two are much closer than before."""
    shifted = np.stack([restain({0: t}, (1.6, 0.9, 0.6))[0] for t in tiles])
    before = np.abs(tiles.astype(float) - shifted).mean()
    a, _ = _run(method, tiles)
    b, _ = _run(method, shifted)
    after = np.abs(a.astype(float) - b).mean()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_white_black_and_flat_tiles_pass_through_unchanged(tiles: np.ndarray, method: str) -> None:
    odd = np.stack([np.full((224, 224, 3), v, np.uint8) for v in (255, 0, 200)] + [tiles[0]])
    odd[2, :, :, 1] = 190  # flat, one colour
    got, norm = _run(method, odd)
    assert np.isfinite(got).all() and norm.passed_through == 3
    assert (got[:3] == odd[:3]).all() and not (got[3] == odd[3]).all()


def test_fit_stride_two_reads_a_quarter_and_stays_close(tiles: np.ndarray) -> None:
    full, _ = _run("macenko", tiles)
    quarter, _ = _run("macenko", tiles, fit_stride=2)
    assert np.abs(full.astype(int) - quarter.astype(int)).mean() < 3


def test_a_reference_image_and_its_errors(tmp_path: Path, tiles: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.concatenate(list(tiles[:4]), axis=1)).save(tmp_path / "ref.png")
    ref = StainReference.load(str(tmp_path / "ref.png"))
    assert ref.source.endswith("ref.png") and len(ref.he) == 3 and all(v > 0 for v in ref.max_c)
    with pytest.raises(ConfigError, match="no such image"):
        StainReference.load(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="cannot be read as an image"):
        StainReference.load(str(tmp_path / "bad.png"))
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(tmp_path / "white.png")
    with pytest.raises(ConfigError, match="too little stained tissue"):
        StainReference.load(str(tmp_path / "white.png"))


def test_stain_is_an_encode_setting_and_nothing_upstream(tmp_path: Path) -> None:
    from histoalign_wsi.config import load_config
    from histoalign_wsi.provenance import Expected, HashCache, settings_hash

    base = load_config(overrides={"encoders": ["demo"]})
    mac = load_config(overrides={"encoders": ["demo"], "stain": {"method": "macenko"}})
    assert settings_hash(base, "encode") != settings_hash(mac, "encode")
    assert settings_hash(base, "prepare") == settings_hash(mac, "prepare")
    # `none` writes what stores made before the setting existed wrote: they stay current
    raw = {k: v for k, v in base.raw.items() if k != "stain"}
    from histoalign_wsi.provenance import output_settings

    assert output_settings(raw, "encode") == output_settings(base.raw, "encode")
    img = tmp_path / "ref.png"
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(img)
    own = load_config(overrides={"encoders": ["demo"], "stain": {"method": "macenko", "reference": str(img)}})
    first = Expected(own, HashCache()).encode("t")
    Image.fromarray(np.full((8, 8, 3), 121, np.uint8)).save(img)  # the image edited in place
    assert Expected(own, HashCache()).encode("t") != first
