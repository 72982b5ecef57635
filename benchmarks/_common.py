"""Helpers shared by the benchmark scripts: child-process measurement and reporting."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"


def run_child(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON line. Adds wall time and the
    child's peak RSS (MiB), so each measurement has its own memory high-water mark."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    res.setdefault("wall_s", wall)
    res["children_max_rss_mib_so_far"] = usage.ru_maxrss / 1024
    return res


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(
    name: str, rows: list[dict[str, Any]], columns: list[str], extra: dict[str, Any] | None = None
) -> Path:
    """Print a table and write ``out/<name>.json``."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    meta = {"machine": platform.platform(), "python": platform.python_version(), "cpus": _cpus()}
    from histoalign_wsi._json import finite_json  # no NaN in JSON: a value not measured is null

    doc = finite_json({"benchmark": name, "meta": meta | (extra or {}), "rows": rows})
    path.write_text(json.dumps(doc, indent=2, allow_nan=False))
    print(f"\nwrote {path}")
    return path


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
