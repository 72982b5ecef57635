"""The README opens with the two commands, and CI runs the README's test command."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, re.S)[:2]


def test_readme_opens_with_demo_and_test_commands() -> None:
    demo, tests = _commands()
    assert "snakemake" in demo and "make-demo-slides" in demo and "torch==" in demo
    assert "pytest" in tests and "torch==" in tests


def test_ci_runs_the_readme_test_command() -> None:
    _, tests = _commands()
    assert tests.strip() in (REPO / ".ci" / "run").read_text()


def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text(), re.S)


def _lines(block: str) -> list[str]:
    """The commands of a block (comments and continuations joined)."""
    text = block.replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _learning_blocks() -> list[str]:
    return [b for b in _blocks() if ("demo/" in b and "make-demo-data" in b) or "demo/reports.csv" in b]


def test_every_cli_line_in_the_readme_names_real_subcommands_and_options() -> None:
    """Each `histoalign-wsi ...` line of every block: a known subcommand, and each of its
    `--options` one that subcommand takes (checked against the parser itself)."""
    from histoalign_wsi.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    seen = 0
    for block in _blocks():
        for line in _lines(block):
            for part in line.split("&&"):
                words = shlex.split(part)
                if not words or words[0] != "histoalign-wsi":
                    continue
                seen += 1
                sub = subs[words[1]]
                known = {o for a in sub._actions for o in a.option_strings}
                for w in words[2:]:
                    if w.startswith("-") and not w.startswith("--set="):
                        assert w.split("=")[0] in known, f"{words[1]} has no option {w}: {line}"
    assert seen >= 7


@pytest.mark.slow
def test_the_readme_learning_commands_run_as_written(tmp_path: Path) -> None:
    """The learning sections' blocks, every line in order, for real, in a fresh folder
    with the repository's config.yaml: sample data, few-shot curves, the heads, the
    report models, pairing and distillation, and `predict` with the saved heads (about
    2 minutes on 2 cores)."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    smk = f"{shlex.quote(sys.executable)} -m snakemake --snakefile {shlex.quote(str(REPO / 'Snakefile'))}"
    lines = [ln for b in _learning_blocks() for ln in _lines(b)]
    assert lines[0] == "histoalign-wsi make-demo-data demo", lines
    for line in lines:
        cmd = line.replace("snakemake", smk, 1) if line.startswith("snakemake") else line
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        if line.startswith("histoalign-wsi") and line.split()[1] in ("few-shot", "distill", "pair-reports"):
            assert "the numbers above are" in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]
    demo = tmp_path / "demo"
    for out in ("few_shot/summary.json", "results/models/cv_metrics.json", "results/reports/metrics.json"):
        assert (demo / out).is_file(), out
    for out in ("new/predictions.csv", "new_distilled/predictions.csv", "distilled/metrics.json"):
        assert (demo / out).is_file(), out
    assert len(list((demo / "new" / "predictions").glob("*.json"))) == 10
    # the sample data is made once: a second run leaves every file as it was
    data = [p for d in ("cohort", "patches", "corpus") for p in (demo / d).rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in [*data, demo / "labels.csv", demo / "reports.csv"]}
    subprocess.run(lines[0], shell=True, cwd=tmp_path, env=env, check=True, capture_output=True)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_the_demo_line_leaves_its_inputs_untouched_when_run_again(tmp_path: Path) -> None:
    """The README's demo line, less the install and the workflow: the slides it makes and
    copies keep their bytes and times on a second run, so Snakemake has nothing to do
    (the workflow tests check `Nothing to be done` on an unchanged folder)."""
    demo = _commands()[0]
    steps = [s.strip() for s in demo.split("&&")]
    data = [s for s in steps if not s.startswith(("python -m pip", "snakemake"))]
    assert len(data) == 2 and data[0].startswith("histoalign-wsi make-demo-slides"), steps
    (tmp_path / "tests" / "data").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "data" / "CMU-1-Small-Region.svs", tmp_path / "tests" / "data")
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    script = " && ".join(data)
    subprocess.run(script, shell=True, cwd=tmp_path, env=env, check=True, capture_output=True)
    files = [p for p in (tmp_path / "demo").rglob("*") if p.is_file()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    time.sleep(0.05)
    subprocess.run(script, shell=True, cwd=tmp_path, env=env, check=True, capture_output=True)
    assert len(files) >= 8 and all((p.stat().st_mtime_ns, p.read_bytes()) == before[p] for p in files)


def test_the_gpu_check_script_parses_and_names_files_that_exist() -> None:
    script = REPO / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    named = set(re.findall(r"((?:tests|benchmarks)/[\w/]+\.py)", text))
    assert {"benchmarks/encode_throughput.py", "tests/slides/test_device_jpeg.py"} <= named
    assert all((REPO / n).is_file() for n in named), named
    assert "--no-index" in text  # the GPU machine has no registry
