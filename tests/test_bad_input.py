"""Bad input gets one clear line naming the slide or file, a non-zero exit, no traceback,
and nothing partial: the cases of the adversarial run, each crafted small."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from histoalign_wsi.cli import main
from histoalign_wsi.slides.cohort import discover_slides, slide_id_for
from histoalign_wsi.slides.synthetic import DemoSlideSpec, Region, write_slide

from .conftest import CMU
from .planting import make_prediction

FREE_CLASSES = {
    "tumor cells": "tumour epithelium with pleomorphic nuclei",
    "Tumor-Zellen (grad 2)": "a second tumour class, its name with case and punctuation",
    "stroma/fibrosis 'desmo'": "collagen-rich desmoplastic stroma",
    "Lymphozyten <T & B>": "dense small round lymphocytes",
    "nécrose 壊死": "necrotic debris",
    "carcinoma, " * 27 + "NOS": "a 300-character name: its heatmap file name is cut and hashed",
}


def _one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("INFO")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("small")
    spec = DemoSlideSpec(
        name="small",
        width=3584,
        height=2688,
        regions=(Region(1, 1800, 1300, 1500, 1100), Region(2, 2400, 1000, 500, 400)),
    )
    return write_slide(spec, d / "small slide (é).svs")


def test_free_text_class_names_through_the_whole_chain(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    bag = {
        "templates": ["an image of {}."],
        "classes": {k: {"names": [k, v]} for k, v in FREE_CLASSES.items()},
    }
    (tmp_path / "bag.yaml").write_text(
        yaml.safe_dump(bag, allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    s = ["--set", f"prompt_bag={tmp_path / 'bag.yaml'}"]
    r = tmp_path / "r"
    sid = slide_id_for(small_slide)
    assert sid == "small_slide_é"
    assert main(["tile", str(small_slide), "--out", str(r / "tiles.zarr")]) == 0
    assert (
        main(["encode", str(r / "tiles.zarr"), "--slide", str(small_slide), "--out", str(r / "f.zarr")]) == 0
    )
    assert main(["embed-prompts", "--out", str(r / "text.npz"), *s]) == 0
    assert main(["score", str(r / "f.zarr"), "--text", str(r / "text.npz"), "--out", str(r), *s]) == 0
    pred, tiles = r / "predictions" / f"{sid}.json", r / "tile_scores" / f"{sid}.parquet"
    assert json.loads(pred.read_text(encoding="utf-8"))["classes"] == list(FREE_CLASSES)
    cols = [c for c in pd.read_parquet(tiles).columns if c.startswith("prob_")]
    assert len(cols) == len(set(cols)) == len(FREE_CLASSES)
    common = ["--prediction", str(pred)]
    assert main(["heatmap", str(tiles), *common, "--slide", str(small_slide), "--out", str(r / "hm")]) == 0
    # one per class, the argmax map, its thumbnail and the slide thumbnail
    assert len(list((r / "hm").glob("*.webp"))) == len(FREE_CLASSES) + 3
    assert (
        main(
            [
                "export-geojson",
                str(tiles),
                *common,
                "--store",
                str(r / "f.zarr"),
                "--out",
                str(r / "g.geojson"),
            ]
        )
        == 0
    )
    gj = json.loads((r / "g.geojson").read_text(encoding="utf-8"))
    tile = next(f for f in gj["features"] if f["properties"]["objectType"] == "tile")
    assert set(tile["properties"]["measurements"]) == {f"prob_{c}" for c in FREE_CLASSES}
    table = pd.read_csv(r / "predictions.csv")
    assert len(table) == 1 and sum(
        table[c].iloc[0] for c in table.columns if c.startswith("prob_")
    ) == pytest.approx(1, abs=1e-4)
    assert main(["report", str(r / "predictions.csv"), "--out", str(r / "report.html")]) == 0
    html = (r / "report.html").read_text(encoding="utf-8")
    assert "Lymphozyten &lt;T &amp; B&gt;" in html and "<T & B>" not in html and "nécrose 壊死" in html


def _huge_tiff(path: Path) -> Path:
    """A 256 x 256 single-level TIFF whose header is patched to declare 100,000 x 100,000."""
    tifffile.imwrite(
        path,
        np.full((256, 256, 3), 200, np.uint8),
        tile=(256, 256),
        resolution=(40000, 40000),
        resolutionunit="CENTIMETER",
    )
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(100_000)
        tif.pages[0].tags["ImageLength"].overwrite(100_000)
    assert path.stat().st_size < 1_000_000
    return path


@pytest.mark.parametrize("mpp", [None, "10"])
def test_huge_declared_size_is_refused_before_reading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mpp: str | None
) -> None:
    p = _huge_tiff(tmp_path / "huge.tif")
    extra = ["--mpp", mpp] if mpp else []
    assert main(["tissue", str(p), "--out", str(tmp_path / "t.png"), *extra]) == 2
    _one_error_line(capsys.readouterr().err, "huge.tif", "100000 x 100000", "max_read_megapixels")
    assert not (tmp_path / "t.png").exists()
    # a budget that allows it is the user's explicit choice; the check is on the estimate
    assert (
        main(["tissue", str(p), "--out", str(tmp_path / "t.png"), "--set", "max_read_megapixels=5", *extra])
        == 2
    )


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_slide_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fraction: float
) -> None:
    p = tmp_path / "cut.svs"
    data = CMU.read_bytes()
    p.write_bytes(data[: int(len(data) * fraction)])
    for cmd in (["tissue", str(p), "--out", str(tmp_path / "t.png")], ["info", str(p)]):
        assert main(cmd) == 2
        _one_error_line(capsys.readouterr().err, "cut.svs", "truncated or damaged")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("a: [1, 2\n", "is not valid YAML"),
        ("x: !!python/object/apply:os.system ['echo pwned']\n", "python/object/apply"),
        ("- a\n- b\n", "must map encoder names to entries, got list"),
        ("mine:\n  kind: open_clip\n  embed_dim: 8\n  wieghts: {path: x}\n", "did you mean 'weights'"),
    ],
)
def test_bad_registry_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, needle: str
) -> None:
    (tmp_path / "reg.yaml").write_text(content)
    assert main(["encoders", "--set", f"encoder_registry={tmp_path / 'reg.yaml'}"]) == 2
    _one_error_line(capsys.readouterr().err, "reg.yaml", needle)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("device=gpu0", ("device", "gpu0", "pattern")),
        ("pooling.method=median", ("pooling.method", "median", "mean, max, topk, soft")),
        ("scales_mmp=[0.5]", ("scales_mmp", "did you mean 'scales_mpp'")),
    ],
)
def test_schema_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], override: str, needles: tuple[str, ...]
) -> None:
    assert main(["encoders", "--set", override]) == 2
    line = _one_error_line(capsys.readouterr().err, *needles)
    assert len(line) < 600 and "$schema" not in line


def test_disk_full_while_writing_heatmaps(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from histoalign_wsi.zeroshot import tile_scores
    from histoalign_wsi.zeroshot.tile_scores import TileScores

    from .planting import planted_table

    ts = TileScores(
        "s",
        ("A", "B"),
        planted_table("0.50mpp", 0.5, np.array([[0, 0]], np.int32), 448, np.array([[0.3, 0.7]]), ["A", "B"]),
    )
    tile_scores.write(ts, tmp_path / "t.parquet")
    make_prediction("s", ["A", "B"], {"A": (1, 2, 3), "B": (4, 5, 6)}).write(tmp_path / "p.json")

    def full(self: Image.Image, fp: object, *a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "hm"
    args = [
        "heatmap",
        str(tmp_path / "t.parquet"),
        "--prediction",
        str(tmp_path / "p.json"),
        "--slide",
        str(small_slide),
        "--out",
        str(out),
    ]
    assert main(args) == 1
    _one_error_line(capsys.readouterr().err, "no space left on device while writing", str(out))
    assert not out.exists() and not list(tmp_path.glob(".hm.tmp-*"))


def test_summarize_with_labels_when_no_slide_has_tissue(tmp_path: Path) -> None:
    colors = {"A": (1, 2, 3), "B": (4, 5, 6)}
    for sid in ("s1", "s2"):
        make_prediction(
            sid, ["A", "B"], colors, status="no_tissue", predicted_class="no tissue", probabilities=None
        ).write(tmp_path / f"{sid}.json")
    (tmp_path / "labels.csv").write_text("slide_id,label\ns1,A\ns2,B\n")
    args = [
        "summarize",
        str(tmp_path / "s1.json"),
        str(tmp_path / "s2.json"),
        "--out",
        str(tmp_path / "p.csv"),
    ]
    assert main([*args, "--labels", str(tmp_path / "labels.csv"), "--metrics", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 2 and m["accuracy"] == 0.0 and m["n_without_tiles"] == 2
    assert pd.read_csv(tmp_path / "p.csv")["predicted_class"].tolist() == ["no tissue", "no tissue"]


def test_non_ascii_names_keep_their_meaning(tmp_path: Path) -> None:
    for name in ("café.svs", "中文.svs", "日本.svs", "my slide (1).svs"):
        shutil.copy(CMU, tmp_path / name)
    ids = sorted(e.slide_id for e in discover_slides(tmp_path))
    assert ids == sorted(["café", "中文", "日本", "my_slide_1"])


def test_slide_smaller_than_a_tile_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_slide(
        DemoSlideSpec(name="tiny", width=200, height=200, regions=(Region(1, 100, 100, 95, 95),)),
        tmp_path / "tiny.svs",
    )
    r = tmp_path / "r"
    assert main(["tile", str(p), "--out", str(r / "t.zarr"), "--set", "tissue.min_area_um2=0"]) == 0
    assert main(["encode", str(r / "t.zarr"), "--slide", str(p), "--out", str(r / "f.zarr")]) == 0
    assert (
        main(
            [
                "score",
                str(r / "f.zarr"),
                "--prediction",
                str(r / "p.json"),
                "--tile-scores",
                str(r / "t.parquet"),
            ]
        )
        == 0
    )
    pred = json.loads((r / "p.json").read_text())
    assert pred["status"] == "no_tiles" and pred["predicted_class"] == "no tiles (slide smaller than a tile)"


def test_failure_report_names_each_failed_slide_and_the_real_error(tmp_path: Path) -> None:
    """From the batch manifests: a slide that failed in one stage (its error line), its
    batchmates done; a batch whose job failed as a whole (that job's error line, not
    the asyncio noise after it); after a run that ended well, only recorded failures."""
    from histoalign_wsi.batches import ManifestRow, write_manifest
    from histoalign_wsi.run_status import finish_run, write_failure_report

    r = tmp_path / "results"
    ids = ["a_ok", "b_bad_tissue", "c_ok", "d_no_encoder"]  # batches of 3: b00000, b00001
    write_manifest(
        r / "batches" / "prepare" / "b00000.tsv",
        [
            ManifestRow("a_ok", "ok", "t"),
            ManifestRow("b_bad_tissue", "failed", "", "prepare: slide 'b.svs': file is truncated or damaged"),
            ManifestRow("c_ok", "ok", "t"),
        ],
    )
    write_manifest(
        r / "batches" / "finish" / "b00000.tsv",
        [
            ManifestRow("a_ok", "ok", "p"),
            ManifestRow(
                "b_bad_tissue", "upstream", "", "prepare: slide 'b.svs': file is truncated or damaged"
            ),
            ManifestRow("c_ok", "ok", "p"),
        ],
    )
    write_manifest(r / "batches" / "prepare" / "b00001.tsv", [ManifestRow("d_no_encoder", "ok", "t")])
    (r / "logs" / "encode").mkdir(parents=True)
    (r / "logs" / "encode" / "b00001.log").write_text(
        "INFO x: start\n"
        "histoalign-wsi batch: error: no weights for encoder 'plip': looked in ~/.cache\n"
        "ERROR asyncio: Task was destroyed but it is pending!\n"
    )
    failed = write_failure_report(r, ids, per_job=3)
    assert failed == ["b_bad_tissue", "d_no_encoder"]
    rows = (r / "failed_slides.tsv").read_text().splitlines()[1:]
    assert rows[0] == "b_bad_tissue\tprepare: slide 'b.svs': file is truncated or damaged"
    assert rows[1].startswith("d_no_encoder\tencode: histoalign-wsi batch: error: no weights")
    assert "asyncio" not in rows[1]
    # a run that ended well (say of a partial target) lists only the recorded failures
    assert finish_run(r, ids, ok=True, per_job=3) == ["b_bad_tissue"]
    # and once the batch records no failure, the report is gone
    write_manifest(r / "batches" / "finish" / "b00000.tsv", [ManifestRow(s, "ok", "p") for s in ids[:3]])
    finish_run(r, ids, ok=True, per_job=3)
    assert not (r / "failed_slides.tsv").exists()
