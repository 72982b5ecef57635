"""The per-block pyramids that cut every scale's tiles from one region read, on the CPU
(uint8, Pillow's area reduce) or on the device (float, ``avg_pool2d``), and how a read's
pixels get to the device: compressed JPEG tiles decoded there in batches spanning several
blocks, or decoded pixels pinned by the reader threads and copied without blocking.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from ..slides import device_jpeg
from ..slides.device_jpeg import EncodedRegion

if TYPE_CHECKING:  # the CPU path runs without torch; the device path imports it
    import torch

R = TypeVar("R")  # a read, whatever describes it

__all__ = [
    "JPEG_BATCH",
    "BlockPyramid",
    "CpuPyramid",
    "Decoded",
    "decoded_on_device",
    "device_pyramid",
    "pinned",
]


class BlockPyramid:
    """Every scale's tiles from one block read: the block is area-downsampled once per
    scale (cascading when the factors nest), then tiles are plain crops of that image."""

    def __init__(self, img: torch.Tensor, tile_px: int) -> None:
        self.img = img
        self.tile_px = tile_px
        self.cache: dict[int, torch.Tensor] = {1: img}

    def _down(self, r: int) -> torch.Tensor:
        if r not in self.cache:
            base = max((k for k in self.cache if r % k == 0), default=1)
            import torch.nn.functional as F

            self.cache[r] = F.avg_pool2d(self.cache[base], r // base)
        return self.cache[r]

    def tiles(self, coords: NDArray[np.int32], x0: int, y0: int, size_px: float, per0: float) -> torch.Tensor:
        """Tiles of ``size_px`` block pixels at level-0 ``coords``, resized to ``tile_px``."""
        import torch
        import torch.nn.functional as F

        t = self.tile_px
        ratio = size_px / t
        if abs(ratio - round(ratio)) < 1e-6 and round(ratio) >= 1:
            r = round(ratio)
            img = self._down(r)
            crops = []
            for x, y in coords:
                ox, oy = round((int(x) - x0) * per0 / r), round((int(y) - y0) * per0 / r)
                crops.append(img[..., oy : oy + t, ox : ox + t])
            return torch.cat(crops)
        # non-integer factor (slides whose MPP does not divide the scale): crop, then resize
        sz = max(1, round(size_px))
        crops = []
        for x, y in coords:
            ox, oy = round((int(x) - x0) * per0), round((int(y) - y0) * per0)
            crops.append(self.img[..., oy : oy + sz, ox : ox + sz])
        return F.interpolate(torch.cat(crops), size=(t, t), mode="area")


class CpuPyramid:
    """The CPU form of :class:`BlockPyramid`: the block stays uint8 (H, W, 3) and each
    scale's image is a uint8 area reduce (Pillow's box ``reduce``, cascading when the
    factors nest); tiles are uint8 crops, made float only per batch by the encoder's
    preprocessing. About ten times cheaper than float ``avg_pool2d`` on a CPU, in a
    quarter of the memory."""

    def __init__(self, img: NDArray[np.uint8], tile_px: int) -> None:
        self.tile_px = tile_px
        self.cache: dict[int, NDArray[np.uint8]] = {1: np.ascontiguousarray(img)}

    def _down(self, r: int) -> NDArray[np.uint8]:
        if r not in self.cache:
            base = max((k for k in self.cache if r % k == 0), default=1)
            self.cache[r] = np.asarray(Image.fromarray(self.cache[base]).reduce(r // base))
        return self.cache[r]

    def tiles(
        self, coords: NDArray[np.int32], x0: int, y0: int, size_px: float, per0: float
    ) -> NDArray[np.uint8]:
        """uint8 NCHW tiles of ``size_px`` block pixels at level-0 ``coords``, at ``tile_px``."""
        t = self.tile_px
        ratio = size_px / t
        crops = []
        if abs(ratio - round(ratio)) < 1e-6 and round(ratio) >= 1:
            r = round(ratio)
            img = self._down(r)
            for x, y in coords:
                ox, oy = round((int(x) - x0) * per0 / r), round((int(y) - y0) * per0 / r)
                crops.append(img[oy : oy + t, ox : ox + t])
        else:  # non-integer factor (rare): crop, then the device path's area resize, rounded
            sz = max(1, round(size_px))
            for x, y in coords:
                ox, oy = round((int(x) - x0) * per0), round((int(y) - y0) * per0)
                crops.append(self.cache[1][oy : oy + sz, ox : ox + sz])
            import torch
            import torch.nn.functional as F

            x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
            return F.interpolate(x, size=(t, t), mode="area").round_().to(torch.uint8).numpy()
        # contiguous NCHW here, in the reader thread: a strided uint8 gather later, in the
        # forward thread's batch concatenation, cost it 6 ms a batch
        return np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2))


#: compressed tiles decoded on the device per batched call, gathered over consecutive
#: blocks (a block holds a few dozen tiles; nvJPEG's batched decode is fastest at 64-256)
JPEG_BATCH = 256


@dataclass(frozen=True)
class Decoded:
    """A region decoded on the device: (3, H, W) uint8 there."""

    image: torch.Tensor


def decoded_on_device(items: Iterator[tuple[R, Any, int]], device: str) -> Iterator[tuple[R, Any, int]]:
    """The reads in order, compressed regions decoded on ``device`` in batches of about
    :data:`JPEG_BATCH` tiles spanning consecutive blocks; other pixels pass through."""
    group: list[tuple[R, EncodedRegion, int]] = []

    def decoded() -> Iterator[tuple[R, Decoded, int]]:
        images = device_jpeg.decode_regions([px for _, px, _ in group], device)
        yield from ((r, Decoded(img), f) for (r, _, f), img in zip(group, images, strict=True))
        group.clear()

    streams = 0
    for r, px, f in items:
        if isinstance(px, EncodedRegion):
            group.append((r, px, f))
            streams += len(px.streams)
            if streams < JPEG_BATCH:
                continue
        if group:
            yield from decoded()
            streams = 0
        if not isinstance(px, EncodedRegion):
            yield r, px, f
    if group:
        yield from decoded()


def pinned(r: object, pixels: NDArray[np.uint8] | EncodedRegion, f: int) -> Any:
    """In a reader thread: decoded pixels copied to page-locked memory, so the device copy
    that follows is asynchronous (a pageable source makes CUDA stage and wait)."""
    if isinstance(pixels, EncodedRegion):
        return pixels
    import torch

    out = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    out.numpy()[...] = pixels  # one copy, and no warning for read-only decoder output
    return out


def device_pyramid(
    pixels: NDArray[np.uint8] | torch.Tensor | Decoded, device: str, tile_px: int
) -> BlockPyramid:
    """The block on the device as float 0-255 (1, 3, H, W): an image decoded there, or
    host pixels (H, W, 3), pinned by the readers on CUDA, copied without blocking (on the
    tile thread's stream)."""
    import torch

    dev = torch.device(device)
    if isinstance(pixels, Decoded):
        return BlockPyramid(pixels.image.unsqueeze(0).float(), tile_px)
    src = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
    return BlockPyramid(src.to(dev, non_blocking=True).permute(2, 0, 1).unsqueeze(0).float(), tile_px)
