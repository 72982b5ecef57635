"""Every CLI subcommand on a small generated cohort, plus patch-folder classification."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histoalign_wsi.cli import build_parser, main
from histoalign_wsi.slides.reader import open_slide

from .conftest import shared


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    assert (
        main(
            [
                "make-demo-slides",
                str(d / "slides"),
                "--n",
                "2",
                "--width",
                "6144",
                "--height",
                "4608",
                "--ome-every",
                "2",
            ]
        )
        == 0
    )
    return d


def test_make_demo_slides(cohort: Path) -> None:
    slides = sorted(p.name for p in (cohort / "slides").iterdir())
    assert slides == ["demo_01.svs", "demo_02.ome.tiff"]
    with open_slide(cohort / "slides" / "demo_01.svs") as s:
        assert s.vendor == "aperio" and s.mpp == pytest.approx(0.25)
    with open_slide(cohort / "slides" / "demo_02.ome.tiff") as s:
        assert s.reader == "tiffslide" and s.level_count >= 2
    truth = cohort / "slides_truth"
    rows = list(csv.DictReader((truth / "labels.csv").open()))
    assert rows == [{"slide_id": "demo_01", "label": "TUM"}, {"slide_id": "demo_02", "label": "STR"}]
    meta = json.loads((truth / "demo_01" / "masks.json").read_text())
    tum = np.asarray(Image.open(truth / "demo_01" / meta["masks"]["TUM"])) > 0
    stroma = np.asarray(Image.open(truth / "demo_01" / meta["masks"]["STR"])) > 0
    assert tum.mean() > stroma.mean() > 0  # demo_01 is tumour-dominant
    assert not (cohort / "slides" / "labels.csv").exists()  # the slide folder holds only slides


def test_full_cli_chain(cohort: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = cohort / "results"
    stores = []
    for sid, name in [("demo_01", "demo_01.svs"), ("demo_02", "demo_02.ome.tiff")]:
        slide = str(cohort / "slides" / name)
        assert main(["tissue", slide, "--out", str(r / "tissue" / f"{sid}.png")]) == 0
        assert (
            main(
                [
                    "tile",
                    slide,
                    "--tissue",
                    str(r / "tissue" / f"{sid}.png"),
                    "--out",
                    str(r / "tiles" / f"{sid}.zarr"),
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "encode",
                    str(r / "tiles" / f"{sid}.zarr"),
                    "--slide",
                    slide,
                    "--out",
                    str(r / "features" / f"{sid}.zarr"),
                ]
            )
            == 0
        )
        stores.append(str(r / "features" / f"{sid}.zarr"))
    assert main(["embed-prompts", "--out", str(r / "text.npz"), "--cache", str(r / "cache")]) == 0
    assert (
        main(["calibrate", *stores, "--text", str(r / "text.npz"), "--out", str(r / "calibration.json")]) == 0
    )
    cal = json.loads((r / "calibration.json").read_text())
    assert set(cal["offsets"]) == {"0.50mpp", "1.00mpp", "2.00mpp"} and len(cal["offsets"]["0.50mpp"]) == 9
    assert cal["weighting"] == "slide" and cal["n_slides"] == 2 and len(cal["classes"]) == 9
    labels = cohort / "slides_truth" / "labels.csv"
    assert (
        main(
            [
                "score",
                *stores,
                "--text",
                str(r / "text.npz"),
                "--calibration",
                str(r / "calibration.json"),
                "--out",
                str(r),
                "--labels",
                str(labels),
            ]
        )
        == 0
    )
    table = pd.read_csv(r / "predictions.csv")
    assert list(table["slide_id"]) == ["demo_01", "demo_02"] and table["untrained"].all()
    probs = table[[c for c in table.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    metrics = json.loads((r / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["untrained"] is True and (r / "confusion_matrix.png").is_file()
    pred = json.loads((r / "predictions" / "demo_01.json").read_text())
    assert pred["calibrated"] and pred["untrained"] and len(pred["top_tiles"]) == 10
    assert main(["summarize", str(r / "predictions" / "demo_01.json"), "--out", str(r / "one.csv")]) == 0
    assert len(pd.read_csv(r / "one.csv")) == 1
    for sid, name in [("demo_01", "demo_01.svs"), ("demo_02", "demo_02.ome.tiff")]:
        assert (
            main(
                [
                    "heatmap",
                    str(r / "tile_scores" / f"{sid}.parquet"),
                    "--prediction",
                    str(r / "predictions" / f"{sid}.json"),
                    "--slide",
                    str(cohort / "slides" / name),
                    "--out",
                    str(r / "heatmaps" / sid),
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "export-geojson",
                    str(r / "tile_scores" / f"{sid}.parquet"),
                    "--prediction",
                    str(r / "predictions" / f"{sid}.json"),
                    "--store",
                    str(r / "tiles" / f"{sid}.zarr"),
                    "--out",
                    str(r / "geojson" / f"{sid}.geojson"),
                ]
            )
            == 0
        )
    assert main(["report", str(r / "predictions.csv"), "--out", str(r / "report.html")]) == 0
    html = (r / "report.html").read_text()
    assert "demo_01" in html and "untrained-warning" in html and "Metrics" in html


def test_classify_patches_on_real_crc_patches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = shared("patches", "kather_crc_val_he_7k")
    assert main(["classify-patches", str(root), "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    df = pd.read_csv(tmp_path / "predictions.csv")
    assert len(df) == 32 and summary["n"] == 32 and summary["untrained"] is True
    assert summary["accuracy"] == pytest.approx((df["label"] == df["predicted_class"]).mean())
    assert (tmp_path / "confusion_matrix.png").is_file()


def test_classify_patches_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = shared("patches", "lc25000_lung_224px")
    (tmp_path / "map.yaml").write_text("lung_aca: LUAD\nlung_scc: LUSC\n")
    code = main(
        [
            "classify-patches",
            str(root),
            "--out",
            str(tmp_path / "o"),
            "--mapping",
            str(tmp_path / "map.yaml"),
            "--set",
            "prompt_bag=nsclc",
        ]
    )
    assert code == 2 and "lung_n" in capsys.readouterr().err
    (tmp_path / "map.yaml").write_text("lung_aca: LUAD\nlung_scc: LUSC\nlung_n: LUAD\n")
    assert (
        main(
            [
                "classify-patches",
                str(root),
                "--out",
                str(tmp_path / "o"),
                "--mapping",
                str(tmp_path / "map.yaml"),
                "--set",
                "prompt_bag=nsclc",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["n"] == 150


def test_config_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text("slides: x\nscales_mmp: [0.5]\n")
    assert main(["encoders", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "scales_mmp" in capsys.readouterr().err
    assert main(["encoders", "--set", "scales_mpp=[1.0, 0.5]"]) == 2
    assert "ascending" in capsys.readouterr().err


def test_every_subcommand_holds_its_thread_pools_to_the_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--threads N` (the rule's threads) caps OpenMP/BLAS pools and torch's intra-op
    threads in every stage; without it a user's own OMP_NUM_THREADS is respected."""
    import cv2
    import torch

    before, cv_before = torch.get_num_threads(), cv2.getNumThreads()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
        monkeypatch.delenv(var, raising=False)
    try:
        assert main(["encoders", "--threads", "1"]) == 0
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"
        assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 1
        assert os.environ["OPENCV_FOR_THREADS_NUM"] == "1"
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert main(["encoders"]) == 0
        assert os.environ["OMP_NUM_THREADS"] == "3"  # the user's own setting stands
    finally:
        torch.set_num_threads(before)
        cv2.setNumThreads(cv_before)
    monkeypatch.chdir(tmp_path)
    for folder in ("f.zarr", "pairs"):  # inputs must exist: the parser refuses them otherwise
        (tmp_path / folder).mkdir()
    for sub in ("tissue", "tile", "score", "fit", "train-reports", "distill", "report"):
        assert build_parser().parse_args([sub, *_min_args(sub), "--threads", "2"]).threads == 2


def _min_args(sub: str) -> list[str]:
    return {
        "tissue": ["s.svs", "--out", "m.png"],
        "tile": ["s.svs", "--tissue", "m.png", "--out", "t.zarr"],
        "score": ["f.zarr", "--text", "t.npz", "--prediction", "p.json"],
        "fit": ["f.zarr", "--out", "m"],
        "train-reports": ["f.zarr", "--out", "r"],
        "distill": ["pairs", "--out", "d"],
        "report": ["p.csv", "--out", "r.html"],
    }[sub]


#: the stages that work on stored features, scores and predictions: numpy only, no torch
#: (a job of one of them would otherwise spend about 1.6 s and 500 MB importing it)
TORCH_FREE = (
    "score",
    "calibrate",
    "summarize",
    "heatmap",
    "export-geojson",
    "evaluate-segmentation",
    "report",
)


def _fresh(args: list[str]) -> dict[str, object]:
    """Run one subcommand in a new interpreter; report its exit code and whether torch
    (or torchvision, open_clip) was imported."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from histoalign_wsi.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules)\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_stages_without_a_model_never_import_torch(cohort: Path, tmp_path: Path) -> None:
    """Each stage that needs no model runs for real in a fresh process, on the outputs
    of the chain, and finishes without torch in ``sys.modules``."""
    r = cohort / "results"
    sid, slide = "demo_01", str(cohort / "slides" / "demo_01.svs")
    store = r / "features" / f"{sid}.zarr"
    if not store.exists():  # the chain test did not run first (a -k selection)
        assert main(["tissue", slide, "--out", str(r / "tissue" / f"{sid}.png")]) == 0
        tiles = str(r / "tiles" / f"{sid}.zarr")
        assert main(["tile", slide, "--tissue", str(r / "tissue" / f"{sid}.png"), "--out", tiles]) == 0
        assert main(["encode", tiles, "--slide", slide, "--out", str(store)]) == 0
    text = tmp_path / "text.npz"
    assert main(["embed-prompts", "--out", str(text), "--cache", str(tmp_path / "cache")]) == 0
    o = tmp_path / "out"
    pred, ts = o / "predictions" / f"{sid}.json", o / "tile_scores" / f"{sid}.parquet"
    runs = {
        "calibrate": [str(store), "--text", str(text), "--out", str(o / "calibration.json")],
        "score": [str(store), "--text", str(text), "--prediction", str(pred), "--tile-scores", str(ts)],
        "summarize": [str(pred), "--out", str(o / "predictions.csv")],
        "heatmap": [str(ts), "--prediction", str(pred), "--slide", slide, "--out", str(o / "heatmaps" / sid)],
        "export-geojson": [
            *(str(ts), "--prediction", str(pred), "--store", str(r / "tiles" / f"{sid}.zarr")),
            *("--out", str(o / "geojson" / f"{sid}.geojson")),
        ],
        "evaluate-segmentation": [
            *(str(ts), "--truth", str(cohort / "slides_truth" / sid / "masks.json")),
            *("--out", str(o / "seg.json")),
        ],
        "report": [str(o / "predictions.csv"), "--out", str(o / "report.html")],
    }
    assert tuple(sorted(runs)) == tuple(sorted(TORCH_FREE))
    for stage, args in runs.items():  # in dependency order
        res = _fresh([stage, *args])
        assert res == {"rc": 0, "heavy": []}, (stage, res)
    assert (o / "report.html").is_file() and (o / "geojson" / f"{sid}.geojson").is_file()
