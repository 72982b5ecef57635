"""Attention-MIL training cost on synthetic feature stores: one epoch's wall time next to
the time to read every feature once from the stores, and peak RSS, for growing cohorts
(bags streamed from the stores, not held: ``cache_mb=0``).

    python benchmarks/fit_mil.py                               # 200 x 10,000 x 512, 3 scales
    python benchmarks/fit_mil.py --slides 25 50 --tiles 2000      # smaller, quicker

Targets: an epoch <= 1.5 x the read time (I/O bounds it, not Python); peak RSS < 4 GB and
flat in the number of slides.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, run_child

CHILD = """
import json, resource, time
import numpy as np, torch
from pathlib import Path
from histoalign_wsi.learn.abmil import ABMILConfig, ScaleAwareABMIL, train_epoch
from histoalign_wsi.learn.bags import BagSource
torch.set_num_threads(2)
paths = sorted(Path({folder!r}).glob("*.zarr"))[: {n}]
src = BagSource(paths, cache_mb=0)
ids = list(src.ids)
t = time.perf_counter()
for s in ids:
    src.bag(s)
read_s = time.perf_counter() - t
model = ScaleAwareABMIL(ABMILConfig(in_dim=src.dim, n_classes=2, n_scales=len(src.scale_names)))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
y = np.array([i % 2 for i in range(len(ids))])
t = time.perf_counter()
train_epoch(model, opt, src, ids, y)  # the training code itself: bags prefetched in a thread
epoch_s = time.perf_counter() - t
print(json.dumps({{"read_s": read_s, "epoch_s": epoch_s,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_stores(folder: Path, slides: int, tiles: int, dim: int) -> None:
    """Stores with ``tiles`` fine tiles, a quarter at 1.0 and a sixteenth at 2.0 µm/px."""
    import numpy as np
    import zarr

    from histoalign_wsi.features.store import create_features, write_tiling
    from histoalign_wsi.slides.tiling import ScaleGrid, Tiling

    rng = np.random.default_rng(0)
    for i in range(slides):
        grids = []
        for f, n in ((1, tiles), (2, tiles // 4), (4, tiles // 16)):
            side = int(np.ceil(np.sqrt(n)))
            xy = np.array([((j % side) * 448 * f, (j // side) * 448 * f) for j in range(n)], np.int32)
            grids.append(ScaleGrid(0.5 * f, 448 * f, xy.reshape(-1, 2), np.ones(n, np.float32)))
        for g in grids:
            for c in grids[grids.index(g) + 1 :]:
                g.parents[c.name] = np.full(len(g), -1, np.int32)
        w = 448 * int(np.ceil(np.sqrt(tiles))) + 4096
        path = folder / f"s{i:04d}.zarr"
        write_tiling(
            path,
            Tiling(0.25, (w, w), 224, 0.25, tuple(grids)),
            slide_attrs={"id": f"s{i:04d}", "path": "x.svs", "level0_dims": [w, w], "mpp": 0.25},
            tissue_attrs={},
            config_hash="bench",
        )
        root = zarr.open_group(path, mode="r+")
        for g in grids:
            x = rng.normal(size=(len(g), dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            attrs = {"encoder": "bench", "weights_sha256": "0" * 64, "embedding_dim": dim, "normalized": True}
            arr = create_features(root[f"scales/{g.name}/features"], "bench", len(g), dim, attrs)  # type: ignore[arg-type]
            arr[...] = x.astype(np.float16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument(
        "--tiles", type=int, default=10_000, help="fine tiles per slide (plus 1/4 and 1/16 coarser)"
    )
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fit-mil-"))
    try:
        make_stores(work, max(args.slides), args.tiles, args.dim)
        rows = []
        for n in args.slides:
            r = run_child(CHILD.format(folder=str(work), n=n))
            rows.append(
                {
                    "slides": n,
                    "tiles_per_slide": args.tiles * 21 // 16,
                    "read_s": r["read_s"],
                    "epoch_s": r["epoch_s"],
                    "epoch_over_read": r["epoch_s"] / r["read_s"],
                    "peak_rss_mib": r["peak_rss_mib"],
                }
            )
        cols = ["slides", "tiles_per_slide", "read_s", "epoch_s", "epoch_over_read", "peak_rss_mib"]
        report("fit_mil", rows, cols, {"dim": args.dim, "targets": "epoch <= 1.5 x read; RSS < 4 GB, flat"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
