"""Wall time of the README's demo (after installation): make the demo slides, add the
real CMU slide, run Snakemake, in a fresh temporary folder, on this machine's cores. Prints
the phases and the time per rule (from Snakemake's benchmark files) and writes JSON.

    python benchmarks/demo_time.py            # target: under 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> float:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="demo-time-"))
    for name in ("Snakefile", "config.yaml", "workflow", "envs"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    (work / "tests" / "data").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "data" / "CMU-1-Small-Region.svs", work / "tests" / "data")
    exe = str(Path(sys.executable).parent / "histoalign-wsi")
    t_slides = _run([exe, "make-demo-slides", "demo/slides"], work)
    shutil.copy(work / "tests" / "data" / "CMU-1-Small-Region.svs", work / "demo" / "slides")
    smk = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        "all",
        "--config",
        "labels=demo/slides_truth/labels.csv",
    ]
    t_smk = _run(smk, work)
    per_rule: dict[str, list[float]] = defaultdict(list)
    for tsv in (work / "results" / "benchmarks").rglob("*.tsv"):
        rule = tsv.parent.name if tsv.parent.name != "benchmarks" else tsv.stem
        with tsv.open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                per_rule[rule].append(float(row["s"]))
    rows = [{"phase": "make-demo-slides", "jobs": 1, "sum_s": t_slides, "max_s": t_slides}]
    rows += [
        {"phase": f"rule {r}", "jobs": len(v), "sum_s": sum(v), "max_s": max(v)}
        for r, v in sorted(per_rule.items(), key=lambda kv: -sum(kv[1]))
    ]
    rows.append(
        {
            "phase": "snakemake (wall)",
            "jobs": sum(len(v) for v in per_rule.values()),
            "sum_s": t_smk,
            "max_s": t_smk,
        }
    )
    total = t_slides + t_smk
    rows.append({"phase": "demo total (wall)", "jobs": None, "sum_s": total, "max_s": total})
    outputs = sorted(str(p.relative_to(work / "results")) for p in (work / "results").iterdir())
    report(
        "demo_time",
        rows,
        ["phase", "jobs", "sum_s", "max_s"],
        {"target_s": 180, "total_s": total, "outputs": outputs},
    )
    print(f"\ndemo total {total:.0f} s (target < 180 s); work folder {work}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
