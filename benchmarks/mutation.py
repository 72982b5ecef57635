"""Mutation testing of the modules whose numbers users see (alignment, pooling, scoring,
calibration, metrics, segmentation) and of the learning modules (few-shot, probes, heads,
patient groups, the contrastive loss, attention MIL): mutmut changes the code one small
edit at a time and runs the tests; a mutant the tests do not kill is a number that can
be wrong unnoticed. Not part of CI (it takes long); run it after touching those modules.

    python -m pip install -e ".[dev,mutation]"
    python benchmarks/mutation.py              # prints survivors per module, writes out/mutation.json
    mutmut show <name>                          # the diff of one survivor

The modules and tests are configured in pyproject.toml under [tool.mutmut].
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

REPO = Path(__file__).resolve().parents[1]


def _mutmut(*args: str) -> str:
    exe = shutil.which("mutmut") or str(Path(sys.executable).parent / "mutmut")
    proc = subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True)
    return proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep", action="store_true", help="reuse an earlier run's mutants/ (resume)")
    ap.add_argument(
        "modules",
        nargs="*",
        help="only these modules, e.g. histoalign_wsi.zeroshot.pooling (default: all configured)",
    )
    args = ap.parse_args()
    if not args.keep:
        shutil.rmtree(REPO / "mutants", ignore_errors=True)
    names = [f"{m}*" for m in args.modules]
    print(_mutmut("run", "--max-children", str(args.max_children), *names)[-2000:])
    lines = _mutmut("results", "--all", "true").splitlines()
    status = {}
    for ln in lines:
        m = re.match(r"\s*([\w.]+__mutmut_\d+): (\w[\w ]*)$", ln)
        if m:
            status[m.group(1)] = m.group(2).strip()
    per_module: dict[str, Counter[str]] = {}
    for name, st in status.items():
        module = name.split(".x")[0]
        per_module.setdefault(module, Counter())[st] += 1
    rows = [
        {
            "module": mod,
            "mutants": sum(c.values()),
            "killed": c.get("killed", 0),
            "survived": c.get("survived", 0),
            "other": sum(v for k, v in c.items() if k not in ("killed", "survived")),
        }
        for mod, c in sorted(per_module.items())
    ]
    survivors = sorted(n for n, s in status.items() if s == "survived")
    report("mutation", rows, ["module", "mutants", "killed", "survived", "other"], {"survivors": survivors})
    if survivors:
        print("\nsurvivors (mutmut show NAME for the diff):")
        print("\n".join(f"  {s}" for s in survivors))


if __name__ == "__main__":
    main()
