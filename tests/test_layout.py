"""The house plan holds: imports run one way through the pipeline's subpackages, the
CLI module only builds the parser, and the workflow glue loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

PKG = REPO / "histoalign_wsi"
ORDER = ["slides", "features", "zeroshot", "learn", "outputs"]


def _imports(path: Path) -> set[str]:
    """Package-relative targets of every import in ``path`` (``slides.reader``, ...)."""
    here = path.relative_to(PKG).parent.parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - (node.level - 1)])
            target = [*base, *(node.module.split(".") if node.module else [])]
            out.add(".".join(target))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("histoalign_wsi."):
            out.add(node.module.removeprefix("histoalign_wsi."))
    return out


def test_subpackages_import_only_earlier_stages() -> None:
    bad = []
    for i, sub in enumerate(ORDER):
        later = [*ORDER[i + 1 :], "stages", "cli", "workflow"]
        for f in (PKG / sub).rglob("*.py"):
            for target in _imports(f):
                if target.split(".")[0] in later:
                    bad.append(f"{f.relative_to(REPO)} imports {target}")
    assert bad == []


def test_import_checker_sees_a_backward_import(tmp_path: Path) -> None:
    f = PKG / "slides" / "reader.py"
    assert "errors" in _imports(f)
    # the checker resolves relative imports the way Python does
    probe = PKG / "zeroshot" / "scoring.py"
    assert {"features.store", "zeroshot.alignment"} <= _imports(probe)


def test_every_module_stays_small() -> None:
    big = {
        str(f.relative_to(REPO)): n for f in PKG.rglob("*.py") if (n := len(f.read_text().splitlines())) > 400
    }
    assert big == {}


def test_cli_and_workflow_glue_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import histoalign_wsi.cli, histoalign_wsi.workflow, histoalign_wsi.features\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_snakefile_dry_run_imports_no_torch(tmp_path: Path) -> None:
    """A fake ``torch`` that fails on import sits first on the path: a dry run that
    imported torch anywhere (Snakefile, rules, workflow helpers) would fail."""
    import shutil

    from .conftest import CMU
    from .test_workflow import smk, write_config

    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    w = tmp_path / "w"
    (w / "slides").mkdir(parents=True)
    shutil.copy(CMU, w / "slides" / CMU.name)
    write_config(w, labels=None)
    import os

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(fake) + (os.pathsep + old if old else "")
    try:
        out = smk(w, "-n", check=False)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch was imported" not in out.stderr
    # and the fake really shadows torch for the same interpreter
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], capture_output=True, text=True, env={"PYTHONPATH": str(fake)}
    )
    assert probe.returncode != 0 and "torch was imported" in probe.stderr


def test_encoders_listing_loads_no_model_and_says_where_it_looked(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from histoalign_wsi.cli import main\n"
        "rc = main(['encoders'])\n"
        "torch = any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
        "print('TORCH' if torch else 'NO-TORCH', rc)\n"
    )
    env = {"HF_HUB_CACHE": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.strip().endswith("NO-TORCH 0")
    plip = next(ln for ln in out.splitlines() if ln.startswith("plip"))
    assert str(tmp_path / "hf") in plip and "vinid/plip" in plip and "offline is true" in plip


def test_tests_mirror_the_layout() -> None:
    tests = REPO / "tests"
    for sub in ORDER:
        assert (tests / sub / "__init__.py").is_file() and list((tests / sub).glob("test_*.py")), sub
