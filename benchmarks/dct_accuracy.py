"""How far the DCT-scaled native JPEG read is from the exact pixels, over every tile the
pipeline lays at a scale: each tile read the pipeline's way (native JPEG tiles decoded
at 1/2 or 1/4 by libjpeg-turbo's DCT scaling) and the exact way (OpenSlide's level-0
pixels, area-downsampled with OpenCV); mean absolute difference per channel and over all,
and the 99th percentile of the per-tile means.

    python benchmarks/dct_accuracy.py                       # generated 40,000 x 40,000 + CMU-1-Small-Region
    python benchmarks/dct_accuracy.py --size 12000 --slide ../shared/data/wsi/CMU-1.svs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

REPO = Path(__file__).resolve().parents[1]


def _generated(folder: Path, size: int) -> Path:
    from histoalign_wsi.slides.synthetic import demo_cohort, write_slide

    spec, _ = demo_cohort(1, width=size, height=size, seed=3, ome_every=0)[0]
    return write_slide(spec, folder / f"generated_{size}.svs")


def _tiles(slide_path: Path, mpp: float, folder: Path) -> tuple[list[tuple[int, int]], int]:
    from histoalign_wsi.config import load_config
    from histoalign_wsi.features.store import open_store
    from histoalign_wsi.stages.pipeline import run_tile

    cfg = load_config(overrides={"scales_mpp": [mpp]})
    store = open_store(run_tile(slide_path, folder / f"{slide_path.stem}_{mpp}.zarr", cfg))
    sv = store.scale(store.scale_names[0])
    size0 = int(store.root[f"scales/{store.scale_names[0]}"].attrs["level0_tile_size"])
    return [(int(x), int(y)) for x, y in np.asarray(sv.coords)], size0


def measure(slide_path: Path, mpp: float, folder: Path) -> dict[str, object]:
    from histoalign_wsi.slides.reader import open_slide

    coords, size0 = _tiles(slide_path, mpp, folder)
    with open_slide(slide_path, reader="openslide") as slide:
        ratio = size0 / 224
        scale = round(ratio) if abs(ratio - round(ratio)) < 1e-6 else 0
        per_tile, per_channel, n = [], np.zeros(3), 0
        for x, y in coords:
            dct = slide.read_scaled((x, y), 0, (size0, size0), scale) if scale in (2, 4, 8) else None
            if dct is None:
                continue
            exact = cv2.resize(
                slide.read_region((x, y), 0, (size0, size0)), dct.shape[1::-1], interpolation=cv2.INTER_AREA
            )
            diff = np.abs(dct.astype(np.int16) - exact.astype(np.int16))
            per_channel += diff.reshape(-1, 3).mean(axis=0)
            per_tile.append(float(diff.mean()))
            n += 1
    if not n:
        return {"slide": slide_path.name, "mpp": mpp, "tiles": 0}
    ch = per_channel / n
    return {
        "slide": slide_path.name,
        "level0_mpp": round(open_slide(slide_path).mpp, 4),
        "mpp": mpp,
        "dct": f"1/{scale}",
        "tiles": n,
        "mad": round(float(np.mean(per_tile)), 3),
        "mad_r": round(float(ch[0]), 3),
        "mad_g": round(float(ch[1]), 3),
        "mad_b": round(float(ch[2]), 3),
        "p99_tile_mad": round(float(np.percentile(per_tile, 99)), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size", type=int, default=40_000, help="side of the generated slide (level 0, 0.25 µm/px)"
    )
    ap.add_argument("--slide", type=Path, action="append", help="more slides (default: CMU-1-Small-Region)")
    ap.add_argument("--mpp", type=float, nargs="+", default=[0.5, 1.0])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        slides = [
            _generated(folder, args.size),
            *(args.slide or [REPO / "tests/data/CMU-1-Small-Region.svs"]),
        ]
        for s in slides:
            for mpp in args.mpp:
                rows.append(measure(s, mpp, folder))
                print(rows[-1], flush=True)
    cols = ["slide", "level0_mpp", "mpp", "dct", "tiles", "mad", "mad_r", "mad_g", "mad_b", "p99_tile_mad"]
    report("dct_accuracy", rows, cols)


if __name__ == "__main__":
    main()
