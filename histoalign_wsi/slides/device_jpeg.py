"""Decoding native JPEG tiles on the accelerator: the compressed tiles of a region are
read on the CPU (bytes only, in the reader threads) and decoded in batches spanning
several regions by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA), then
placed into each region's image there. The pixels never exist on the host.

The same code runs with ``device="cpu"`` (torchvision's libjpeg), which is how machines
without a GPU test the assembly. Before a slide is decoded this way, :func:`device_agrees`
decodes eight tiles spread over the level on the device and with libjpeg-turbo on the
CPU and compares them inside the image, so a
decoder that reads a stream differently (for example the Adobe RGB marker of Aperio
tiles) sends that slide back to the CPU path instead of changing its pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .native_jpeg import JpegLevel, NativeJpeg, Piece

if TYPE_CHECKING:  # torch is imported where a decode runs: reading compressed bytes needs none
    import torch

__all__ = ["EncodedRegion", "decode_on_device", "decode_regions", "device_agrees", "encoded_region"]

#: largest mean absolute difference (grey levels) accepted between the device's decode of
#: the sampled tiles and libjpeg-turbo's, over the pixels inside the image. Measured on an
#: H200: nvJPEG equals libjpeg-turbo exactly on YCbCr tiles (0.0 over 400 generated tiles)
#: and differs by 0.11-0.48 inside the planted slide's regions (IDCT rounding, chroma
#: upsampling); on Aperio's RGB-coded tiles, which it reads as YCbCr, by 49. One grey
#: level separates the two with room on both sides.
AGREE_MAD = 1.0
#: tiles compared per level, spread evenly over its tiles (one tile misrepresents a level:
#: the largest is often an edge tile whose padding outside the image differs freely)
AGREE_TILES = 8


@dataclass(frozen=True)
class EncodedRegion:
    """A region's native tiles still compressed: what a reader thread hands over."""

    width: int
    height: int
    pieces: tuple[Piece, ...]
    streams: tuple[bytes, ...]


def encoded_region(nj: NativeJpeg, level: int, x: int, y: int, w: int, h: int) -> EncodedRegion:
    """The compressed tiles of the level-pixel box (x, y, w, h), read but not decoded."""
    pieces = tuple(nj.plan(level, x, y, w, h))
    return EncodedRegion(w, h, pieces, tuple(nj.stream(level, p.index) for p in pieces))


def _decode(streams: tuple[bytes, ...], device: torch.device) -> list[torch.Tensor]:
    import torch

    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; its decoder still works
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, list | tuple) else [out]


def decode_regions(regions: Sequence[EncodedRegion], device: torch.device | str) -> list[torch.Tensor]:
    """Each region's pixels as a (3, h, w) uint8 tensor on ``device`` (white outside the
    image, as the CPU path), every region's tiles decoded in one batched call: nvJPEG's
    batched decode is several times faster per tile at 64-256 tiles than one block's few."""
    import torch

    dev = torch.device(device)
    streams = tuple(s for r in regions for s in r.streams)
    images = iter(_decode(streams, dev) if streams else [])
    outs = []
    for region in regions:
        out = torch.full((3, region.height, region.width), 255, dtype=torch.uint8, device=dev)
        for p in region.pieces:
            img = next(images)
            sx0, sy0, sx1, sy1 = p.src
            dx0, dy0 = p.dst
            out[:, dy0 : dy0 + sy1 - sy0, dx0 : dx0 + sx1 - sx0] = img[:, sy0:sy1, sx0:sx1]
        outs.append(out)
    return outs


def decode_on_device(region: EncodedRegion, device: torch.device | str) -> torch.Tensor:
    """One region's pixels as a (3, h, w) uint8 tensor on ``device`` (:func:`decode_regions`)."""
    return decode_regions([region], device)[0]


def _sample(lv: JpegLevel, n: int) -> list[int]:
    """Up to ``n`` tile indices spread evenly over the level's non-empty tiles."""
    filled = [i for i, c in enumerate(lv.counts) if c > 0]
    if len(filled) <= n:
        return filled
    return [filled[round(k)] for k in np.linspace(0, len(filled) - 1, n)]


def device_agrees(nj: NativeJpeg, level: int, device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` decodes this level's tiles as libjpeg-turbo does, in the same
    (RGB) mode: :data:`AGREE_TILES` tiles spread over the level, compared on the pixels
    inside the image (mean absolute difference <= :data:`AGREE_MAD`), and why not."""
    import simplejpeg
    import torch

    lv = nj.levels[level]
    picks = _sample(lv, AGREE_TILES)
    if not picks:
        return False, "the level has no tiles to compare"
    streams = tuple(nj.stream(level, i) for i in picks)
    try:
        decoded = _decode(streams, torch.device(device))
    except Exception as exc:  # nvJPEG refuses the stream: the CPU path decodes it
        return False, f"the device cannot decode it ({exc or type(exc).__name__})"
    total, count, worst = 0.0, 0, 0.0
    for i, stream, img in zip(picks, streams, decoded, strict=True):
        got = img.permute(1, 2, 0).cpu().numpy()
        ref = simplejpeg.decode_jpeg(stream, colorspace="RGB")
        if got.shape != ref.shape:
            return False, f"the device decoded tile {i} to {got.shape}, libjpeg-turbo to {ref.shape}"
        tx, ty = i % lv.tiles_across, i // lv.tiles_across
        w = min(lv.tile_w, lv.width - tx * lv.tile_w)
        h = min(lv.tile_h, lv.height - ty * lv.tile_h)
        diff = np.abs(got[:h, :w].astype(np.int16) - ref[:h, :w].astype(np.int16))
        total, count = total + float(diff.sum()), count + diff.size
        worst = max(worst, float(diff.mean()))
    mad = total / max(count, 1)
    if mad > AGREE_MAD:
        return False, (
            f"the device's pixels differ from libjpeg-turbo's by {mad:.2f} grey levels on average "
            f"over {len(picks)} tiles (limit {AGREE_MAD})"
        )
    return True, f"mean absolute difference {mad:.3f} over {len(picks)} tiles (worst tile {worst:.3f})"
