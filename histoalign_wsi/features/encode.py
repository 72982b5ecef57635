"""The encode pipeline: read each coarse block of the slide once, make every scale's tiles
from that one read on the device, and feed every encoder from the same pixels.

Readers run in threads with a bounded prefetch. On a CPU the pixels stay uint8 through
the area resizes and become float one batch at a time; on an accelerator uint8 pixels go
to the device and are resized (area) and normalised there; on CUDA the forward pass runs
under bf16 autocast in channels-last layout, and a batch that runs out of memory is
halved and retried. Features
are L2-normalised and appended, in store order, as float16 by a writer thread.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from .._progress import Progress
from .._threads import available_cpus
from ..slides.device_jpeg import EncodedRegion, decode_on_device, device_agrees, encoded_region
from ..slides.reader import Slide
from .adapters import LoadedEncoder
from .store import ROW_CHUNK, ScaleView

__all__ = [
    "Block",
    "EncodeSettings",
    "dct_factor",
    "plan_blocks",
    "preprocess_on_device",
    "run_pipeline",
    "thread_budget",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeSettings:
    tile_px: int
    batch_size: int = 128
    readers: int = 2
    prefetch: int = 4
    device: str = "cpu"
    native_jpeg: bool = True
    #: decode native JPEG tiles on the device: None = on accelerators (nvJPEG on CUDA),
    #: True = also on the CPU device (torchvision's libjpeg; tests use it), False = never
    device_jpeg: bool | None = None


@dataclass(frozen=True)
class Block:
    """A coarse cell read once; ``rows[s]`` is the slice of scale ``s`` tiles inside it."""

    x0: int
    y0: int
    size0: int
    rows: tuple[tuple[int, int], ...]


def plan_blocks(scales: Sequence[ScaleView], *, block_size0: int) -> list[Block]:
    """Group tiles of every scale by the coarse cell holding them (store order)."""
    keys: list[NDArray[np.int64]] = []
    big = 1 << 31
    for sv in scales:
        bx = sv.coords[:, 0].astype(np.int64) // block_size0
        by = sv.coords[:, 1].astype(np.int64) // block_size0
        k = by * big + bx
        if len(k) > 1 and np.any(np.diff(k) < 0):
            raise ValueError(f"tiles of scale {sv.name} are not in block-major order")
        keys.append(k)
    allk = np.unique(np.concatenate(keys)) if keys else np.array([], np.int64)
    blocks = []
    bounds = [(np.searchsorted(k, allk, "left"), np.searchsorted(k, allk, "right")) for k in keys]
    for i, key in enumerate(allk):
        row, col = divmod(int(key), big)
        rows = tuple((int(lo[i]), int(hi[i])) for lo, hi in bounds)
        blocks.append(Block(col * block_size0, row * block_size0, block_size0, rows))
    return blocks


def preprocess_on_device(tiles: torch.Tensor, enc: LoadedEncoder) -> torch.Tensor:
    """0-255 NCHW tiles (uint8 or float) -> the encoder's normalised float input (resize,
    scale, normalise); uint8 becomes float here, one batch at a time."""
    p = enc.entry.preprocess
    x = tiles.float() if tiles.dtype == torch.uint8 else tiles
    if x.shape[-1] != p.size or x.shape[-2] != p.size:
        mode = "bicubic" if p.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(p.size, p.size), mode=mode, antialias=True, align_corners=False)
        x = x.clamp_(0, 255).round_()
    x = x / 255.0
    mean = torch.tensor(p.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(p.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class _BlockPyramid:
    """Every scale's tiles from one block read: the block is area-downsampled once per
    scale (cascading when the factors nest), then tiles are plain crops of that image."""

    def __init__(self, img: torch.Tensor, tile_px: int) -> None:
        self.img = img
        self.tile_px = tile_px
        self.cache: dict[int, torch.Tensor] = {1: img}

    def _down(self, r: int) -> torch.Tensor:
        if r not in self.cache:
            base = max((k for k in self.cache if r % k == 0), default=1)
            self.cache[r] = F.avg_pool2d(self.cache[base], r // base)
        return self.cache[r]

    def tiles(self, coords: NDArray[np.int32], x0: int, y0: int, size_px: float, per0: float) -> torch.Tensor:
        """Tiles of ``size_px`` block pixels at level-0 ``coords``, resized to ``tile_px``."""
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


class _CpuPyramid:
    """The CPU form of :class:`_BlockPyramid`: the block stays uint8 (H, W, 3) and each
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

    def tiles(self, coords: NDArray[np.int32], x0: int, y0: int, size_px: float, per0: float) -> torch.Tensor:
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
            x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
            return F.interpolate(x, size=(t, t), mode="area").round_().to(torch.uint8)
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)


class _Forward:
    """Runs an encoder on a batch, halving the batch and retrying on out-of-memory."""

    def __init__(self, enc: LoadedEncoder, batch_size: int) -> None:
        self.enc = enc
        self.batch_size = batch_size
        dev = enc.device
        self.cuda = dev.type == "cuda"
        if self.cuda:
            enc.model.to(memory_format=torch.channels_last)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        i = 0
        while i < tiles.shape[0]:
            bs = self.batch_size
            try:
                x = preprocess_on_device(tiles[i : i + bs], self.enc)
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()
                if self.cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with ctx:
                    outs.append(self.enc.encode_image(x))
                i += bs
            except torch.cuda.OutOfMemoryError:
                if bs == 1:
                    raise
                self.batch_size = max(1, bs // 2)
                log.warning(
                    "%s: out of memory at batch %d; retrying with %d", self.enc.name, bs, self.batch_size
                )
                torch.cuda.empty_cache()
        return torch.cat(outs) if outs else torch.empty(0, self.enc.entry.embed_dim)


def dct_factor(scales: Sequence[ScaleView], lds: float, tile_px: int) -> int:
    """The largest JPEG DCT scaling (1, 2, 4 or 8) every scale's tiles can be cut from
    with whole-number area reduces: each scale's block-pixels-per-tile-pixel ratio must be
    a multiple of it."""
    ratios = [sv.size0 / lds / tile_px for sv in scales]
    for f in (8, 4, 2):
        if all(abs(r / f - round(r / f)) < 1e-6 and round(r / f) >= 1 for r in ratios):
            return f
    return 1


def _read_blocks(
    slide: Slide,
    blocks: Sequence[Block],
    level: int,
    settings: EncodeSettings,
    factor: int = 1,
    *,
    encoded: bool = False,
) -> Iterator[tuple[Block, NDArray[np.uint8] | EncodedRegion, int]]:
    """(block, pixels, DCT factor used): native JPEG tiles decoded at 1/``factor`` where
    the level and box allow, else the backend's full-resolution read (factor 1). With
    ``encoded`` the native tiles are only read, left for the device to decode."""
    lds = slide.level_downsamples[level]
    nj = slide.native_jpeg() if encoded else None

    def read(b: Block) -> tuple[NDArray[np.uint8] | EncodedRegion, int]:
        n = int(np.ceil(b.size0 / lds))
        lx, ly = b.x0 / lds, b.y0 / lds
        if nj is not None and lx == int(lx) and ly == int(ly):
            return encoded_region(nj, level, int(lx), int(ly), n, n), 1
        if settings.native_jpeg:
            px = slide.read_scaled((b.x0, b.y0), level, (n, n), factor)
            if px is not None:
                return px, factor
        return slide.read_region((b.x0, b.y0), level, (n, n)), 1

    with ThreadPoolExecutor(max_workers=settings.readers, thread_name_prefix="reader") as pool:
        pending: deque[tuple[Block, Future[tuple[NDArray[np.uint8] | EncodedRegion, int]]]] = deque()
        it = iter(blocks)
        for b in it:
            pending.append((b, pool.submit(read, b)))
            if len(pending) >= settings.prefetch + settings.readers:
                break
        while pending:
            b, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, nxt)))
            pixels, f = fut.result()
            yield b, pixels, f


def _device_decode(slide: Slide, level: int, settings: EncodeSettings, dev: torch.device) -> bool:
    """Whether this slide's native JPEG tiles are decoded on the device (logged either way)."""
    wanted = settings.device_jpeg if settings.device_jpeg is not None else dev.type == "cuda"
    if not (wanted and settings.native_jpeg and slide.pixel_path(level) == "native-jpeg"):
        return False
    lds = slide.level_downsamples[level]
    if abs(lds - round(lds)) > 1e-9:
        return False
    nj = slide.native_jpeg()
    assert nj is not None
    ok, why = device_agrees(nj, level, dev)
    if ok:
        log.info("%s: JPEG tiles decoded on %s (%s)", slide.path.name, dev, why)
    else:
        log.warning("%s: JPEG tiles decoded on the CPU instead of %s: %s", slide.path.name, dev, why)
    return ok


class _Appender:
    """Buffers rows per (scale, encoder) and writes chunk-aligned slices on a thread."""

    def __init__(self, arrays: Mapping[tuple[int, str], Any]) -> None:
        self.arrays = arrays
        self.buf: dict[tuple[int, str], list[NDArray[np.float16]]] = {k: [] for k in arrays}
        self.pos: dict[tuple[int, str], int] = dict.fromkeys(arrays, 0)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self.futures: list[Future[None]] = []

    def add(self, key: tuple[int, str], rows: NDArray[np.float16], *, final: bool = False) -> None:
        self.buf[key].append(rows)
        n = sum(len(r) for r in self.buf[key])
        if n >= ROW_CHUNK or final:
            data = np.concatenate(self.buf[key]) if self.buf[key] else np.empty((0,))
            self.buf[key] = []
            start = self.pos[key]
            self.pos[key] += len(data)
            if len(data):
                arr = self.arrays[key]
                self.futures.append(self.pool.submit(arr.__setitem__, slice(start, start + len(data)), data))

    def close(self) -> None:
        for k in self.buf:
            self.add(k, self._empty(k), final=True)
        self.pool.shutdown(wait=True)
        for f in self.futures:
            f.result()

    def _empty(self, key: tuple[int, str]) -> NDArray[np.float16]:
        d = int(self.arrays[key].shape[1])
        return np.zeros((0, d), np.float16)


def thread_budget(threads: int | None, readers: int) -> tuple[int, int]:
    """Split ``threads`` (default: the CPUs this process may use) between slide-reader
    threads and torch's intra-op threads: (readers, torch threads), never more in all."""
    budget = max(1, threads or available_cpus())
    r = max(1, min(readers, budget // 2))
    return r, max(1, budget - r)


def run_pipeline(
    slide: Slide,
    scales: Sequence[ScaleView],
    encoders: Sequence[LoadedEncoder],
    arrays: Mapping[tuple[int, str], Any],
    settings: EncodeSettings,
) -> int:
    """Encode every tile of ``scales`` with every encoder into ``arrays[(scale, encoder)]``.

    Returns the number of tiles encoded (per encoder).
    """
    if not scales:
        return 0
    total = sum(len(sv.coords) for sv in scales)
    block0 = scales[-1].size0
    blocks = plan_blocks(scales, block_size0=block0)
    dev = torch.device(settings.device)
    finest_ds = scales[0].size0 / settings.tile_px
    level = slide.best_level(finest_ds)
    lds = slide.level_downsamples[level]
    on_device = _device_decode(slide, level, settings, dev)
    factor = dct_factor(scales, lds, settings.tile_px) if settings.native_jpeg and not on_device else 1
    log.info(
        "%s: level %d pixels via %s%s",
        slide.path.name,
        level,
        slide.pixel_path(level) if settings.native_jpeg else slide.reader,
        f", decoded at 1/{factor} (DCT scaling)"
        if factor > 1 and slide.pixel_path(level) == "native-jpeg"
        else "",
    )
    forwards = [_Forward(e, settings.batch_size) for e in encoders]
    appender = _Appender(arrays)
    pending: dict[int, list[torch.Tensor]] = {s: [] for s in range(len(scales))}

    def flush(s: int) -> None:
        if not pending[s]:
            return
        batch = torch.cat(pending[s])
        pending[s] = []
        for fw in forwards:
            emb = fw(batch).float().cpu().numpy().astype(np.float16)
            appender.add((s, fw.enc.name), emb)

    bar = Progress(total, desc=f"encode {slide.path.name}")
    try:
        for b, pixels, f in _read_blocks(slide, blocks, level, settings, factor, encoded=on_device):
            pyramid: _BlockPyramid | _CpuPyramid
            if isinstance(pixels, EncodedRegion):
                img = decode_on_device(pixels, dev).unsqueeze(0).float()
                pyramid = _BlockPyramid(img, settings.tile_px)
            elif dev.type == "cpu":
                pyramid = _CpuPyramid(pixels, settings.tile_px)
            else:
                src = torch.from_numpy(pixels)
                if dev.type == "cuda":
                    src = src.pin_memory()
                img = src.to(dev, non_blocking=True).permute(2, 0, 1).unsqueeze(0).float()
                pyramid = _BlockPyramid(img, settings.tile_px)
            for s, (lo, hi) in enumerate(b.rows):
                if hi <= lo:
                    continue
                sv = scales[s]
                tiles = pyramid.tiles(sv.coords[lo:hi], b.x0, b.y0, sv.size0 / lds / f, 1.0 / (lds * f))
                pending[s].append(tiles)
                if sum(t.shape[0] for t in pending[s]) >= settings.batch_size:
                    flush(s)
                bar.update(hi - lo)
        for s in pending:
            flush(s)
    finally:
        bar.close()
        appender.close()
    return total
