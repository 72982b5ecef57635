"""Every scale's tiles from the slide, each block of the coarsest grid read once: the
read plan (which pyramid level and JPEG DCT scaling serve the scales present in a block),
the reader threads, and the cut of every scale's tiles from each read (:mod:`.pyramids`).

A block is read from the level nearest at or below the resolution of the finest scale it
holds, decoded at the largest DCT scaling all its scales allow: a block holding only
coarse tiles (tissue edges, where the fine grid kept none) decodes the coarser level, far
fewer pixels than the finest read. On a CPU the pixels stay uint8 through the area
reduces; on an accelerator they go to the device (decoded there from the compressed JPEG
tiles when it can) and are resized there.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ..slides import device_jpeg
from ..slides.device_jpeg import EncodedRegion, encoded_region
from ..slides.reader import Slide
from .pyramids import BlockPyramid, CpuPyramid, decoded_on_device, device_pyramid, pinned
from .store import ScaleView

if TYPE_CHECKING:  # the CPU path runs without torch; the device path imports it
    import torch

__all__ = [
    "Block",
    "Read",
    "ReadPlan",
    "ReadSettings",
    "dct_factor",
    "plan_blocks",
    "plan_reads",
    "read_blocks",
    "read_plans",
    "scale_tiles",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadSettings:
    tile_px: int
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


def dct_factor(scales: Sequence[ScaleView], lds: float, tile_px: int) -> int:
    """The largest JPEG DCT scaling (1, 2, 4 or 8) every scale's tiles can be cut from
    with whole-number area reduces: each scale's block-pixels-per-tile-pixel ratio must be
    a multiple of it."""
    ratios = [sv.size0 / lds / tile_px for sv in scales]
    for f in (8, 4, 2):
        if all(abs(r / f - round(r / f)) < 1e-6 and round(r / f) >= 1 for r in ratios):
            return f
    return 1


@dataclass(frozen=True)
class ReadPlan:
    """How a block whose finest tiles are of one scale is read."""

    level: int
    downsample: float  # of that level
    factor: int  # JPEG DCT scaling the native path decodes at (1 = full size)
    on_device: bool  # native tiles decoded on the device


def _device_decode(slide: Slide, level: int, settings: ReadSettings) -> bool:
    """Whether this level's native JPEG tiles are decoded on the device (logged either way)."""
    dev = settings.device
    wanted = settings.device_jpeg if settings.device_jpeg is not None else dev.startswith("cuda")
    if not (wanted and settings.native_jpeg and slide.pixel_path(level) == "native-jpeg"):
        return False
    lds = slide.level_downsamples[level]
    if abs(lds - round(lds)) > 1e-9:
        return False
    nj = slide.native_jpeg()
    assert nj is not None
    ok, why = device_jpeg.device_agrees(nj, level, dev)
    if ok:
        log.info("%s: level %d JPEG tiles decoded on %s (%s)", slide.path.name, level, dev, why)
    else:
        log.warning(
            "%s: level %d JPEG tiles decoded on the CPU instead of %s: %s", slide.path.name, level, dev, why
        )
    return ok


def read_plans(slide: Slide, scales: Sequence[ScaleView], settings: ReadSettings) -> list[ReadPlan]:
    """``plans[s]``: how a read whose finest tiles are of scale ``s`` is made (scales run
    fine to coarse): the level nearest at or below that scale's resolution, at the largest
    DCT scaling that scale and every coarser one allow."""
    on_device: dict[int, bool] = {}
    plans = []
    for s, sv in enumerate(scales):
        level = slide.best_level(sv.size0 / settings.tile_px)
        lds = float(slide.level_downsamples[level])
        if level not in on_device:
            on_device[level] = _device_decode(slide, level, settings)
        native = settings.native_jpeg and slide.pixel_path(level) == "native-jpeg"
        f = dct_factor(scales[s:], lds, settings.tile_px) if native and not on_device[level] else 1
        plans.append(ReadPlan(level, lds, f, on_device[level]))
    return plans


@dataclass(frozen=True)
class Read:
    """One region read: the level-0 box (x0, y0, w0, h0), how it is read, and the scales
    whose tiles of the block are cut from it."""

    x0: int
    y0: int
    w0: int
    h0: int
    plan: ReadPlan
    scales: tuple[int, ...]

    @property
    def cost(self) -> float:
        """Level pixels decoded (entropy decoding, the bulk of JPEG's work, scales with them)."""
        return self.w0 * self.h0 / self.plan.downsample**2


def plan_reads(block: Block, scales: Sequence[ScaleView], plans: Sequence[ReadPlan]) -> list[Read]:
    """The reads that make a block's tiles with the fewest level pixels decoded: either
    the whole block from the level of the finest scale present, serving every scale, or
    only the box around that scale's tiles from its level, the coarser scales then read
    the same way (recursively) from their own, coarser levels. A block at a tissue edge
    with few fine tiles thus decodes most of its area from a coarser level."""
    present = [s for s, (lo, hi) in enumerate(block.rows) if hi > lo]

    def best(i: int) -> list[Read]:
        s = present[i]
        whole = [Read(block.x0, block.y0, block.size0, block.size0, plans[s], tuple(present[i:]))]
        if i == len(present) - 1:
            alone = [_tiles_box(block, scales, s, plans[s])]
        else:
            alone = [_tiles_box(block, scales, s, plans[s]), *best(i + 1)]
        return alone if sum(r.cost for r in alone) < sum(r.cost for r in whole) else whole

    return best(0) if present else []


def _tiles_box(block: Block, scales: Sequence[ScaleView], s: int, plan: ReadPlan) -> Read:
    lo, hi = block.rows[s]
    c = scales[s].coords[lo:hi].astype(np.int64)
    z = scales[s].size0
    x0, y0 = int(c[:, 0].min()), int(c[:, 1].min())
    return Read(x0, y0, int(c[:, 0].max()) + z - x0, int(c[:, 1].max()) + z - y0, plan, (s,))


def read_blocks(
    slide: Slide,
    reads: Sequence[Read],
    settings: ReadSettings,
    post: Callable[[Read, NDArray[np.uint8] | EncodedRegion, int], Any] | None = None,
) -> Iterator[tuple[Read, Any, int]]:
    """(read, pixels, DCT factor used) in order, read by ``settings.readers`` threads with
    a bounded prefetch: native JPEG tiles decoded at 1/``plan.factor`` where the level and
    box allow (or only read, left compressed for the device), else the backend's
    full-resolution read (factor 1). ``post(read, pixels, factor)``, when given, runs in
    the reader thread too and its result takes the pixels' place (the CPU tile cut: so
    every stage of a block scales with the readers, not only the decode)."""
    nj = slide.native_jpeg() if any(r.plan.on_device for r in reads) else None

    def work(r: Read) -> tuple[Any, int]:
        pixels, f = read(r)
        return (pixels if post is None else post(r, pixels, f)), f

    def read(r: Read) -> tuple[NDArray[np.uint8] | EncodedRegion, int]:
        plan = r.plan
        w, h = int(np.ceil(r.w0 / plan.downsample)), int(np.ceil(r.h0 / plan.downsample))
        lx, ly = r.x0 / plan.downsample, r.y0 / plan.downsample
        if plan.on_device and nj is not None and lx == int(lx) and ly == int(ly):
            return encoded_region(nj, plan.level, int(lx), int(ly), w, h), 1
        if settings.native_jpeg:
            px = slide.read_scaled((r.x0, r.y0), plan.level, (w, h), plan.factor)
            if px is not None:
                return px, plan.factor
        return slide.read_region((r.x0, r.y0), plan.level, (w, h)), 1

    with ThreadPoolExecutor(max_workers=settings.readers, thread_name_prefix="reader") as pool:
        pending: deque[tuple[Read, Future[tuple[Any, int]]]] = deque()
        it = iter(reads)
        for r in it:
            pending.append((r, pool.submit(work, r)))
            if len(pending) >= settings.prefetch + settings.readers:
                break
        while pending:
            r, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(work, nxt)))
            pixels, f = fut.result()
            yield r, pixels, f


def _log_reads(slide: Slide, scales: Sequence[ScaleView], reads: Sequence[Read], blocks: int) -> None:
    by_plan: dict[ReadPlan, tuple[int, float]] = {}
    for r in reads:
        n, cost = by_plan.get(r.plan, (0, 0.0))
        by_plan[r.plan] = (n + 1, cost + r.cost)
    for plan, (n, cost) in by_plan.items():
        how = f"decoded at 1/{plan.factor} (DCT scaling)" if plan.factor > 1 else "full size"
        if plan.on_device:
            how = "decoded on the device"
        log.info(
            "%s: %d read(s) from level %d via %s, %s: %.1f Mpx",
            slide.path.name,
            n,
            plan.level,
            "native-jpeg" if slide.pixel_path(plan.level) == "native-jpeg" else slide.reader,
            how,
            cost / 1e6,
        )
    log.info("%s: %d blocks of %d scales in %d reads", slide.path.name, blocks, len(scales), len(reads))


def scale_tiles(
    slide: Slide, scales: Sequence[ScaleView], settings: ReadSettings
) -> Iterator[tuple[int, NDArray[np.uint8] | torch.Tensor]]:
    """(scale index, tiles) for every block and scale, each scale in store order, each
    tile ``settings.tile_px`` square: a uint8 NCHW array on the CPU (no torch needed),
    a float 0-255 NCHW tensor on an accelerator (or when decoding on the device)."""
    if not scales or not any(len(sv.coords) for sv in scales):
        return
    blocks = plan_blocks(scales, block_size0=scales[-1].size0)
    plans = read_plans(slide, scales, settings)
    pairs = [(b, r) for b in blocks for r in plan_reads(b, scales, plans)]
    _log_reads(slide, scales, [r for _, r in pairs], len(blocks))
    owner = {id(r): b for b, r in pairs}

    def cut(
        r: Read, pixels: NDArray[np.uint8] | torch.Tensor | EncodedRegion, f: int
    ) -> list[tuple[int, Any]]:
        assert not isinstance(pixels, EncodedRegion)  # decoded_on_device decodes them first
        b = owner[id(r)]
        pyramid: BlockPyramid | CpuPyramid
        if settings.device == "cpu" and isinstance(pixels, np.ndarray):
            pyramid = CpuPyramid(pixels, settings.tile_px)
        else:
            pyramid = device_pyramid(pixels, settings.device, settings.tile_px)
        lds, out = r.plan.downsample, []
        for s in r.scales:
            lo, hi = b.rows[s]
            if hi > lo:
                size = scales[s].size0 / lds / f
                out.append((s, pyramid.tiles(scales[s].coords[lo:hi], r.x0, r.y0, size, 1.0 / (lds * f))))
        return out

    reads = [r for _, r in pairs]
    if settings.device == "cpu" and not any(r.plan.on_device for r in reads):
        # the whole cut runs in the reader threads: every stage of a block scales with them
        for _, got, _ in read_blocks(slide, reads, settings, cut):
            yield from got
        return
    # device tensors are made in this thread (on its stream); the readers read, decode on
    # the CPU what the device does not, and pin host pixels for the copy
    pin = pinned if settings.device.startswith("cuda") else None
    for r, px, f in decoded_on_device(read_blocks(slide, reads, settings, pin), settings.device):
        yield from cut(r, px, f)
