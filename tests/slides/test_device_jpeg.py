"""Native JPEG tiles decoded by torchvision on the device (nvJPEG on CUDA): the same
assembly runs on the CPU device here; the CUDA test runs where a GPU is lent."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from histoalign_wsi.cli import main
from histoalign_wsi.features import pyramids
from histoalign_wsi.features.store import open_store
from histoalign_wsi.slides import device_jpeg
from histoalign_wsi.slides.device_jpeg import decode_on_device, device_agrees, encoded_region
from histoalign_wsi.slides.reader import open_slide

from ..conftest import CMU

BOXES = [
    ("cmu", 0, (700, 1210, 700, 500)),  # across 240-px tiles with shared tables (RGB streams)
    ("cmu", 0, (1920, 2640, 400, 400)),  # past the right and bottom edges: white beyond
    ("planted", 0, (1000, 900, 1300, 700)),  # YCbCr streams
    ("planted", 1, (0, 0, 2048, 1536)),
]


def _compare(
    path: Path, level: int, box: tuple[int, int, int, int], device: str
) -> tuple[np.ndarray, np.ndarray]:
    with open_slide(path) as s:
        nj = s.native_jpeg()
        assert nj is not None
        ref = nj.read_region(level, *box)
        got = decode_on_device(encoded_region(nj, level, *box), device)
    assert got.device.type == torch.device(device).type and got.dtype == torch.uint8
    return got.permute(1, 2, 0).cpu().numpy(), ref


def test_regions_decoded_together_equal_each_decoded_alone(planted: tuple[Path, Path]) -> None:
    """One batched call over several regions (different sizes, a region of no tiles in
    the middle) gives each region exactly what decoding it alone gives."""
    from histoalign_wsi.slides.device_jpeg import EncodedRegion, decode_regions

    with open_slide(planted[0]) as s:
        nj = s.native_jpeg()
        assert nj is not None
        regions = [
            encoded_region(nj, 0, 1000, 900, 1300, 700),
            EncodedRegion(5, 4, (), ()),
            encoded_region(nj, 1, 0, 0, 600, 500),
        ]
    together = decode_regions(regions, "cpu")
    alone = [decode_on_device(r, "cpu") for r in regions]
    assert [tuple(t.shape) for t in together] == [(3, 700, 1300), (3, 4, 5), (3, 500, 600)]
    assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))
    assert bool((together[1] == 255).all()) and not torch.equal(together[0][:, :500, :600], together[2])


@pytest.mark.parametrize(("which", "level", "box"), BOXES)
def test_device_assembly_matches_the_cpu_path(
    which: str, level: int, box: tuple[int, int, int, int], planted: tuple[Path, Path]
) -> None:
    got, ref = _compare(CMU if which == "cmu" else planted[0], level, box, "cpu")
    assert got.shape == ref.shape == (box[3], box[2], 3)
    assert ref.std() > 5
    # both are libjpeg decoders: the same pixels, a tile misplaced by one pixel is not
    assert np.abs(got.astype(np.int16) - ref).mean() <= 0.5
    if which == "cmu" and box[0] + box[2] > 2220:  # beyond the 2220-px-wide image: white
        assert (got[:, 2220 - box[0] :] == 255).all() and (got[:, : 2220 - box[0]] < 255).any()
    else:
        assert np.abs(got[1:, 1:].astype(np.int16) - ref[:-1, :-1]).mean() > 2


def test_a_decoder_that_disagrees_sends_the_slide_back_to_the_cpu(
    monkeypatch: pytest.MonkeyPatch, planted: tuple[Path, Path]
) -> None:
    with open_slide(CMU) as s:
        nj = s.native_jpeg()
        assert nj is not None
        ok, why = device_agrees(nj, 0, "cpu")
        assert ok, why
        real = device_jpeg._decode
        # a decoder that ignores the Adobe RGB marker reads the channels in another order
        monkeypatch.setattr(device_jpeg, "_decode", lambda st, dev: [t.flip(0) for t in real(st, dev)])
        ok, why = device_agrees(nj, 0, "cpu")
        assert not ok and "differ from libjpeg-turbo" in why and "over 8 tiles" in why

        def refuse(st: object, dev: object) -> list[torch.Tensor]:
            raise RuntimeError("unsupported marker")

        monkeypatch.setattr(device_jpeg, "_decode", refuse)
        ok, why = device_agrees(nj, 0, "cpu")
        assert not ok and "unsupported marker" in why


def test_the_check_samples_tiles_over_the_level_and_ignores_padding(
    monkeypatch: pytest.MonkeyPatch, planted: tuple[Path, Path]
) -> None:
    """Eight tiles spread over the level are compared, on the pixels inside the image: a
    decoder that differs only in the padding of edge tiles agrees; one that is wrong on
    one tile in eight, by 20 grey levels, does not."""
    real = device_jpeg._decode
    with open_slide(CMU) as s:  # 2220 px wide in 240-px tiles: the right column is padded
        nj = s.native_jpeg()
        assert nj is not None
        lv = nj.levels[0]
        edge = [i for i in range(len(lv.counts)) if (i % lv.tiles_across + 1) * lv.tile_w > lv.width]
        pad = (lv.tiles_across * lv.tile_w) - lv.width
        assert edge and pad > 0

        def padding_differs(st: tuple[bytes, ...], dev: object) -> list[torch.Tensor]:
            out = [t.clone() for t in real(st, dev)]
            for t in out:
                t[:, :, -pad:] = 0  # garbage beyond the image, in every edge tile
            return out

        monkeypatch.setattr(device_jpeg, "_sample", lambda lv, n: edge[:8])
        monkeypatch.setattr(device_jpeg, "_decode", padding_differs)
        ok, why = device_agrees(nj, 0, "cpu")
        assert ok, why
        monkeypatch.undo()
    with open_slide(planted[0]) as s:
        nj = s.native_jpeg()
        assert nj is not None
        lv = nj.levels[0]
        picks = device_jpeg._sample(lv, device_jpeg.AGREE_TILES)
        assert len(picks) == 8 and len(set(picks)) == 8
        assert picks[-1] - picks[0] > len(lv.counts) // 2  # spread, not the first eight

        def one_wrong(st: tuple[bytes, ...], dev: object) -> list[torch.Tensor]:
            out = real(st, dev)
            out[3] = (out[3].short() - 20).clamp(0, 255).to(torch.uint8)
            return out

        monkeypatch.setattr(device_jpeg, "_decode", one_wrong)
        ok, why = device_agrees(nj, 0, "cpu")
        assert not ok and "over 8 tiles" in why


def _encode(tiles: Path, slide: Path, out: Path, where: str) -> Path:
    # the CPU device on every machine (a GPU machine would otherwise pick CUDA): these two
    # tests check the assembly and the fallback, the CUDA test below checks nvJPEG itself
    opts = ["--set", f"encode.device_jpeg={where}", "--set", "encode.batch_size=32", "--set", "device=cpu"]
    assert main(["encode", str(tiles), "--slide", str(slide), "--out", str(out), *opts]) == 0
    return out


def test_encode_decodes_on_the_device_when_asked(
    tmp_path: Path,
    planted: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slide = planted[0]
    tiles = tmp_path / "tiles.zarr"
    assert main(["tile", str(slide), "--out", str(tiles)]) == 0
    calls: list[list[int]] = []  # per batched call, the tiles of each region
    real = device_jpeg.decode_regions

    def spy(regions: list[device_jpeg.EncodedRegion], device: torch.device | str) -> list[torch.Tensor]:
        calls.append([len(r.pieces) for r in regions])
        return real(regions, device)

    monkeypatch.setattr(device_jpeg, "decode_regions", spy)
    monkeypatch.setattr(pyramids, "JPEG_BATCH", 12)
    with caplog.at_level(logging.INFO):
        dev = open_store(_encode(tiles, slide, tmp_path / "dev.zarr", "always"))
    assert calls and all(n > 0 for c in calls for n in c)
    # one call decodes the tiles of several blocks, about JPEG_BATCH at a time (the last
    # call takes what is left)
    assert max(len(c) for c in calls) > 1
    assert all(sum(c) >= 12 and sum(c) - c[-1] < 12 for c in calls[:-1])
    assert "JPEG tiles decoded on cpu" in caplog.text
    n_calls = len(calls)
    cpu = open_store(_encode(tiles, slide, tmp_path / "cpu.zarr", "never"))
    assert len(calls) == n_calls  # "never" did not decode through torchvision
    for sc in cpu.scale_names:
        fa = dev.features(sc, "demo").astype(np.float32)
        fb = cpu.features(sc, "demo").astype(np.float32)
        assert fa.shape == fb.shape and len(fa)
        cos = (fa * fb).sum(axis=1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
        assert cos.min() >= 0.995, (sc, cos.min())


def test_encode_falls_back_when_the_device_disagrees(
    tmp_path: Path,
    planted: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slide = planted[0]
    tiles = tmp_path / "tiles.zarr"
    assert main(["tile", str(slide), "--out", str(tiles)]) == 0
    real = device_jpeg._decode
    monkeypatch.setattr(device_jpeg, "_decode", lambda st, dev: [t.flip(0) for t in real(st, dev)])
    with caplog.at_level(logging.INFO):
        _encode(tiles, slide, tmp_path / "dev.zarr", "always")
    assert "decoded on the CPU instead of cpu" in caplog.text
    assert "JPEG tiles decoded on cpu" not in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
@pytest.mark.parametrize(("which", "level", "box"), BOXES)
def test_nvjpeg_matches_libjpeg_turbo(
    which: str, level: int, box: tuple[int, int, int, int], planted: tuple[Path, Path]
) -> None:
    path = CMU if which == "cmu" else planted[0]
    with open_slide(path) as s:
        nj = s.native_jpeg()
        assert nj is not None
        ok, why = device_agrees(nj, level, "cuda")
    got, ref = _compare(path, level, box, "cuda")
    mad = np.abs(got.astype(np.int16) - ref).mean()
    # the check's verdict on the level predicts this region: a slide it refuses (Aperio's
    # RGB-coded tiles: nvJPEG is 49 grey levels off) goes to the CPU, which is right
    assert ok == (mad <= device_jpeg.AGREE_MAD), (why, mad)
