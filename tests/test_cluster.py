"""The cluster settings: partitions and the account reach every job from config.yaml while
the SLURM profile's runtime, memory and CPUs stay whole (a dry run shows what would be
submitted), and the encode stage splits its granted CPUs by device."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from histoalign_wsi.features.encode import thread_budget

from .conftest import CMU, REPO


def _dry_run(tmp: Path, **cfg: object) -> str:
    (tmp / "slides").mkdir()
    (tmp / "slides" / "a.svs").symlink_to(CMU)
    (tmp / "config.yaml").write_text(yaml.safe_dump({"slides": "slides", "results": "results"} | cfg))
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp)]
    out = subprocess.run(
        [*cmd, "--profile", str(REPO / "workflow" / "profiles" / "slurm"), "-n"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def _resources(text: str, rule: str) -> str:
    block = text.split(f"rule {rule}:", 1)[1]
    return re.search(r"resources: (.*)", block).group(1)  # type: ignore[union-attr]


def test_the_profile_resources_stay_whole_with_partitions_from_the_config(tmp_path: Path) -> None:
    text = _dry_run(tmp_path, cluster={"partition": "cpu", "gpu_partition": "gpu", "account": "my lab"})
    enc = _resources(text, "encode")
    assert "runtime=240" in enc and "mem_mb=16000" in enc and "gpu=1" in enc
    assert "slurm_partition=gpu" in enc and "slurm_account=my lab" in enc
    prep = _resources(text, "prepare")
    assert "runtime=60" in prep and "mem_mb=2000" in prep and "slurm_partition=cpu" in prep


def test_without_cluster_settings_no_partition_is_asked_for(tmp_path: Path) -> None:
    text = _dry_run(tmp_path, cluster={"encode_gpus": 0})
    enc = _resources(text, "encode")
    assert "slurm_partition" not in enc and "slurm_account" not in enc and "gpu=0" in enc
    assert "runtime=240" in enc


def test_granted_cpus_are_split_by_device() -> None:
    assert thread_budget(8, 2) == (2, 6)  # a CPU forward needs the cores
    assert thread_budget(8, 2, accelerator=True) == (7, 1)  # a GPU forward needs one host thread
    assert thread_budget(1, 2, accelerator=True) == (1, 1)
    assert thread_budget(2, 2) == (1, 1)
