"""The real Snakemake workflow on a small generated cohort (no mocks)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from histoalign_wsi.features.store import open_store
from histoalign_wsi.slides.synthetic import make_demo_cohort

from .conftest import CMU, REPO

pytestmark = pytest.mark.slow


def smk_command(workdir: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """The snakemake command line on the repo's Snakefile, and an env that finds the CLI."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
    ]
    return [*cmd, *args], env


def smk(
    workdir: Path, *args: str, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess[str]:
    cmd, env = smk_command(workdir, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from Snakemake's 'Job stats' table."""
    counts = {}
    for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", output, re.M):
        if m.group(1) not in ("total", "job", "count"):
            counts[m.group(1)] = int(m.group(2))
    return counts


DROP = object()  # write_config(w, key=DROP): the key is absent from the file


def write_config(workdir: Path, **kw: object) -> None:
    cfg = {
        "slides": "slides",
        "results": "results",
        "labels": "slides_truth/labels.csv",
        "encode": {"batch_size": 32},
        "heatmap": {"max_size": 512},
    } | kw
    cfg = {k: v for k, v in cfg.items() if v is not DROP}
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wf_slides")
    make_demo_cohort(d / "slides", n=2, width=6144, height=4608, ome_every=2)
    shutil.copy(CMU, d / "slides" / CMU.name)
    return d


def _workdir(tmp: Path, slides: Path) -> Path:
    (tmp / "slides").symlink_to(slides / "slides")
    (tmp / "slides_truth").symlink_to(slides / "slides_truth")
    return tmp


@pytest.fixture(scope="module")
def done(slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = _workdir(tmp_path_factory.mktemp("wf_run"), slides)
    shutil.copy(REPO / "histoalign_wsi" / "zeroshot" / "bags" / "crc.yaml", w / "bag.yaml")
    write_config(w, prompt_bag="bag.yaml")
    smk(w, "--cores", "2")
    return w


def test_every_output_exists(done: Path) -> None:
    r = done / "results"
    ids = ["CMU-1-Small-Region", "demo_01", "demo_02"]
    for sid in ids:
        assert open_store(r / "features" / f"{sid}.zarr").validate() == []
        assert (r / "predictions" / f"{sid}.json").is_file()
        assert (r / "heatmaps" / sid / "argmax.webp").is_file()
        assert (r / "geojson" / f"{sid}.geojson").stat().st_size > 100
    for f in ("predictions.csv", "report.html", "metrics.json", "confusion_matrix.png"):
        assert (r / f).is_file(), f
    # one job per stage for the batch of three slides (slides_per_job 20), one encoder load
    for stage in ("prepare", "encode", "finish"):
        assert (r / "batches" / stage / "b00000.tsv").is_file()
        assert (r / "benchmarks" / stage / "b00000.tsv").is_file()
    log = (r / "logs" / "encode" / "b00000.log").read_text()
    assert log.count("loaded encoder(s) demo for this batch") == 1 and log.count("encoded ") == 3


def test_second_run_has_nothing_to_do(done: Path) -> None:
    out = smk(done, "--cores", "2", "-n")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_editing_the_prompt_bag_reruns_only_downstream_of_encoding(done: Path) -> None:
    bag = done / "bag.yaml"
    original = bag.read_text()
    bag.write_text(original.replace("a blank white or light grey area", "a blank white area"))
    try:
        out = smk(done, "--cores", "2", "-n")
    finally:
        bag.write_text(original)
    counts = job_counts(out.stdout + out.stderr)
    assert counts.get("embed_prompts") == 1 and counts.get("finish") == 1  # one batch
    assert {"prepare", "encode"}.isdisjoint(counts), counts
    assert {"summarize", "report"} <= set(counts)


def test_lint_is_clean(done: Path) -> None:
    out = smk(done, "--lint")
    assert "Congratulations" in out.stdout + out.stderr


def test_misspelled_key_fails_validation(slides: Path, tmp_path: Path) -> None:
    w = _workdir(tmp_path, slides)
    write_config(w, scales_mmp=[0.5])
    out = smk(w, "-n", check=False)
    assert out.returncode != 0 and "scales_mmp" in out.stdout + out.stderr


def test_keep_going_with_a_corrupt_slide(slides: Path, tmp_path: Path) -> None:
    w = tmp_path
    (w / "slides").mkdir()
    for p in (slides / "slides").iterdir():
        if p.name.startswith("demo_01") or p.name.startswith("CMU"):
            (w / "slides" / p.name).symlink_to(p)
    (w / "slides" / "broken.svs").write_bytes(CMU.read_bytes()[:20000])
    write_config(w, labels=DROP)  # no labels key at all: a user's own slides
    out = smk(w, "--cores", "2", "--keep-going", check=False)
    assert out.returncode != 0
    r = w / "results"
    log = (r / "logs" / "prepare" / "b00000.log").read_text()
    assert "broken.svs" in log and "truncated or damaged" in log
    # the batch went on: its good slides were encoded with one encoder load
    assert (r / "logs" / "encode" / "b00000.log").read_text().count("encoded ") == 2
    import pandas as pd

    table = pd.read_csv(r / "predictions.csv")
    assert sorted(table["slide_id"]) == ["CMU-1-Small-Region", "broken", "demo_01"]
    bad = table.set_index("slide_id").loc["broken"]
    assert bad["status"] == "failed" and "truncated or damaged" in bad["error"]
    assert table.set_index("slide_id").filter(like="prob_").loc["broken"].isna().all()
    html = (r / "report.html").read_text(encoding="utf-8")
    assert "1 failed" in html and "<table id='failed-slides'>" in html and "truncated or damaged" in html
    assert (r / "geojson" / "demo_01.geojson").is_file()
    failed = (r / "failed_slides.tsv").read_text()
    assert "broken" in failed and "broken.svs" in failed
    row = next(ln for ln in failed.splitlines() if ln.startswith("broken\t"))
    assert "prepare: slide '" in row and "truncated or damaged" in row
    assert "asyncio" not in failed and "Traceback" not in failed
    assert not (r / "metrics.json").exists()
    # the user removes the bad slide; the run that then succeeds clears the stale report
    (w / "slides" / "broken.svs").unlink()
    smk(w, "--cores", "2")
    assert not (r / "failed_slides.tsv").exists()
    assert not (r / ".histoalign-run.lock").exists()  # released after the run


def test_results_lock_refuses_a_second_run_and_clears_a_stale_one(tmp_path: Path) -> None:
    import socket

    w = tmp_path
    (w / "slides").mkdir()
    shutil.copy(CMU, w / "slides" / CMU.name)
    write_config(w, labels=DROP)
    target = "results/slides/CMU-1-Small-Region.tsv"
    lock_file = w / "results" / ".histoalign-run.lock"
    lock_file.parent.mkdir()
    other = subprocess.Popen(["sleep", "120"])
    lock = {"host": socket.gethostname(), "pid": other.pid, "started": "earlier", "cwd": "/another/checkout"}
    lock_file.write_text(json.dumps(lock))
    try:
        out = smk(w, "--cores", "1", target, check=False)
        assert (
            out.returncode != 0
            and f"pid {other.pid}" in out.stderr
            and "another run is using it" in out.stderr
        )
        assert not (w / target).exists()
    finally:
        other.kill()
        other.wait()
    # the other run was killed: its lock is stale, cleared with a warning, and the run goes on
    out = smk(w, "--cores", "1", target)
    assert "cleared a stale lock" in out.stderr and (w / target).is_file() and not lock_file.exists()
    # a lock from another host cannot be checked: refused until the user clears it
    lock_file.write_text(json.dumps(lock | {"host": "node-17"}))
    target = "results/predictions.csv"  # not made yet: a run that has work to do
    out = smk(w, "--cores", "1", target, check=False)
    assert out.returncode != 0 and "node-17" in out.stderr and "histoalign-wsi unlock" in out.stderr
    from histoalign_wsi.cli import main

    assert main(["unlock", str(w / "results")]) == 0 and not lock_file.exists()
    smk(w, "--cores", "1", target)


def test_non_ascii_slide_names_run(tmp_path: Path) -> None:
    w = tmp_path
    (w / "slides").mkdir()
    for name in ("café.svs", "中文.svs", "日本.svs"):
        shutil.copy(CMU, w / "slides" / name)
    write_config(w, labels=DROP)
    targets = [f"results/slides/{sid}.tsv" for sid in ("café", "中文", "日本")]
    smk(w, "--cores", "2", *targets)
    assert all((w / t).is_file() for t in targets)
    assert all((w / "results" / "geojson" / f"{sid}.geojson").is_file() for sid in ("café", "中文", "日本"))


def test_readme_own_slides_command_from_a_fresh_checkout(tmp_path: Path) -> None:
    """The README's "your own slides" command, run as written (paths swapped for real
    ones) from a copy of the checkout where no demo was ever made."""
    import shlex

    text = (REPO / "README.md").read_text()
    section = text.split("## Your own slides", 1)[1]
    cmd = re.search(r"```bash\n(snakemake .+?)\n```", section, re.S).group(1)  # type: ignore[union-attr]
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("Snakefile", "config.yaml", "workflow", "envs"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, checkout / name)
    data = tmp_path / "data"
    (data / "cohort").mkdir(parents=True)
    shutil.copy(CMU, data / "cohort" / CMU.name)
    (data / "labels.csv").write_text("slide_id,label\nCMU-1-Small-Region,LUAD\n")
    args = shlex.split(cmd.replace("/data/", f"{data}/"))
    assert args[0] == "snakemake" and "--config" in args
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    args = [sys.executable, "-m", *args[:1], *[a for a in args[1:]]]
    args[args.index("--cores") + 1] = "2"
    proc = subprocess.run(args, cwd=checkout, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (checkout / "demo").exists()
    m = json.loads((data / "results" / "metrics.json").read_text())
    assert m["n"] == 1 and m["classes_present"] == ["LUAD"]


def test_kill_during_encoding_then_rerun_gives_same_features(
    slides: Path, done: Path, tmp_path: Path
) -> None:
    w = _workdir(tmp_path, slides)
    # the same settings as the uninterrupted run, so features must match bit for bit
    # (another batch size may change the last float16 bit through BLAS blocking)
    write_config(w)
    cmd, env = smk_command(w, "--cores", "1")
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    feats = w / "results" / "features"
    deadline = time.time() + 300
    while time.time() < deadline and not (feats.is_dir() and any(feats.glob(".*.tmp-*"))):
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in feats.iterdir():
        if not p.name.startswith("."):
            assert open_store(p).validate() == []  # anything under its final name is complete
    smk(w, "--unlock")
    smk(w, "--cores", "2", "--rerun-incomplete")
    for sid in ("CMU-1-Small-Region", "demo_01", "demo_02"):
        a, b = open_store(done / "results" / "features" / f"{sid}.zarr"), open_store(feats / f"{sid}.zarr")
        for s in a.scale_names:
            np.testing.assert_array_equal(a.features(s, "demo"), b.features(s, "demo"))


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("empty_folder", "holds no slide files"),
        ("missing_folder", "does not exist"),
        ("sheet_missing_path", "nowhere.svs"),
        ("sheet_duplicate", "duplicate slide id 'a'"),
        ("sheet_unsafe_id", "bad id!"),
        ("scales_empty", "scales_mpp"),
        ("scales_descending", "ascending"),
        ("unknown_encoder", "unknown encoder 'plipp'"),
        ("unknown_bag", "unknown prompt bag 'crcc'"),
        ("missing_labels", "label sheet 'nolabels.csv' does not exist"),
        ("labels_unknown_class", "classes not in the prompt bag: Tumour"),
        ("bad_device", "device"),
        ("reports_unknown_slide", "report sheet 'reports.csv': 1 slide id(s) are not in the cohort: 'nope'"),
        ("corpus_missing", "report_corpus 'no_corpus' does not exist"),
    ],
)
def test_bad_configuration_fails_at_validation(setup: str, needle: str, tmp_path: Path) -> None:
    w = tmp_path
    (w / "slides").mkdir()
    kw: dict[str, object] = {"labels": None}
    sheet = w / "sheet.csv"
    if setup == "missing_folder":
        kw["slides"] = "no_such_folder"
    elif setup.startswith("sheet"):
        rows = {
            "sheet_missing_path": "slide_id,path\na,nowhere.svs\n",
            "sheet_duplicate": f"slide_id,path\na,{CMU}\na,{CMU}\n",
            "sheet_unsafe_id": f"slide_id,path\nbad id!,{CMU}\n",
        }[setup]
        sheet.write_text(rows)
        kw["slides"] = "sheet.csv"
    elif setup != "empty_folder":
        shutil.copy(CMU, w / "slides" / CMU.name)
        (w / "labels.csv").write_text("slide_id,label\nCMU-1-Small-Region,Tumour\n")
        kw |= {
            "scales_empty": {"scales_mpp": []},
            "scales_descending": {"scales_mpp": [1.0, 0.5]},
            "unknown_encoder": {"encoders": ["plipp"]},
            "unknown_bag": {"prompt_bag": "crcc"},
            "missing_labels": {"labels": "nolabels.csv"},
            "labels_unknown_class": {"labels": "labels.csv"},
            "bad_device": {"device": "gpu0"},
            "reports_unknown_slide": {"reports": "reports.csv"},
            "corpus_missing": {"report_corpus": "no_corpus"},
        }[setup]
        (w / "reports.csv").write_text("slide_id,report\nCMU-1-Small-Region,Befund\nnope,x\n")
    write_config(w, **kw)
    out = smk(w, "-n", check=False)
    assert out.returncode != 0
    assert needle in out.stderr + out.stdout, out.stderr[-2000:]
    assert not (w / "results").exists()


@pytest.mark.slurm
def test_slurm_cluster_run_matches_local(slides: Path, done: Path, tmp_path: Path) -> None:
    from . import slurm_cluster

    why = slurm_cluster.available()
    if why:
        pytest.skip(why)
    # 20 slides: the three of the local run and 17 links to the small real slide, in two
    # batches of 10 (links cost nothing; the batches are what the cluster sees)
    w = tmp_path / "wd"
    (w / "slides").mkdir(parents=True)
    for p in (slides / "slides").iterdir():
        (w / "slides" / p.name).symlink_to(p)
    for i in range(17):
        (w / "slides" / f"extra {i:02d}.svs").symlink_to(CMU)
    (w / "slides_truth").symlink_to(slides / "slides_truth")
    shutil.copy(done / "bag.yaml", w / "bag.yaml")
    # the README's cluster command as it is (no resources on the command line); the test
    # node has no GPU and no accounting
    write_config(w, prompt_bag="bag.yaml", slides_per_job=10, cluster={"encode_gpus": 0})
    with slurm_cluster.slurm_cluster(tmp_path / "slurm") as ctl_log:
        out = smk(
            w, "--profile", str(REPO / "workflow" / "profiles" / "slurm"),
            "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "2",
            "--latency-wait", "10", "--jobs", "4", timeout=1500,
        )  # fmt: skip
        submitted = ctl_log.read_text().count("_slurm_rpc_submit_batch_job")
        jobs = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True).stdout
    text = out.stdout + out.stderr
    assert "executor: slurm" in text.lower() or "submitted with slurm jobid" in text.lower()
    # two batches x (prepare, encode, finish) + embed_prompts, summarize, run_record, report:
    # 10 cluster jobs for 20 slides (before batches: 6 per slide, 123 jobs)
    assert submitted == 10, submitted
    # the encode jobs got the profile's runtime, memory and CPUs, and used every CPU
    encode = [ln for ln in jobs.splitlines() if "rule_encode" in ln]
    assert len(encode) == 2, jobs[-2000:]
    for ln in encode:
        mem = re.search(r"MinMemoryNode=(\d+)M", ln)
        assert "TimeLimit=04:00:00" in ln and "NumCPUs=8" in ln and mem and int(mem.group(1)) >= 16000, ln
    # each encode job was given threads = its 8 CPUs, and used every CPU this machine has
    # of them (the test node declares 8; the machine may hold fewer)
    (main_log,) = (w / ".snakemake" / "log").glob("*.log")
    blocks = main_log.read_text().split("rule ")
    assert [x for x in blocks if x.startswith("encode:") and "threads: 8" in x], main_log.read_text()[-2000:]
    here = min(8, len(os.sched_getaffinity(0)))
    for log in (w / "results" / "logs" / "encode").glob("*.log"):
        text = log.read_text()
        budget = re.search(r"thread budget: (\d+) reader thread\(s\), (\d+) torch thread\(s\)", text)
        assert budget is not None and int(budget.group(1)) + int(budget.group(2)) == here, text[-500:]
    assert len(pd.read_csv(w / "results" / "predictions.csv")) == 20
    a, b = done / "results", w / "results"
    for sid in ("CMU-1-Small-Region", "demo_01", "demo_02"):
        fa, fb = open_store(a / "features" / f"{sid}.zarr"), open_store(b / "features" / f"{sid}.zarr")
        for s in fa.scale_names:
            np.testing.assert_array_equal(fa.features(s, "demo"), fb.features(s, "demo"))
        # the same prediction, byte for byte, but for where the slide is: each run names the
        # link it was given (a slide reached through a link keeps the link's name)
        pa, pb = (json.loads((r / "predictions" / f"{sid}.json").read_text()) for r in (a, b))
        assert Path(pa.pop("slide_path")).name == Path(pb.pop("slide_path")).name and pa == pb
        assert (a / "geojson" / f"{sid}.geojson").read_bytes() == (
            b / "geojson" / f"{sid}.geojson"
        ).read_bytes()
    table_a = pd.read_csv(a / "predictions.csv").set_index("slide_id")
    table_b = pd.read_csv(b / "predictions.csv").set_index("slide_id")
    pd.testing.assert_frame_equal(table_a, table_b.loc[table_a.index])
    assert (b / "report.html").is_file()


def test_fit_and_predict_targets_and_attention_outputs(tmp_path: Path) -> None:
    """`snakemake fit predict` trains the configured heads and predicts with each; with
    an abmil head the heatmaps and the GeoJSON then carry its attention."""
    make_demo_cohort(tmp_path / "slides", n=4, width=3072, height=2304, ome_every=0)
    w = tmp_path
    write_config(w, heads=["linear", "abmil"], fit={"folds": 2, "epochs": 4})
    smk(w, "--cores", "2", "fit", "predict")
    r = w / "results"
    cv = json.loads((r / "models" / "cv_metrics.json").read_text())
    assert set(cv["heads"]) == {"linear", "abmil", "abmil_noscale"} and cv["n_slides"] == 4
    for head in ("linear", "abmil", "abmil_noscale"):
        table = pd.read_csv(r / "heads" / head / "predictions.csv")
        assert sorted(table["slide_id"]) == ["demo_01", "demo_02", "demo_03", "demo_04"]
    smk(w, "--cores", "2")
    assert (r / "heatmaps" / "demo_01" / "attention.webp").is_file()
    gj = json.loads((r / "geojson" / "demo_01.geojson").read_text())
    tile = next(f for f in gj["features"] if f["properties"]["objectType"] == "tile")
    assert "attention" in tile["properties"]["measurements"]
    # the report shows the heads: their cross-validated metrics, a prediction column
    # each, and the attention map beside a slide's heatmaps
    html = (r / "report.html").read_text(encoding="utf-8")
    assert "<table id='heads'>" in html and "abmil_noscale (ablation" in html
    data = json.loads(html.split("id='report-data'>", 1)[1].split("</script>", 1)[0])
    assert data["heads"] == ["abmil", "abmil_noscale", "linear"]
    row = next(x for x in data["rows"] if x[0] == "demo_01")
    heads_csv = pd.read_csv(r / "heads" / "linear" / "predictions.csv").set_index("slide_id")
    assert row[8]["linear"][0] == heads_csv.loc["demo_01", "predicted_class"]
    assert row[7]["attention"].endswith("heatmaps/demo_01/attention.webp")


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("train_reports", "the train_reports target needs a report sheet: --config reports=PATH"),
        ("distill", "the distill target needs labels: --config labels=PATH"),
        ("pair_reports", "the pair_reports and distill targets need a corpus: --config report_corpus=PATH"),
    ],
)
def test_report_targets_without_their_inputs_are_refused_before_any_job(
    target: str, needle: str, tmp_path: Path
) -> None:
    (tmp_path / "slides").mkdir()
    shutil.copy(CMU, tmp_path / "slides" / CMU.name)
    write_config(tmp_path, labels=None)
    out = smk(tmp_path, "-n", target, check=False)
    assert out.returncode != 0 and needle in out.stdout + out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Exception" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "results").exists()


def test_report_targets_train_pair_distill_and_reach_the_report_page(tmp_path: Path) -> None:
    """`snakemake train_reports distill` on a generated cohort with a report sheet and an
    unpaired corpus; the full run then shows both results on the report page."""
    make_demo_cohort(tmp_path / "slides", n=6, width=3072, height=2304, ome_every=0)
    w = tmp_path
    labels = pd.read_csv(w / "slides_truth" / "labels.csv")
    reports = pd.DataFrame(
        {
            "slide_id": labels["slide_id"],
            "report": [f"Befund: {c}; Fall {i} — ü" for i, c in enumerate(labels["label"])],
        }
    )
    reports.to_csv(w / "reports.csv", index=False)
    (w / "corpus").mkdir()
    for i in range(12):
        (w / "corpus" / f"r{i:02d}.txt").write_text(f"Report {i}: {labels['label'][i % 6]}", encoding="utf-8")
    write_config(
        w,
        reports="reports.csv",
        report_corpus="corpus",
        train_reports={"epochs": 2, "batch_size": 2},
        distill={"epochs": 5},
    )
    smk(w, "--cores", "2", "train_reports", "distill")
    r = w / "results"
    m = json.loads((r / "reports" / "metrics.json").read_text())
    assert set(m["models"]) == {"scale_aware", "no_scale"} and m["splits"] == {
        "train": 2,
        "val": 2,
        "test": 2,
    }
    assert (r / "reports" / "scale_aware" / "model.safetensors").is_file()
    assert len(pd.read_csv(r / "pairs" / "pairs.csv")) == 6 * 5
    d = json.loads((r / "distill" / "metrics.json").read_text())
    assert set(d["metrics"]) == {"student", "baseline", "teacher_with_text"}
    smk(w, "--cores", "2")
    page = (r / "report.html").read_text(encoding="utf-8")
    assert "id='report-models'" in page and "id='distill'" in page


def test_calibrated_run_hands_the_offsets_to_score(slides: Path, tmp_path: Path) -> None:
    w = _workdir(tmp_path, slides)
    write_config(w, calibration=True)
    out = smk(w, "-n", "-p", "--forceall")
    text = out.stdout + out.stderr
    score_cmds = [ln for ln in text.splitlines() if "histoalign-wsi batch finish " in ln]
    assert len(score_cmds) == 1 and all("--calibration results/calibration.json" in c for c in score_cmds)
    assert "rule calibrate" in text
