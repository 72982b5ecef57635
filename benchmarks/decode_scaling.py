"""Does the CPU decode scale with reader threads, and what holds the GIL?

1. Decode throughput (every scale's tiles, as the encode stage makes them on the CPU:
   read, decode, cut, area reduce, stack) with 1, 2, ... reader threads, interleaved
   rounds, best of each; the ratio to one reader.
2. Per stage of a block (read the compressed tiles, decode them, cut and reduce every
   scale's tiles, stack them), the time per tile in one thread, and what of it runs one
   thread at a time (the GIL, or any other lock): two threads each run the whole stage at
   once; with a serial share g, Amdahl gives a speed-up of 2 / (1 + g) on two idle
   cores, so g = 2 / speed-up - 1 (``serial_share``; times it by the stage's time for
   ``serial_ms_per_tile``). ``probe_slowdown`` is a second, cruder view: how much a
   pure-Python loop on another thread slows while the stage runs (1 - its rate then / its
   rate alone). It over-counts stages that take and drop the GIL often, since every
   hand-over also costs the probe a thread wake-up.

    python benchmarks/decode_scaling.py                 # generated 24,000 x 24,000 slide
    python benchmarks/decode_scaling.py --readers 1 2 4 8 --size 40000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

from histoalign_wsi.config import load_config
from histoalign_wsi.features.encode import EncodeSettings
from histoalign_wsi.features.pyramids import CpuPyramid as _CpuPyramid
from histoalign_wsi.features.store import open_store
from histoalign_wsi.features.tile_source import plan_blocks, plan_reads, read_plans, scale_tiles
from histoalign_wsi.slides.reader import open_slide
from histoalign_wsi.slides.synthetic import demo_cohort, write_slide
from histoalign_wsi.stages import run_tile


def _probe_rate(seconds: float, stop: threading.Event | None = None) -> float:
    n, t0 = 0, time.perf_counter()
    while (stop is None and time.perf_counter() - t0 < seconds) or (stop is not None and not stop.is_set()):
        for _ in range(1000):
            n += 1
    return n / (time.perf_counter() - t0)


def _gil_share(work: Callable[[], Any], alone: float) -> tuple[float, float]:
    """(seconds of ``work``, the share of them it held the GIL)."""
    stop = threading.Event()
    rate: list[float] = []
    probe = threading.Thread(target=lambda: rate.append(_probe_rate(0, stop)))
    probe.start()
    t = time.perf_counter()
    work()
    took = time.perf_counter() - t
    stop.set()
    probe.join()
    return took, max(0.0, 1.0 - rate[0] / alone)


def _timed(fn: Callable[[], Any], threads: int) -> float:
    """Seconds for ``threads`` threads each running ``fn`` whole, at once."""
    pool = [threading.Thread(target=fn) for _ in range(threads)]
    t = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=24_000)
    ap.add_argument("--readers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec, _ = demo_cohort(1, width=args.size, height=args.size, seed=7, ome_every=0)[0]
        path = write_slide(spec, Path(tmp) / "s.svs")
        store = open_store(run_tile(path, Path(tmp) / "t.zarr", load_config()))
        scales = [store.scale(n) for n in store.scale_names]
        n = sum(len(sv.coords) for sv in scales)
        best: dict[int, float] = {}
        for _ in range(args.rounds):
            for r in args.readers:
                s = EncodeSettings(tile_px=224, readers=r, prefetch=4, device="cpu", native_jpeg=True)
                with open_slide(path) as slide:
                    t = time.perf_counter()
                    for _ in scale_tiles(slide, scales, s):
                        pass
                    best[r] = max(best.get(r, 0.0), n / (time.perf_counter() - t))
        rows = [
            {
                "readers": r,
                "tiles": n,
                "tiles_per_s": best[r],
                "x_one_reader": best[r] / best[args.readers[0]],
            }
            for r in args.readers
        ]
        report("decode_scaling", rows, list(rows[0]), {"slide_px": args.size})

        # per stage, one thread, with the GIL probe on another core
        settings = EncodeSettings(tile_px=224, readers=1, device="cpu", native_jpeg=True)
        with open_slide(path) as slide:
            nj = slide.native_jpeg()
            assert nj is not None
            plans = read_plans(slide, scales, settings)
            blocks = plan_blocks(scales, block_size0=scales[-1].size0)
            pairs = [(b, r) for b in blocks for r in plan_reads(b, scales, plans)]
            pairs = pairs[: max(1, len(pairs) // 2)]
            boxes = []
            for b, r in pairs:
                d = r.plan.downsample
                box = (int(r.x0 / d), int(r.y0 / d), int(np.ceil(r.w0 / d)), int(np.ceil(r.h0 / d)))
                boxes.append((r, b, *box))
            alone = _probe_rate(1.0)
            n_tiles = sum(hi - lo for _, b, *_ in boxes for lo, hi in b.rows)

            def read() -> list[Any]:
                return [
                    [nj.stream(r.plan.level, p.index) for p in nj.plan(r.plan.level, x, y, w, h)]
                    for r, _, x, y, w, h in boxes
                ]

            def decode() -> list[Any]:
                out = []
                for r, _, _, _, w, h in boxes:
                    px = slide.read_scaled((r.x0, r.y0), r.plan.level, (w, h), r.plan.factor)
                    out.append(
                        px if px is not None else slide.read_region((r.x0, r.y0), r.plan.level, (w, h))
                    )
                return out

            pixels = decode()

            def cut() -> list[Any]:
                cuts = []
                for (r, b, *_), px in zip(boxes, pixels, strict=True):
                    pyr = _CpuPyramid(px, 224)
                    lds, f = r.plan.downsample, r.plan.factor
                    for s in r.scales:
                        lo, hi = b.rows[s]
                        if hi > lo:
                            size = scales[s].size0 / lds / f
                            cuts.append(pyr.tiles(scales[s].coords[lo:hi], r.x0, r.y0, size, 1 / (lds * f)))
                return cuts

            stage_rows: list[dict[str, Any]] = []
            for name, fn in (
                ("read compressed tiles", read),
                ("decode (DCT-scaled)", decode),
                ("cut + reduce + stack", cut),
            ):
                one = min(_timed(fn, 1) for _ in range(args.rounds))
                two = min(_timed(fn, 2) for _ in range(args.rounds))
                _, probe_share = _gil_share(fn, alone)
                x2 = 2 * one / two  # two threads each doing the whole stage
                gil = min(1.0, max(0.0, 2 / x2 - 1))  # Amdahl: the share that ran one at a time
                stage_rows.append(
                    {
                        "stage": name,
                        "ms_per_tile": 1000 * one / n_tiles,
                        "x_two_threads": x2,
                        "serial_share": gil,
                        "serial_ms_per_tile": 1000 * one * gil / n_tiles,
                        "probe_slowdown": probe_share,
                    }
                )
        cols = [
            "stage",
            "ms_per_tile",
            "x_two_threads",
            "serial_share",
            "serial_ms_per_tile",
            "probe_slowdown",
        ]
        report("decode_stages", stage_rows, cols, {"blocks": len(boxes), "tiles": n_tiles})


if __name__ == "__main__":
    main()
