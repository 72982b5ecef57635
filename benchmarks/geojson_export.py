"""QuPath GeoJSON export of many tiles: wall time, peak RSS and file size, for growing
tile counts in one run (each export in its own process so its memory is its own).

    python benchmarks/geojson_export.py [--tiles 10000 100000]

Target: 100k tiles export within bounded memory (the file streams; RSS does not grow
with the number of tiles beyond the tile-score table itself).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pandas as pd
from _common import report, run_child

from histoalign_wsi.zeroshot import tile_scores
from histoalign_wsi.zeroshot.tile_scores import TileScores, class_columns

CLASSES = ["TUM", "STR", "LYM", "NORM"]

EXPORT = """
import json, resource, time
from histoalign_wsi.outputs.geojson import export_geojson
t = time.perf_counter()
export_geojson({scores!r}, {out!r},
               colors={{c: (10 * i, 100, 200) for i, c in enumerate({classes!r})}},
               level0_dims=({dim}, {dim}))
print(json.dumps({{"export_s": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_scores(n: int, path: Path) -> int:
    side = int(np.ceil(np.sqrt(n)))
    size = 448
    i = np.arange(n)
    x, y = (i % side) * size, (i // side) * size
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, len(CLASSES))) + 3 * np.sin(x / 20000.0)[:, None] * np.eye(len(CLASSES))[0]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    df = pd.DataFrame(
        {"scale": "0.50mpp", "mpp": 0.5, "x": x, "y": y, "size0": size, "tissue_fraction": np.float32(1)}
    )
    probs = pd.DataFrame(p.astype(np.float32), columns=class_columns(CLASSES, "prob"))
    logits_df = pd.DataFrame(logits.astype(np.float32), columns=class_columns(CLASSES, "logit"))
    tile_scores.write(TileScores("bench", tuple(CLASSES), pd.concat([df, probs, logits_df], axis=1)), path)
    return int(side * size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, nargs="+", default=[1000, 10000, 100000])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="geojson-bench-"))
    rows = []
    for n in args.tiles:
        scores, out = work / f"s{n}.parquet", work / f"g{n}.geojson"
        dim = make_scores(n, scores)
        r = run_child(EXPORT.format(scores=str(scores), out=str(out), classes=CLASSES, dim=dim))
        rows.append(
            {
                "tiles": n,
                "export_s": r["export_s"],
                "peak_rss_mib": r["peak_rss_mib"],
                "file_mib": out.stat().st_size / 2**20,
                "tiles_per_s": n / r["export_s"],
            }
        )
    report("geojson_export", rows, list(rows[0]), {"target": "bounded memory at 100k tiles"})


if __name__ == "__main__":
    main()
