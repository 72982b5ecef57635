"""The encode pipeline: every scale's tiles from one read per block
(:mod:`.tile_source`), fed to every encoder from the same pixels.

On a CPU the tiles are uint8 and become float one batch at a time, in the encoder's own
preprocessing; on an accelerator they are resized and normalised there, and on CUDA the
forward pass runs under bf16 autocast in channels-last layout, and a batch that runs out
of memory is halved and retried. Features are L2-normalised and appended, in store
order, as float16 by a writer thread.
"""

from __future__ import annotations

import functools
import logging
import threading
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

from .._progress import Progress
from .._threads import available_cpus
from ..slides.reader import Slide
from .adapters import LoadedEncoder
from .registry import PreprocessSpec
from .store import ROW_CHUNK, ScaleView
from .tile_source import ReadSettings, scale_tiles

__all__ = ["EncodeSettings", "preprocess_on_device", "run_pipeline", "thread_budget"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeSettings(ReadSettings):
    """How tiles are read (:class:`ReadSettings`) and how many go to an encoder at once."""

    batch_size: int = 128


def preprocess_on_device(
    tiles: torch.Tensor, enc: LoadedEncoder, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """0-255 NCHW tiles (uint8 or float) -> the encoder's normalised float input (resize,
    scale, normalise); uint8 becomes float here, one batch at a time. Scaling and
    normalising are one in-place multiply-add per element, (x / 255 - mean) / std
    folded into x * (1 / (255 std)) - mean / std, on a tensor this function owns.

    ``out``: a float buffer of at least ``len(tiles)`` model-size images to convert
    into, reused from batch to batch (a fresh buffer per batch costs a page fault per
    4 KiB on a CPU, more than the arithmetic); used when no resize is needed."""
    p = enc.entry.preprocess
    if tiles.shape[-1] != p.size or tiles.shape[-2] != p.size:
        x = tiles.float() if tiles.dtype == torch.uint8 else tiles
        mode = "bicubic" if p.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(p.size, p.size), mode=mode, antialias=True, align_corners=False)
        x = x.clamp_(0, 255).round_()
    elif out is not None:
        x = out[: tiles.shape[0]]
        x.copy_(tiles)
    else:  # never normalise the caller's tensor in place
        x = tiles.float() if tiles.dtype == torch.uint8 else tiles.clone()
    scale, shift = _affine(p, x.device, x.dtype)
    return x.mul_(scale).add_(shift)


@functools.lru_cache(maxsize=16)
def _affine(p: PreprocessSpec, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), -mean / std) as (1, 3, 1, 1) tensors on ``device``, made once per
    encoder and device rather than per batch (on CUDA each would be a host copy)."""
    std = torch.tensor(p.std, dtype=torch.float64)
    scale = 1.0 / (255.0 * std)
    shift = -torch.tensor(p.mean, dtype=torch.float64) / std
    return (
        scale.to(device=device, dtype=dtype).view(1, 3, 1, 1),
        shift.to(device=device, dtype=dtype).view(1, 3, 1, 1),
    )


#: on a CPU a batch is preprocessed and run this many tiles at a time: a CPU gains
#: nothing from larger forward batches, and the float copy of 128 tiles of 224 px alone
#: is 77 MB
CPU_CHUNK = 32


class _Forward:
    """Runs an encoder on a batch, halving the batch and retrying on out-of-memory."""

    def __init__(self, enc: LoadedEncoder, batch_size: int) -> None:
        self.enc = enc
        self.cpu = enc.device.type == "cpu"
        self.cuda = enc.device.type == "cuda"
        self.batch_size = min(batch_size, CPU_CHUNK) if self.cpu else batch_size
        if self.cuda:
            enc.model.to(memory_format=torch.channels_last)
        #: on a CPU, the model-size input buffer each chunk is converted into
        self.buf: torch.Tensor | None = None

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        i = 0
        while i < tiles.shape[0]:
            bs = self.batch_size
            try:
                if self.enc.emulated_device:  # its forward stands for the device's preprocess too
                    x = tiles[i : i + bs]
                else:
                    x = preprocess_on_device(tiles[i : i + bs], self.enc, out=self._buffer(tiles))
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

    def _buffer(self, tiles: torch.Tensor) -> torch.Tensor | None:
        size = self.enc.entry.preprocess.size
        if not self.cpu or tuple(tiles.shape[-2:]) != (size, size):
            return None
        if self.buf is None:
            self.buf = torch.empty(self.batch_size, 3, size, size)
        return self.buf


class _Appender:
    """Writes each (scale, encoder)'s rows in chunk-aligned slices, on one writer thread
    that also brings the embeddings to the host: the forward loop hands over device
    tensors and never waits for a device-to-host copy (no host synchronisation per
    batch). The single worker keeps the order of the rows."""

    def __init__(self, arrays: Mapping[tuple[int, str], Any]) -> None:
        self.arrays = arrays
        self.buf: dict[tuple[int, str], list[NDArray[np.float16]]] = {k: [] for k in arrays}
        self.pos: dict[tuple[int, str], int] = dict.fromkeys(arrays, 0)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self.futures: list[Future[None]] = []

    def add(self, key: tuple[int, str], emb: torch.Tensor) -> None:
        self.futures.append(self.pool.submit(self._write, key, emb, False))

    def _write(self, key: tuple[int, str], emb: torch.Tensor | None, final: bool) -> None:
        if emb is not None:
            self.buf[key].append(emb.float().cpu().numpy().astype(np.float16))
        n = sum(len(r) for r in self.buf[key])
        if n >= ROW_CHUNK or (final and n):
            data = np.concatenate(self.buf[key])
            self.buf[key] = []
            start = self.pos[key]
            self.pos[key] += len(data)
            self.arrays[key][start : start + len(data)] = data

    def close(self) -> None:
        for k in self.buf:
            self.futures.append(self.pool.submit(self._write, k, None, True))
        self.pool.shutdown(wait=True)
        for f in self.futures:
            f.result()


class _Producer:
    """Runs the tile source (reads, decodes, cuts and area reduces) on a thread of its
    own, up to ``capacity`` tiles ahead of the forward passes, so that the next batch is
    prepared while this one runs forward (bounded in tiles, not blocks: a batch spans
    several blocks). On CUDA both threads use the same (default) stream, so the device
    sees the work in order; the host work of the two overlaps."""

    def __init__(self, items: Iterator[tuple[int, Any]], capacity: int) -> None:
        self.items: deque[Any] = deque()
        self.queued = 0  # tiles waiting
        self.capacity = max(1, capacity)
        self.done = False
        self.cond = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._run, args=(items,), name="tiles", daemon=True)
        self.thread.start()

    def _run(self, items: Iterator[tuple[int, Any]]) -> None:
        try:
            for s, tiles in items:
                n = int(tiles.shape[0])
                with self.cond:
                    self.cond.wait_for(lambda n=n: self._room(n))  # type: ignore[misc]
                    if self.stop:
                        return
                    self.items.append((s, tiles))
                    self.queued += n
                    self.cond.notify_all()
        except BaseException as exc:  # handed to the consumer, raised there
            with self.cond:
                self.items.append(exc)
                self.cond.notify_all()
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def _room(self, n: int) -> bool:
        return self.stop or self.queued == 0 or self.queued + n <= self.capacity

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.items) or self.done)
                if not self.items:
                    return
                item = self.items.popleft()
                if not isinstance(item, BaseException):
                    self.queued -= int(item[1].shape[0])
                self.cond.notify_all()
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join()


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
    total = sum(len(sv.coords) for sv in scales)
    forwards = [_Forward(e, settings.batch_size) for e in encoders]
    # tiles wait until a forward batch is full (on a CPU, one chunk); a batch may mix
    # scales (every tile is tile_px square), so only the last batch of a slide is partial
    flush_at = min((fw.batch_size for fw in forwards), default=settings.batch_size)
    appender = _Appender(arrays)
    pending: list[tuple[int, torch.Tensor]] = []  # (scale, tiles) in arrival order

    def flush(*, final: bool = False) -> None:
        """Run whole batches of ``flush_at`` tiles (fixed shapes: a device runs every batch
        at the same cost), keeping the remainder for the next block; everything when final.
        Each scale's rows go to its own array, in order."""
        have = sum(len(t) for _, t in pending)
        n = have if final else have // flush_at * flush_at
        if not n:
            return
        batch = torch.cat([t for _, t in pending]) if len(pending) > 1 else pending[0][1]
        segments, left, off = [], [], 0
        for sc, t in pending:
            take = max(0, min(len(t), n - off))
            if take:
                segments.append((sc, off, take))
            if take < len(t):
                left.append((sc, t[take:]))
            off += len(t)
        pending[:] = left
        for fw in forwards:
            emb = fw(batch[:n])
            for sc, start, k in segments:  # to the host on the writer thread
                appender.add((sc, fw.enc.name), emb[start : start + k])

    bar = Progress(total, desc=f"encode {slide.path.name}")
    producer = _Producer(scale_tiles(slide, scales, settings), capacity=3 * flush_at)
    try:
        for sc, tiles in producer:
            pending.append((sc, torch.from_numpy(tiles) if isinstance(tiles, np.ndarray) else tiles))
            if sum(len(t) for _, t in pending) >= flush_at:
                flush()
            bar.update(tiles.shape[0])
        flush(final=True)
    finally:
        producer.close()
        bar.close()
        appender.close()
    return total
