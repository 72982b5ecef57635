"""Tissue detection + nested tiling: wall time and peak RSS against slide size, next to
the time openslide needs to read the thumbnail level alone (same run, same slides).

    python benchmarks/tiling.py [--sizes 10000 40000 100000] [--keep DIR]

Target: peak RSS flat in slide size and < 1 GB; tissue + tiling of 100k^2 < 5 s on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report, run_child

from histoalign_wsi.slides.synthetic import DemoSlideSpec, Region, write_slide

TISSUE_TILE = """
import json, resource, time
from histoalign_wsi.config import load_config
from histoalign_wsi.slides.reader import open_slide
from histoalign_wsi.slides.tiling import tile_slide
from histoalign_wsi.slides.tissue import detect_tissue
cfg = load_config()
t = time.perf_counter()
with open_slide({path!r}) as s:
    res = detect_tissue(s, cfg.tissue, max_megapixels=cfg.max_read_megapixels)
    t1 = time.perf_counter()
    tiling = tile_slide(res.mask, mask_scale=res.scale, slide_mpp=s.mpp, level0_dims=s.dimensions,
                        params=cfg.tiling)
t2 = time.perf_counter()
print(json.dumps({{"tissue_s": t1 - t, "tiling_s": t2 - t1, "total_s": t2 - t,
                  "tiles": [len(g) for g in tiling.scales],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

THUMB = """
import json, resource, time, openslide
t = time.perf_counter()
s = openslide.OpenSlide({path!r})
lvl = s.level_count - 1
s.read_region((0, 0), lvl, s.level_dimensions[lvl])
print(json.dumps({{"thumb_s": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def spec_for(size: int) -> DemoSlideSpec:
    s = float(size)
    regions = (
        Region(1, 0.45 * s, 0.5 * s, 0.3 * s, 0.35 * s, 0.3),
        Region(2, 0.6 * s, 0.45 * s, 0.12 * s, 0.1 * s),
        Region(3, 0.8 * s, 0.75 * s, 0.08 * s, 0.07 * s),
    )
    return DemoSlideSpec(name=f"bench_{size}", width=size, height=size, regions=regions, seed=size % 97)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000, 100000])
    ap.add_argument("--keep", type=Path, help="folder to keep the generated slides in")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="tiling-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        path = work / f"bench_{size}.svs"
        if not path.exists():
            t = time.perf_counter()
            write_slide(spec_for(size), path)
            print(f"generated {path.name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        thumb = run_child(THUMB.format(path=str(path)))
        tt = run_child(TISSUE_TILE.format(path=str(path)))
        rows.append(
            {
                "slide_px": f"{size}x{size}",
                "file_mib": path.stat().st_size / 2**20,
                "tissue_s": tt["tissue_s"],
                "tiling_s": tt["tiling_s"],
                "tissue+tiling_s": tt["total_s"],
                "thumb_read_s": thumb["thumb_s"],
                "ratio_to_thumb": tt["total_s"] / thumb["thumb_s"],
                "peak_rss_mib": tt["peak_rss_mib"],
                "thumb_peak_rss_mib": thumb["peak_rss_mib"],
                "tiles_per_scale": "/".join(map(str, tt["tiles"])),
            }
        )
    report(
        "tiling",
        rows,
        list(rows[0]),
        {"targets": {"peak_rss_mib": "< 1024, flat", "tissue+tiling_s@100k": "< 5"}},
    )


if __name__ == "__main__":
    main()
