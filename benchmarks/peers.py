"""histoalign-wsi beside LazySlide and TIAToolbox on one generated 40x Aperio slide (JPEG
tiles, 0.25 µm/px), two tasks, each tool as a whole process in its own virtual
environment (import time included), repeats interleaved, medians reported:

  tissue + tiling   find tissue, lay 224 px tiles at 0.5 µm/px
  read tiles        the pixels of the *same* tiles (our tiling's coordinates, handed to
                    every tool) at 0.5 µm/px, as uint8 arrays
  read 3 scales     the same for our nested tiles at 0.5, 1 and 2 µm/px: ours in one
                    pass, each peer one pass per scale, from the level it would choose

    python benchmarks/peers.py --install-peers          # once: venvs in benchmarks/out/peers/
    python benchmarks/peers.py --size 20000 --repeats 3

Peers are installed into their own venvs (LazySlide 0.13, TIAToolbox 2.1, each with the
torch this machine holds), never into the project's environment or CI. Targets (#15):
reading at 0.5 µm/px >= 2x the fastest peer; three scales in one pass >= 3x the fastest
peer doing three passes; tissue + tiling >= 3x both, with peak RSS below both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, report

VENVS = OUT / "peers"
_VENV_DIR = [VENVS]  # --venvs replaces it
PEERS = {"lazyslide": "lazyslide==0.13.*", "tiatoolbox": "tiatoolbox==2.1.*"}
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]

_RSS = "import resource; RSS = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"

OURS_TILE = (
    _RSS
    + """
import json, time
from histoalign_wsi.config import load_config
from histoalign_wsi.stages import run_tile
t = time.perf_counter()
cfg = load_config(overrides={{"scales_mpp": [0.5], "tile_px": 224}})
out = run_tile({slide!r}, {work!r} + "/ours_tiles.zarr", cfg)
from histoalign_wsi.features.store import open_store
n = len(open_store(out).scale(open_store(out).scale_names[0]).coords)
print(json.dumps({{"task_s": time.perf_counter() - t, "n": n, "rss": RSS()}}))
"""
)

OURS_TILE3 = (
    _RSS
    + """
import json, time
from histoalign_wsi.config import load_config
from histoalign_wsi.stages import run_tile
cfg = load_config(overrides={{"scales_mpp": [0.5, 1.0, 2.0], "tile_px": 224}})
run_tile({slide!r}, {work!r} + "/ours_tiles3.zarr", cfg)
print(json.dumps({{"task_s": 0, "n": 0, "rss": RSS()}}))
"""
)

OURS_READ = (
    _RSS
    + """
import json, time
from histoalign_wsi.features.tile_source import ReadSettings, scale_tiles
from histoalign_wsi.features.store import open_store
from histoalign_wsi.slides.reader import open_slide
t = time.perf_counter()
st = open_store({store!r})
scales = [st.scale(n) for n in st.scale_names]
n, check = 0, 0
with open_slide({slide!r}) as s:  # the encode stage's reader: every scale from one pass
    for _, tiles in scale_tiles(s, scales, ReadSettings(tile_px=224, readers=2, prefetch=4)):
        n += len(tiles)
        check += int(tiles[:, :, 100, 100].sum())
print(json.dumps({{"task_s": time.perf_counter() - t, "n": n, "rss": RSS(), "check": check}}))
"""
)

TIA_TILE = (
    _RSS
    + """
import json, time
t = time.perf_counter()
from tiatoolbox.wsicore.wsireader import WSIReader
from tiatoolbox.tools import patchextraction
r = WSIReader.open({slide!r})
mask = r.tissue_mask(method="otsu", resolution=8, units="mpp")
ext = patchextraction.get_patch_extractor("slidingwindow", input_img=r, input_mask=mask,
                                          patch_size=(224, 224), stride=(224, 224),
                                          resolution=0.5, units="mpp")
n = len(ext.coordinate_list)
print(json.dumps({{"task_s": time.perf_counter() - t, "n": n, "rss": RSS()}}))
"""
)

TIA_READ = (
    _RSS
    + """
import json, time
import numpy as np
t = time.perf_counter()
from tiatoolbox.wsicore.wsireader import WSIReader
r = WSIReader.open({slide!r})
n, check = 0, 0
for name, mpp, _, _ in {passes!r}:  # one pass per scale
    coords = np.load({work!r} + "/" + name + ".npy")
    for x, y in coords:  # a plain read_rect loop: the fastest TIAToolbox path measured
        im = r.read_rect((int(x), int(y)), (224, 224), resolution=mpp, units="mpp")
        n += 1
        check += int(im[100, 100].sum())
print(json.dumps({{"task_s": time.perf_counter() - t, "n": n, "rss": RSS(), "check": check}}))
"""
)

LAZY_TILE = (
    _RSS
    + """
import json, time
t = time.perf_counter()
import lazyslide as zs
wsi = zs.open_wsi({slide!r}, store={work!r} + "/lazy.zarr")
zs.pp.find_tissues(wsi)
zs.pp.tile_tissues(wsi, 224, mpp=0.5)
n = len(wsi["tiles"])
print(json.dumps({{"task_s": time.perf_counter() - t, "n": n, "rss": RSS()}}))
"""
)

LAZY_READ = (
    _RSS
    + """
import json, time
import numpy as np
t = time.perf_counter()
import lazyslide as zs
from PIL import Image
wsi = zs.open_wsi({slide!r}, store={work!r} + "/lazy_read.zarr")
reader = wsi.reader
n, check = 0, 0
for name, _, level, px in {passes!r}:  # one pass per scale, from the best level
    coords = np.load({work!r} + "/" + name + ".npy")
    for x, y in coords:  # its reader, resized to 224 (as its tile dataset does)
        im = reader.get_region(int(x), int(y), px, px, level=level)
        im = Image.fromarray(np.asarray(im)[..., :3]).resize((224, 224), Image.Resampling.BILINEAR)
        im = np.asarray(im)
        n += 1
        check += int(im[100, 100].sum())
print(json.dumps({{"task_s": time.perf_counter() - t, "n": n, "rss": RSS(), "check": check}}))
"""
)


def _python(tool: str) -> str:
    return sys.executable if tool == "histoalign-wsi" else str(_VENV_DIR[0] / tool / "bin" / "python")


def install_peers() -> None:
    for name, spec in PEERS.items():
        venv = _VENV_DIR[0] / name
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *TORCH], check=True)  # the torch on this machine, not a new download
        subprocess.run([*pip, spec], check=True)


def _run(tool: str, code: str) -> dict[str, float]:
    t = time.perf_counter()
    proc = subprocess.run([_python(tool), "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"process_s": wall, "task_s": res["task_s"], "n": res["n"], "rss": res["rss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--install-peers", action="store_true", help="make the peers' venvs, then exit")
    ap.add_argument("--size", type=int, default=20000, help="slide side, level-0 px")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", nargs="+", default=["histoalign-wsi", "lazyslide", "tiatoolbox"])
    ap.add_argument("--venvs", type=Path, help=f"where the peers' venvs are, or go (default {VENVS})")
    args = ap.parse_args()
    if args.venvs:
        _VENV_DIR[0] = args.venvs
    if args.install_peers:
        install_peers()
        return
    import numpy as np

    from histoalign_wsi.slides.synthetic import DemoSlideSpec, Region, write_slide

    work = tempfile.mkdtemp(prefix="peers_")
    s = float(args.size)
    spec = DemoSlideSpec(
        name="peer",
        width=args.size,
        height=args.size,
        regions=(Region(1, s / 2, s / 2, 0.4 * s, 0.35 * s), Region(2, 0.6 * s, 0.4 * s, 0.1 * s, 0.1 * s)),
    )
    slide = str(write_slide(spec, Path(work) / "peer.svs"))
    from histoalign_wsi.features.store import open_store
    from histoalign_wsi.slides.reader import open_slide

    fmt = {"slide": slide, "work": work}
    _run("histoalign-wsi", OURS_TILE.format(**fmt))  # our tiles: the coordinates every tool reads
    _run("histoalign-wsi", OURS_TILE3.format(**fmt))
    passes: dict[str, list[tuple[str, float, int, int]]] = {}
    with open_slide(slide) as sl:
        for task, store in (("read tiles", "ours_tiles.zarr"), ("read 3 scales", "ours_tiles3.zarr")):
            st = open_store(Path(work) / store)
            passes[task] = []
            for name in st.scale_names:
                sv = st.scale(name)
                key = f"{store}_{name}"
                np.save(Path(work) / f"{key}.npy", sv.coords)
                level = sl.best_level(sv.size0 / 224)
                px = round(sv.size0 / sl.level_downsamples[level])
                passes[task].append((key, float(sv.mpp), level, px))
    tasks = {
        "tissue + tiling": {"histoalign-wsi": OURS_TILE, "tiatoolbox": TIA_TILE, "lazyslide": LAZY_TILE},
        "read tiles": {"histoalign-wsi": OURS_READ, "tiatoolbox": TIA_READ, "lazyslide": LAZY_READ},
        "read 3 scales": {"histoalign-wsi": OURS_READ, "tiatoolbox": TIA_READ, "lazyslide": LAZY_READ},
    }
    stores = {"read tiles": "ours_tiles.zarr", "read 3 scales": "ours_tiles3.zarr"}
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.repeats):  # interleaved: every tool once per round
        for tool in args.tools:
            for task, codes in tasks.items():
                args_ = {**fmt, "store": f"{work}/{stores.get(task, '')}", "passes": passes.get(task, [])}
                runs.setdefault((tool, task), []).append(_run(tool, codes[tool].format(**args_)))
    rows = []
    for (tool, task), rs in runs.items():
        rows.append(
            {
                "task": task,
                "tool": tool,
                "tiles": int(rs[0]["n"]),
                "process_s": statistics.median(r["process_s"] for r in rs),
                "task_s": statistics.median(r["task_s"] for r in rs),
                "peak_rss_mib": statistics.median(r["rss"] for r in rs),
            }
        )
    for task in tasks:
        ours = next(r for r in rows if r["tool"] == "histoalign-wsi" and r["task"] == task)
        for r in rows:
            if r["task"] == task:
                r["peer_over_ours"] = r["process_s"] / ours["process_s"]
    rows.sort(key=lambda r: (r["task"], r["process_s"]))
    cols = ["task", "tool", "tiles", "process_s", "task_s", "peak_rss_mib", "peer_over_ours"]
    report("peers", rows, cols, {"slide_px": args.size, "repeats": args.repeats})


if __name__ == "__main__":
    main()
