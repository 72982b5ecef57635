"""Cohort scale: what grows with the number of slides, side by side at several sizes.

    python benchmarks/cohort_scale.py                       # all parts, default sizes
    python benchmarks/cohort_scale.py --parts dag --dag 1000 4000 10000
    python benchmarks/cohort_scale.py --parts real --real 20

Parts (each a fresh process, peak RSS read by ``os.wait4``):

- ``dag``: ``snakemake -n`` on folders of N symbolic links to one small slide (no pixel
  is read): wall time, peak RSS and the number of jobs.
- ``real``: the real workflow on N small generated slides at ``--cores 2``: wall time per
  slide, and per rule the mean job time (Snakemake's benchmark files) beside the time the
  same command spends starting and importing (its ``--help``, a fresh process), and how
  many times the encode model was loaded.
- ``report``: ``report.html`` of N slides (synthetic predictions, heatmaps linked from one
  small image): bytes, bytes per slide, time to write, and time for headless Chromium to
  load it and draw the table.
- ``memory``: peak RSS of ``calibrate`` over N small feature stores and of ``summarize``
  over N prediction files, at two sizes: flat means the stage does not hold the cohort.

Writes ``out/cohort_scale.json``; the figures are in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report
from encode_memory import measure

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "data" / "CMU-1-Small-Region.svs"
EXE = str(Path(sys.executable).parent / "histoalign-wsi")
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def _links(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"slide_{i:05d}.svs").symlink_to(SMALL)
    return folder


def part_dag(sizes: list[int], tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        slides = _links(tmp / f"dag{n}", n)
        cmd = [SNAKEMAKE, "-n", "--quiet", "--cores", "2", "--directory", str(REPO)]
        cmd += ["--snakefile", str(REPO / "Snakefile"), "--config", f"slides={slides}"]
        cmd += [f"results={tmp / f'res{n}'}"]
        out = subprocess.run([*cmd, "--summary"], capture_output=True, text=True, cwd=REPO)
        jobs = max(0, len(out.stdout.strip().splitlines()) - 1)
        rss, wall = measure(cmd)
        rows.append({"part": "dag", "slides": n, "jobs": jobs, "wall_s": wall, "peak_rss_mib": rss})
        print(rows[-1], flush=True)
        shutil.rmtree(slides)
    return rows


def _startup(stage: str) -> float:
    """Seconds a fresh ``histoalign-wsi STAGE --help`` takes: start-up and the parser."""
    t = time.perf_counter()
    subprocess.run([EXE, stage, "--help"], capture_output=True, check=True)
    return time.perf_counter() - t


def part_real(n: int, tmp: Path) -> list[dict[str, Any]]:
    slides = tmp / "real"
    subprocess.run(
        [EXE, "make-demo-slides", str(slides), "--n", str(n), "--width", "4096", "--height", "3072"],
        check=True,
        capture_output=True,
    )
    res = tmp / "real_results"
    cmd = [SNAKEMAKE, "--cores", "2", "--directory", str(REPO), "--config", f"slides={slides}"]
    cmd += [f"results={res}"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    wall = time.perf_counter() - t
    rows: list[dict[str, Any]] = [{"part": "real", "slides": n, "rule": "(all)", "wall_s": wall}]
    rows[0]["wall_per_slide_s"] = wall / n
    for rule_dir in sorted((res / "benchmarks").iterdir()):
        if not rule_dir.is_dir():
            continue
        secs = [
            float(f.read_text().splitlines()[1].split("\t")[0])
            for f in rule_dir.glob("*.tsv")
            if f.stat().st_size
        ]
        stage = rule_dir.name.replace("_", "-")
        rows.append(
            {
                "part": "real",
                "slides": n,
                "rule": rule_dir.name,
                "jobs": len(secs),
                "mean_job_s": float(np.mean(secs)) if secs else None,
                "startup_s": _startup(stage),
            }
        )
    loads = sum(
        len(re.findall(r"loaded encoder|loading encoder", f.read_text(errors="replace")))
        for f in (res / "logs" / "encode").glob("*.log")
    )
    rows.append({"part": "real", "slides": n, "rule": "encode model loads", "jobs": loads})
    return rows


def _synthetic_results(res: Path, n: int) -> None:
    sys.path.insert(0, str(REPO))
    import pandas as pd
    from PIL import Image

    from tests.planting import make_prediction

    classes = [f"class {k}" for k in range(9)]
    colors = {c: (25 * k, 100, 200) for k, c in enumerate(classes)}
    (res / "predictions").mkdir(parents=True)
    img = res / "one.webp"
    Image.fromarray(np.full((144, 192, 3), 120, np.uint8)).save(img)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        sid = f"slide {i:05d}"
        p = rng.dirichlet(np.ones(9))
        pred = classes[int(p.argmax())]
        make_prediction(
            sid,
            classes,
            colors,
            predicted_class=pred,
            probabilities=dict(zip(classes, map(float, p), strict=True)),
            extra={"region_area_mm2": {pred: float(i % 7)}},
        ).write(res / "predictions" / f"{sid}.json")
        hm = res / "heatmaps" / sid
        hm.mkdir(parents=True)
        for name in ("argmax_thumb.webp", "argmax.webp"):
            (hm / name).symlink_to(img)
        rows.append(
            {"slide_id": sid, "predicted_class": pred, "status": "ok", "untrained": True, "n_tiles": i}
        )
    pd.DataFrame(rows).to_csv(res / "predictions.csv", index=False)


def _chromium_load_s(html: Path, tmp: Path) -> float | None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return None
    probe = html.with_name("probe.html")
    probe.write_text(
        html.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load',function(){document.title='READY '+"
            "document.body.dataset.ready;});</script></body>",
        )
    )
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    cmd += ["--disable-component-update", "--no-first-run", f"--user-data-dir={tmp / 'chrome'}"]
    t = time.perf_counter()
    out = subprocess.run([*cmd, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t
    return took if "READY 1" in out.stdout else None


def part_report(sizes: list[int], tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        res = tmp / f"report{n}"
        _synthetic_results(res, n)
        rss, wall = measure([EXE, "report", str(res / "predictions.csv"), "--out", str(res / "report.html")])
        size = (res / "report.html").stat().st_size
        rows.append(
            {
                "part": "report",
                "slides": n,
                "bytes": size,
                "bytes_per_slide": size / n,
                "wall_s": wall,
                "peak_rss_mib": rss,
                "chromium_load_s": _chromium_load_s(res / "report.html", tmp),
            }
        )
        print(rows[-1], flush=True)
        shutil.rmtree(res)
    return rows


def part_memory(sizes: list[int], tmp: Path) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO))
    from histoalign_wsi.zeroshot.text import save_text
    from tests.planting import build_store, make_text, unit

    text = save_text(make_text(tuple(f"c{k}" for k in range(9))), tmp / "text.npz")
    rows = []
    for n in sizes:
        d = tmp / f"mem{n}"
        stores = []
        rng = np.random.default_rng(n)
        for i in range(n):
            feats = {m: unit(rng.normal(size=(k, 32))) for m, k in ((0.5, 16), (1.0, 4), (2.0, 1))}
            stores.append(str(build_store(d / f"s{i:05d}.zarr", feats, slide_id=f"s{i:05d}")))
        rss, wall = measure([EXE, "calibrate", *stores, "--text", str(text), "--out", str(d / "cal.json")])
        rows.append(
            {"part": "memory", "stage": "calibrate", "slides": n, "wall_s": wall, "peak_rss_mib": rss}
        )
        print(rows[-1], flush=True)
        first = d / "pred" / "s00000.json"
        score = [EXE, "score", stores[0], "--text", str(text), "--prediction", str(first)]
        subprocess.run([*score, "--tile-scores", str(d / "t.parquet")], check=True, capture_output=True)
        obj = json.loads(first.read_text())
        preds = [first]
        for i in range(1, n):  # the one real prediction, copied under each id (cheap)
            preds.append(d / "pred" / f"s{i:05d}.json")
            preds[-1].write_text(json.dumps(obj | {"slide_id": f"s{i:05d}"}))
        rss, wall = measure([EXE, "summarize", *map(str, preds), "--out", str(d / "predictions.csv")])
        rows.append(
            {"part": "memory", "stage": "summarize", "slides": n, "wall_s": wall, "peak_rss_mib": rss}
        )
        print(rows[-1], flush=True)
        shutil.rmtree(d)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--parts", nargs="+", default=["dag", "report", "memory"], choices=["dag", "real", "report", "memory"]
    )
    ap.add_argument("--dag", type=int, nargs="+", default=[1000, 4000, 10000])
    ap.add_argument("--real", type=int, default=200)
    ap.add_argument("--report", type=int, nargs="+", default=[200, 1000, 10000])
    ap.add_argument("--memory", type=int, nargs="+", default=[200, 2000])
    a = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cohort_scale_") as t:
        tmp = Path(t)
        if "dag" in a.parts:
            rows += part_dag(a.dag, tmp)
        if "report" in a.parts:
            rows += part_report(a.report, tmp)
        if "memory" in a.parts:
            rows += part_memory(a.memory, tmp)
        if "real" in a.parts:
            rows += part_real(a.real, tmp)
    cols = [
        "part",
        "slides",
        "rule",
        "stage",
        "jobs",
        "wall_s",
        "wall_per_slide_s",
        "mean_job_s",
        "startup_s",
    ]
    cols += ["peak_rss_mib", "bytes", "bytes_per_slide", "chromium_load_s"]
    report("cohort_scale", rows, [c for c in cols if any(c in r for r in rows)])


if __name__ == "__main__":
    main()
