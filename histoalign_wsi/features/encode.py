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
    #: stain normalisation of every tile before the encoders (:mod:`.stain`)
    stain: Any = None


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


@dataclass(frozen=True)
class _Batch:
    """One forward batch: ``tiles`` (N, 3, t, t), and which rows of it belong to which
    scale, in store order: ``segments`` = ((scale, first row in the batch, rows), ...)."""

    tiles: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    #: on CUDA, recorded on the tile thread's stream when the batch's device work is queued
    ready: Any = None


def _batches(items: Iterator[tuple[int, Any]], size: int) -> Iterator[_Batch]:
    """Whole batches of ``size`` tiles from (scale, tiles) pieces in arrival order (a batch
    may mix scales: every tile is the same size), only the last one partial: a device runs
    every batch at the same cost, so a partial batch per scale or per block would waste
    it. Each scale's tiles keep their order."""
    pending: list[tuple[int, torch.Tensor]] = []
    have = 0

    def take(n: int) -> _Batch:
        nonlocal have
        parts, segments, off = [], [], 0
        while off < n:
            sc, t = pending[0]
            k = min(len(t), n - off)
            parts.append(t[:k])
            segments.append((sc, off, k))
            if k < len(t):
                pending[0] = (sc, t[k:])
            else:
                pending.pop(0)
            off += k
        have -= n
        return _Batch(torch.cat(parts) if len(parts) > 1 else parts[0], tuple(segments))

    for sc, tiles in items:
        t = torch.from_numpy(tiles) if isinstance(tiles, np.ndarray) else tiles
        if len(t):
            pending.append((sc, t))
            have += len(t)
        while have >= size:
            yield take(size)
    if have:
        yield take(have)


class _Producer:
    """Runs the tile source (reads, decodes, cuts and area reduces) and the batch assembly
    on a thread of its own, up to ``capacity`` batches ahead of the forward passes, so that
    the next batch is ready while this one runs forward, and the forward loop does nothing
    but run the encoders and hand their output to the writer.

    On CUDA the tile thread queues its device work (host-to-device copies from pinned
    memory, nvJPEG decodes, area reduces, the batch concatenation) on a stream of its own,
    so the device runs it beside the forward passes rather than between them; each batch
    carries an event the forward stream waits on (on the device, not the host), and its
    memory is marked as used by the forward stream so the allocator cannot hand it back to
    the tile stream while a forward pass still reads it."""

    def __init__(self, items: Iterator[_Batch], capacity: int, device: torch.device | None = None) -> None:
        self.items: deque[_Batch | BaseException] = deque()
        self.capacity = max(1, capacity)
        self.done = False
        self.cond = threading.Condition()
        self.stop = False
        cuda = device is not None and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.thread = threading.Thread(target=self._run, args=(items,), name="tiles", daemon=True)
        self.thread.start()

    def _run(self, items: Iterator[_Batch]) -> None:
        try:
            with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
                for batch in items:
                    if self.stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(self.stream)
                        batch = _Batch(batch.tiles, batch.segments, ready)
                    with self.cond:
                        self.cond.wait_for(lambda: self.stop or len(self.items) < self.capacity)
                        if self.stop:
                            return
                        self.items.append(batch)
                        self.cond.notify_all()
        except BaseException as exc:  # handed to the consumer, raised there
            with self.cond:
                self.items.append(exc)
                self.cond.notify_all()
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def __iter__(self) -> Iterator[_Batch]:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.items) or self.done)
                if not self.items:
                    return
                item = self.items.popleft()
                self.cond.notify_all()
            if isinstance(item, BaseException):
                raise item
            if item.ready is not None:
                forward = torch.cuda.current_stream(item.tiles.device)
                forward.wait_event(item.ready)
                item.tiles.record_stream(forward)
            yield item

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join()


def thread_budget(threads: int | None, readers: int, *, accelerator: bool = False) -> tuple[int, int]:
    """Split ``threads`` (default: the CPUs this process may use) between slide-reader
    threads and torch's intra-op threads: (readers, torch threads), never more in all.
    On a CPU the forward pass needs the cores, so readers take at most half; on an
    accelerator the forward runs there and one host thread drives it, so every other
    granted CPU reads and decodes."""
    budget = max(1, threads or available_cpus())
    if accelerator and budget > 1:
        return budget - 1, 1
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
    # on a CPU a batch is one chunk
    size = min((fw.batch_size for fw in forwards), default=settings.batch_size)
    appender = _Appender(arrays)
    bar = Progress(total, desc=f"encode {slide.path.name}")
    device = torch.device(settings.device)
    producer = _Producer(_batches(scale_tiles(slide, scales, settings), size), capacity=3, device=device)
    try:
        for batch in producer:
            tiles = settings.stain(batch.tiles) if settings.stain is not None else batch.tiles
            for fw in forwards:
                emb = fw(tiles)
                for sc, start, k in batch.segments:  # to the host on the writer thread
                    appender.add((sc, fw.enc.name), emb[start : start + k])
            bar.update(len(batch.tiles))
    finally:
        producer.close()
        bar.close()
        appender.close()
    return total
