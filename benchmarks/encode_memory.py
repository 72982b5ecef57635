"""Peak resident memory of the `encode` command with the demo encoder (#15: < 1 GB), and
what it is made of: each row is its own process, whose own peak RSS is read from the
kernel when it exits (``os.wait4``), medians of ``--repeats`` interleaved rounds.

  import torch                      the floor PyPI's CUDA build of torch sets
  import torch + open_clip          the encoder library (torchvision, timm, transformers;
                                    with triton, as a plain import loads it)
  load the demo encoder (CPU)       as the encode stage loads it (triton kept out)
  encode, slide without tissue      the command with nothing to read
  encode, N tiles of 3 scales       the command on the generated slide

    python benchmarks/encode_memory.py --size 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

LOAD_DEMO = (
    "from histoalign_wsi.features import load_registry\n"
    "from histoalign_wsi.features.adapters import load_encoder\n"
    "load_encoder(load_registry()['demo'], device='cpu')\n"
)


def measure(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS MiB, wall s) of one process. Its stderr goes to a file: a pipe left
    unread while waiting would stall a chatty child once the pipe is full."""
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{cmd} failed:\n{err.read().decode(errors='replace')}")
    return usage.ru_maxrss / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000, help="slide side, level-0 px (0.25 µm/px)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from histoalign_wsi.features.store import open_store
    from histoalign_wsi.slides.synthetic import DemoSlideSpec, Region, write_slide

    work = Path(tempfile.mkdtemp(prefix="encode_memory_"))
    s = float(args.size)
    regions = (Region(1, s / 2, s / 2, 0.4 * s, 0.35 * s), Region(2, 0.6 * s, 0.4 * s, 0.1 * s, 0.1 * s))
    tissue = write_slide(
        DemoSlideSpec(name="tissue", width=args.size, height=args.size, regions=regions), work / "t.svs"
    )
    glass = write_slide(DemoSlideSpec(name="glass", width=4096, height=4096, regions=()), work / "g.svs")
    cli = [sys.executable, "-m", "histoalign_wsi.cli"]
    for slide in (tissue, glass):
        subprocess.run([*cli, "tile", str(slide), "--out", str(slide.with_suffix(".tiles.zarr"))], check=True)
    n_tiles = sum(
        len(st.scale(n).coords)
        for st in [open_store(tissue.with_suffix(".tiles.zarr"))]
        for n in st.scale_names
    )

    def encode(slide: Path) -> list[str]:
        out = slide.with_suffix(".features.zarr")
        shutil.rmtree(out, ignore_errors=True)
        return [
            *cli,
            "encode",
            str(slide.with_suffix(".tiles.zarr")),
            "--slide",
            str(slide),
            "--out",
            str(out),
        ]

    tasks = {
        "import torch": lambda: [sys.executable, "-c", "import torch"],
        "import torch + open_clip": lambda: [sys.executable, "-c", "import torch, open_clip"],
        "load the demo encoder (CPU)": lambda: [sys.executable, "-c", LOAD_DEMO],
        "encode, slide without tissue": lambda: encode(glass),
        f"encode, {n_tiles} tiles of 3 scales": lambda: encode(tissue),
    }
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in tasks}
    for _ in range(args.repeats):
        for name, cmd in tasks.items():
            runs[name].append(measure(cmd()))
    rows = [
        {
            "process": name,
            "peak_rss_mib": statistics.median(r[0] for r in rs),
            "max_peak_rss_mib": max(r[0] for r in rs),
            "peak_rss_gb": statistics.median(r[0] for r in rs) * 2**20 / 1e9,
            "wall_s": statistics.median(r[1] for r in rs),
        }
        for name, rs in runs.items()
    ]
    report(
        "encode_memory",
        rows,
        ["process", "peak_rss_mib", "max_peak_rss_mib", "peak_rss_gb", "wall_s"],
        {
            "slide_px": args.size,
            "tiles": n_tiles,
            "repeats": args.repeats,
            "target": "encode peak RSS < 1 GB",
        },
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
