"""Cohort scale: what grows with the number of slides, side by side at several sizes.

    python benchmarks/cohort_scale.py                       # all parts, default sizes
    python benchmarks/cohort_scale.py --parts dag --dag 1000 4000 10000
    python benchmarks/cohort_scale.py --parts real --real 20

Parts (each a fresh process, peak RSS read by ``os.wait4``):

- ``dag``: ``snakemake -n`` on folders of N symbolic links to one small slide (no pixel
  is read): wall time, peak RSS and the number of jobs.
- ``real``: the real workflow on N small generated slides at ``--cores 2``, once per
  ``slides_per_job`` value (same slides): wall time per slide, per batch rule its jobs
  and its time per slide (Snakemake's benchmark files), how many times the encoder was
  loaded; and what a fresh process spends starting the CLI and importing torch.
- ``report``: ``report.html`` of N slides (synthetic predictions, heatmaps linked from one
  small image): bytes, bytes per slide, time to write, and time for headless Chromium to
  load it and draw the table.
- ``rerun``: a rerun with nothing changed on a finished results folder of N links to one
  small slide (``--before REF`` beside it): what the provenance checks add.
- ``memory``: peak RSS of ``calibrate`` over N small feature stores and of ``summarize``
  over N prediction files, at two sizes: flat means the stage does not hold the cohort.

Writes ``out/cohort_scale.json``; the figures are in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
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

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "data" / "CMU-1-Small-Region.svs"
EXE = str(Path(sys.executable).parent / "histoalign-wsi")
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def measure(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[float, float]:
    """(peak RSS MiB, wall s) of one process, its stderr kept in a file (not a pipe)."""
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            raise RuntimeError(f"{cmd[:4]} failed:\n{err.read().decode(errors='replace')[-3000:]}")
    return usage.ru_maxrss / 1024, wall


class Code:
    """The code measured: this checkout, or ``--before REF`` checked out beside it (run
    from outside this checkout with the worktree first on PYTHONPATH)."""

    def __init__(self, label: str, root: Path, tmp: Path) -> None:
        self.label, self.root = label, root
        self.env = dict(os.environ) | ({"PYTHONPATH": str(root)} if root != REPO else {})
        self.cwd = tmp

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "histoalign_wsi.cli", *args]


def _links(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"slide_{i:05d}.svs").symlink_to(SMALL)
    return folder


def part_dag(sizes: list[int], tmp: Path, codes: list[Code]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        slides = _links(tmp / f"dag{n}", n)
        for code in codes:  # side by side, on the same links
            if code.label != "now" and n > 4000:
                continue  # minutes each before batches; the smaller sizes show the trend
            res = tmp / f"res{n}_{code.label.replace(' ', '_')}"
            cmd = [SNAKEMAKE, "-n", "--quiet", "--cores", "2", "--directory", str(tmp)]
            cmd += ["--snakefile", str(code.root / "Snakefile"), "--configfile", str(REPO / "config.yaml")]
            cmd += ["--config", f"slides={slides}", f"results={res}"]
            out = subprocess.run([*cmd, "--summary"], capture_output=True, text=True, cwd=tmp, env=code.env)
            jobs = len([ln for ln in out.stdout.splitlines()[1:] if ln.strip()])
            rss, wall = measure(cmd, env=code.env, cwd=tmp)
            row = {"part": "dag", "code": code.label, "slides": n, "jobs": jobs, "wall_s": wall}
            rows.append(row | {"peak_rss_mib": rss})
            print(rows[-1], flush=True)
        shutil.rmtree(slides)
    return rows


def _complete(res: Path, n: int) -> None:
    """A results folder as a finished run of ``n`` slides leaves it, as far as Snakemake
    looks: every batch manifest (every slide ok) and every cohort output. Snakemake's own
    records then come from ``--touch``."""
    from histoalign_wsi.batches import ManifestRow, cut_batches, write_manifest

    ids = [f"slide_{i:05d}" for i in range(n)]
    for batch, slides in cut_batches(ids, 20).items():
        for stage in ("prepare", "encode", "finish"):
            write_manifest(
                res / "batches" / stage / f"{batch}.tsv", [ManifestRow(s, "ok", "x") for s in slides]
            )
    for name in ("text_embeddings.npz", "predictions.csv", "report.html"):
        (res / name).write_bytes(b"")


def part_rerun(sizes: list[int], tmp: Path, codes: list[Code]) -> list[dict[str, Any]]:
    """A rerun with nothing changed (``snakemake --cores 2`` on a finished results folder
    of N links to one small slide): what the provenance checks (slide fingerprints by stat,
    encoder identities, prompt digests) add to it. Run twice after ``--touch``: the first
    rerun of ``now`` may still hash files the touch did not; the second is the steady state."""
    rows = []
    for n in sizes:
        slides = _links(tmp / f"rerun{n}", n)
        for code in codes:
            res = tmp / f"rr{n}_{code.label.replace(' ', '_')}"
            _complete(res, n)
            cmd = [
                SNAKEMAKE,
                "--cores",
                "2",
                "--directory",
                str(tmp),
                "--snakefile",
                str(code.root / "Snakefile"),
            ]
            cmd += [
                "--configfile",
                str(REPO / "config.yaml"),
                "--config",
                f"slides={slides}",
                f"results={res}",
            ]
            # every job's record (params included), as after a real run
            subprocess.run(
                [*cmd, "--touch", "--forceall"], capture_output=True, check=True, cwd=tmp, env=code.env
            )
            for attempt in ("first", "steady"):
                rss, wall = measure(cmd, env=code.env, cwd=tmp)
                row = {"part": "rerun", "code": code.label, "slides": n, "stage": attempt, "wall_s": wall}
                rows.append(row | {"peak_rss_mib": rss})
                print(rows[-1], flush=True)
            dry = subprocess.run([*cmd, "-n"], capture_output=True, text=True, cwd=tmp, env=code.env)
            if "Nothing to be done" not in dry.stdout + dry.stderr:
                raise RuntimeError(f"{code.label}: the rerun of {n} slides was not a no-change rerun")
            shutil.rmtree(res)
        shutil.rmtree(slides)
    return rows


def _startup(code: str) -> float:
    """Seconds a fresh interpreter takes to run ``code`` (start-up and imports)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    return time.perf_counter() - t


def part_real(n: int, per_job: list[int], tmp: Path) -> list[dict[str, Any]]:
    """The real workflow on ``n`` small generated slides at ``--cores 2``, once per
    ``slides_per_job`` value, on the same slides (fresh results each time)."""
    slides = tmp / "real"
    subprocess.run(
        [EXE, "make-demo-slides", str(slides), "--n", str(n), "--width", "4096", "--height", "3072"],
        check=True,
        capture_output=True,
    )
    rows: list[dict[str, Any]] = []
    for k in per_job:
        res = tmp / f"real_results_{k}"
        cmd = [SNAKEMAKE, "--cores", "2", "--directory", str(tmp), "--snakefile", str(REPO / "Snakefile")]
        cmd += ["--configfile", str(REPO / "config.yaml"), "--config", f"slides={slides}"]
        cmd += [f"results={res}", f"slides_per_job={k}"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=tmp)
        wall = time.perf_counter() - t
        loads = sum(
            f.read_text(errors="replace").count("loaded encoder(s)")
            for f in (res / "logs" / "encode").glob("*.log")
        )
        row: dict[str, Any] = {"part": "real", "slides": n, "slides_per_job": k, "wall_s": wall}
        row |= {"wall_per_slide_s": wall / n, "model_loads": loads}
        for rule in ("prepare", "encode", "finish"):
            secs = [
                float(f.read_text().splitlines()[1].split("\t")[0])
                for f in (res / "benchmarks" / rule).glob("*.tsv")
            ]
            row[f"{rule}_jobs"] = len(secs)
            row[f"{rule}_s_per_slide"] = sum(secs) / n
        rows.append(row)
        print(row, flush=True)
        shutil.rmtree(res)
    rows.append(
        {
            "part": "real",
            "slides": n,
            "cli_start_s": _startup("import histoalign_wsi.cli"),
            "torch_open_clip_import_s": _startup("import torch, open_clip"),
        }
    )
    return rows


def _synthetic_results(res: Path, n: int) -> None:
    sys.path.insert(0, str(REPO))
    from tests.planting import synthetic_cohort

    synthetic_cohort(res, n)


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


def part_memory(sizes: list[int], tmp: Path, codes: list[Code]) -> list[dict[str, Any]]:
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
        for code in codes:
            cmd = code.cli("calibrate", *stores, "--text", str(text), "--out", str(d / "cal.json"))
            rss, wall = measure(cmd, env=code.env, cwd=code.cwd)
            row = {"part": "memory", "code": code.label, "stage": "calibrate", "slides": n, "wall_s": wall}
            rows.append(row | {"peak_rss_mib": rss})
            print(rows[-1], flush=True)
        first = d / "pred" / "s00000.json"
        score = [EXE, "score", stores[0], "--text", str(text), "--prediction", str(first)]
        subprocess.run([*score, "--tile-scores", str(d / "t.parquet")], check=True, capture_output=True)
        obj = json.loads(first.read_text())
        preds = [first]
        for i in range(1, n):  # the one real prediction, copied under each id (cheap)
            preds.append(d / "pred" / f"s{i:05d}.json")
            preds[-1].write_text(json.dumps(obj | {"slide_id": f"s{i:05d}"}))
        for code in codes:
            cmd = code.cli("summarize", *map(str, preds), "--out", str(d / "predictions.csv"))
            rss, wall = measure(cmd, env=code.env, cwd=code.cwd)
            row = {"part": "memory", "code": code.label, "stage": "summarize", "slides": n, "wall_s": wall}
            rows.append(row | {"peak_rss_mib": rss})
            print(rows[-1], flush=True)
        shutil.rmtree(d)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["dag", "real", "report", "memory", "rerun"]
    ap.add_argument("--parts", nargs="+", default=["dag", "report", "memory"], choices=parts)
    ap.add_argument("--dag", type=int, nargs="+", default=[1000, 4000, 10000])
    ap.add_argument("--real", type=int, default=200, help="slides of the real run")
    ap.add_argument(
        "--slides-per-job", type=int, nargs="+", default=[1, 20], help="real run: values compared"
    )
    ap.add_argument("--report", type=int, nargs="+", default=[200, 1000, 10000])
    ap.add_argument("--memory", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--rerun", type=int, nargs="+", default=[1000, 10000], help="no-change rerun sizes")
    ap.add_argument("--before", help="a git ref measured beside this checkout (dag, memory), e.g. 7358e00")
    a = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cohort_scale_") as t:
        tmp = Path(t)
        codes = [Code("now", REPO, tmp)]
        if a.before:
            old = tmp / "before"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), a.before], check=True
            )
            codes.append(Code(f"before {a.before}", old, tmp))
        try:
            if "dag" in a.parts:
                rows += part_dag(a.dag, tmp, codes)
            if "report" in a.parts:
                rows += part_report(a.report, tmp)
            if "memory" in a.parts:
                rows += part_memory(a.memory, tmp, codes)
            if "rerun" in a.parts:
                rows += part_rerun(a.rerun, tmp, codes)
            if "real" in a.parts:
                rows += part_real(a.real, a.slides_per_job, tmp)
        finally:
            if a.before:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "before")])
    cols = ["part", "code", "slides", "stage", "slides_per_job", "jobs", "wall_s", "wall_per_slide_s"]
    cols += ["model_loads"] + [
        f"{r}_{x}" for r in ("prepare", "encode", "finish") for x in ("jobs", "s_per_slide")
    ]
    cols += ["cli_start_s", "torch_open_clip_import_s", "peak_rss_mib", "bytes", "bytes_per_slide"]
    cols += ["chromium_load_s"]
    report("cohort_scale", rows, [c for c in cols if any(c in r for r in rows)])


if __name__ == "__main__":
    main()
