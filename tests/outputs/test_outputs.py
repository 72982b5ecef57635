"""Heatmaps, QuPath GeoJSON, segmentation evaluation and the HTML report, on a generated
slide with planted regions and planted tile probabilities."""

from __future__ import annotations

import gzip
import html as html_lib
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image

from histoalign_wsi.cli import main
from histoalign_wsi.errors import HistoAlignError
from histoalign_wsi.features.store import open_store
from histoalign_wsi.outputs.geojson import export_geojson
from histoalign_wsi.outputs.heatmaps import class_files, write_heatmaps
from histoalign_wsi.outputs.metrics import dice_iou
from histoalign_wsi.outputs.report import write_report
from histoalign_wsi.outputs.segmentation import _rasterize, evaluate_segmentation, load_truth
from histoalign_wsi.slides.reader import open_slide
from histoalign_wsi.zeroshot import tile_scores
from histoalign_wsi.zeroshot.tile_scores import TileScores

from ..planting import make_prediction, planted_table, synthetic_cohort

CLASSES = ["TUM", "STR", "LYM & <other>"]
HM = {"max_size": 1024, "alpha": 0.55, "max_megapixels": 1000.0}
COLORS = {"TUM": (200, 40, 60), "STR": (240, 130, 190), "LYM & <other>": (60, 80, 200)}


@pytest.fixture(scope="module")
def planted_scores(
    planted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """Tile scores whose probabilities are the planted truth at each tile's centre."""
    d = tmp_path_factory.mktemp("out")
    slide, masks = planted
    assert main(["tissue", str(slide), "--out", str(d / "tissue.png")]) == 0
    assert main(["tile", str(slide), "--tissue", str(d / "tissue.png"), "--out", str(d / "tiles.zarr")]) == 0
    st = open_store(d / "tiles.zarr")
    truth, scale = load_truth(masks)
    rows = []
    for name in st.scale_names:
        sv = st.scale(name)
        cx = ((sv.coords[:, 0] + sv.size0 / 2) / scale).astype(int)
        cy = ((sv.coords[:, 1] + sv.size0 / 2) / scale).astype(int)
        p = np.full((len(cx), 3), 0.05, np.float32)
        p[truth["TUM"][cy, cx], 0] = 0.9
        p[truth["STR"][cy, cx], 1] = 0.9
        p[truth["LYM"][cy, cx], 2] = 0.9
        p /= p.sum(axis=1, keepdims=True)
        rows.append(planted_table(name, sv.mpp, sv.coords, sv.size0, p, CLASSES))
    tile_scores.write(TileScores("planted", tuple(CLASSES), pd.concat(rows)), d / "scores.parquet")
    make_prediction("planted", CLASSES, COLORS).write(d / "pred.json")
    return d / "scores.parquet", d / "pred.json", d


def _geo(planted_scores: tuple[Path, Path, Path], name: str = "p.geojson") -> dict:
    scores, pred, d = planted_scores
    assert (
        main(
            [
                "export-geojson",
                str(scores),
                "--prediction",
                str(pred),
                "--store",
                str(d / "tiles.zarr"),
                "--tissue",
                str(d / "tissue.json"),
                "--out",
                str(d / name),
            ]
        )
        == 0
    )
    opener = gzip.open if name.endswith(".gz") else open
    with opener(d / name, "rt") as fh:  # type: ignore[operator]
        return json.load(fh)  # type: ignore[no-any-return]


def test_geojson_is_what_qupath_reads(planted_scores: tuple[Path, Path, Path]) -> None:
    gj = _geo(planted_scores)
    assert gj["type"] == "FeatureCollection"
    scores = pd.read_parquet(planted_scores[0])
    fine = scores[scores["mpp"] == 0.5]
    tiles = [f for f in gj["features"] if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == len(fine)
    ids = set()
    for f in gj["features"]:
        uuid.UUID(f["id"])
        ids.add(f["id"])
        props = f["properties"]
        assert props["objectType"] in {"tile", "annotation"} and props["isLocked"] is True
        cl = props["classification"]
        assert (
            isinstance(cl["name"], str)
            and len(cl["color"]) == 3
            and all(isinstance(v, int) for v in cl["color"])
        )
        geom = shapely.geometry.shape(f["geometry"])
        assert geom.is_valid and not geom.is_empty
        minx, miny, maxx, maxy = geom.bounds
        assert minx >= 0 and miny >= 0 and maxx <= 8192 and maxy <= 6144
        rings = (
            [f["geometry"]["coordinates"]]
            if f["geometry"]["type"] == "Polygon"
            else f["geometry"]["coordinates"]
        )
        for poly in rings:
            for ring in poly:
                assert ring[0] == ring[-1]
    assert len(ids) == len(gj["features"])
    expected = {(int(r.x), int(r.y)) for r in fine.itertuples()}
    for t in tiles:
        m = t["properties"]["measurements"]
        assert set(m) == {f"prob_{c}" for c in CLASSES}
        assert sum(m.values()) == pytest.approx(1.0, abs=1e-5)
        (x0, y0), (x1, _), (_, y2) = t["geometry"]["coordinates"][0][:3]
        assert (x0, y0) in expected and x1 - x0 == 448 and y2 - y0 == 448
    names = {
        f["properties"]["classification"]["name"]
        for f in gj["features"]
        if f["properties"]["objectType"] == "annotation"
    }
    assert {"TUM", "STR", "Tissue"} <= names


def test_region_annotations_reach_dice_09(
    planted_scores: tuple[Path, Path, Path], planted: tuple[Path, Path]
) -> None:
    gj = _geo(planted_scores)
    truth, scale = load_truth(planted[1])
    for cls in ("TUM", "STR"):
        region = next(
            shapely.geometry.shape(f["geometry"])
            for f in gj["features"]
            if f["properties"]["objectType"] == "annotation"
            and f["properties"]["classification"]["name"] == cls
        )
        # rasterised back onto the ground truth's own grid (4 level-0 px per pixel): a scale
        # or x/y swap anywhere in the export would wreck the overlap
        dice = dice_iou(_rasterize(region, truth[cls].shape, scale), truth[cls])["dice"]
        assert dice >= 0.9, (cls, dice)


def test_gzip_and_streaming(planted_scores: tuple[Path, Path, Path]) -> None:
    """The .gz export is a real gzip stream of the same collection, and the writer
    streams: features go to the file as they are made (many writes, none holding the
    whole document)."""
    import io

    from histoalign_wsi.outputs import geojson as gmod

    gz = _geo(planted_scores, "p.geojson.gz")
    plain = _geo(planted_scores, "p.geojson")
    d = planted_scores[2]
    assert (d / "p.geojson.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert gz == plain and len(gz["features"]) > 10

    class Recorder(io.StringIO):
        sizes: list[int]

        def write(self, s: str) -> int:
            self.sizes.append(len(s))
            return super().write(s)

    fh = Recorder()
    fh.sizes = []
    gmod._write(fh, planted_scores[0], COLORS, (8192, 6144), None, gmod._RegionSpec("argmax", 0.5, 1.0, 0.25))
    text = fh.getvalue()
    assert json.loads(text) == {
        **{k: v for k, v in plain.items() if k != "histoalign"},  # the bare writer adds no member
        "features": [f for f in plain["features"] if f["properties"]["name"] != "tissue"],
    }
    assert len(fh.sizes) >= len(plain["features"]) and max(fh.sizes) < len(text) / 10


def test_heatmap_size_and_hot_pixels(
    planted_scores: tuple[Path, Path, Path], planted: tuple[Path, Path]
) -> None:
    scores, pred, d = planted_scores
    assert (
        main(
            [
                "heatmap",
                str(scores),
                "--prediction",
                str(pred),
                "--slide",
                str(planted[0]),
                "--out",
                str(d / "hm"),
            ]
        )
        == 0
    )
    thumb = Image.open(d / "hm" / "thumbnail.webp")
    assert class_files(CLASSES)[CLASSES[2]] == "LYM_other.webp"
    assert class_files(CLASSES, "png")[CLASSES[2]] == "LYM_other.png"
    for f in ("TUM.webp", "STR.webp", "LYM_other.webp", "argmax.webp"):
        assert Image.open(d / "hm" / f).size == thumb.size
    assert max(thumb.size) <= 1024 and max(Image.open(d / "hm" / "argmax_thumb.webp").size) == 192
    with open_slide(planted[0]) as s:
        from histoalign_wsi.outputs.raster import probability_raster

        scale = max(s.dimensions) / thumb.size[0]
    probs, count = probability_raster(
        tile_scores.read(scores), shape=(thumb.size[1], thumb.size[0]), scale=scale
    )
    truth, _tscale = load_truth(planted[1])
    str_truth = np.asarray(Image.fromarray(truth["STR"]).resize(thumb.size, Image.Resampling.NEAREST))
    hot = probs[1] > 0.5
    assert (hot & str_truth).sum() / hot.sum() > 0.8
    # the PNG itself is brighter (inferno: high = yellow) over the planted stroma
    img = np.asarray(Image.open(d / "hm" / "STR.webp").convert("L")).astype(float)
    inside = str_truth & (count > 0)
    outside = ~str_truth & (count > 0)
    assert img[inside].mean() > img[outside].mean() + 30


def test_segmentation_evaluation_cli(
    planted_scores: tuple[Path, Path, Path], planted: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    scores, _pred, d = planted_scores
    res = evaluate_segmentation(tile_scores.read(scores), planted[1])
    assert res["per_class"]["TUM"]["dice"] > 0.85 and res["per_class"]["STR"]["dice"] > 0.8
    assert (
        main(
            [
                "evaluate-segmentation",
                str(scores),
                "--truth",
                str(planted[1]),
                "--out",
                str(d / "seg.json"),
            ]
        )
        == 0
    )
    assert json.loads((d / "seg.json").read_text())["per_class"]["TUM"]["iou"] > 0.7


def test_zero_tiles_empty_collection_and_grey_heatmap(planted: tuple[Path, Path], tmp_path: Path) -> None:
    empty = planted_table("0.50mpp", 0.5, np.zeros((0, 2), np.int32), 448, np.zeros((0, 3)), CLASSES)
    tile_scores.write(TileScores("blank", tuple(CLASSES), empty), tmp_path / "empty.parquet")
    export_geojson(
        tmp_path / "empty.parquet", tmp_path / "e.geojson", colors=COLORS, level0_dims=(8192, 6144)
    )
    gj = json.loads((tmp_path / "e.geojson").read_text())
    assert gj == {
        "type": "FeatureCollection",
        "features": [],
        "histoalign": {"provenance": None, "untrained": False},
    }
    with open_slide(planted[0]) as s:
        write_heatmaps(s, tile_scores.read(tmp_path / "empty.parquet"), COLORS, tmp_path / "hm", **HM)
    img = np.asarray(Image.open(tmp_path / "hm" / "argmax.webp").convert("RGB")).astype(int)
    assert np.abs(img[..., 0] - img[..., 2]).mean() < 10  # grey


def test_nan_probabilities_are_refused(
    planted_scores: tuple[Path, Path, Path], planted: tuple[Path, Path], tmp_path: Path
) -> None:
    ts = tile_scores.read(planted_scores[0], finest=False)
    df = ts.table.copy()
    df.loc[df.index[3], "prob_TUM"] = np.nan
    tile_scores.write(TileScores("planted", ts.classes, df), tmp_path / "nan.parquet")
    with pytest.raises(HistoAlignError, match=r"'planted'.*NaN"):
        export_geojson(
            tmp_path / "nan.parquet", tmp_path / "x.geojson", colors=COLORS, level0_dims=(8192, 6144)
        )
    assert not (tmp_path / "x.geojson").exists()
    with open_slide(planted[0]) as s, pytest.raises(HistoAlignError, match="NaN"):
        write_heatmaps(s, TileScores("planted", ts.classes, df), COLORS, tmp_path / "hm", **HM)


def _report_results(tmp_path: Path, planted_scores: tuple[Path, Path, Path]) -> Path:
    res = tmp_path / "results"
    (res / "predictions").mkdir(parents=True)
    make_prediction(
        "s<1>",
        CLASSES,
        COLORS,
        predicted_class="LYM & <other>",
        untrained=True,
        probabilities={"TUM": 0.2, "STR": 0.1, "LYM & <other>": 0.7},
        prompt_bag={"name": 'bag "x"', "hash": "abc"},
        encoders=[{"name": "demo", "weights_sha256": "demo-untrained-123", "weight": 1.0, "untrained": True}],
        per_scale={"0.50mpp": {"n_tiles": 3}},
        extra={"region_area_mm2": {"TUM": 1.25, "LYM & <other>": 0.5}},
    ).write(res / "predictions" / "s_1_.json")
    pd.DataFrame(
        [
            {
                "slide_id": "s<1>",
                "predicted_class": "LYM & <other>",
                "status": "ok",
                "untrained": True,
                "prob_TUM": 0.2,
                "prob_STR": 0.1,
                "prob_LYM & <other>": 0.7,
                "n_tiles": 3,
                "label": np.nan,
            }
        ]
    ).to_csv(res / "predictions.csv", index=False)
    hm = res / "heatmaps" / "s<1>"  # the heatmaps of the slide, as the heatmap stage names them
    hm.mkdir(parents=True)
    for name, size in (("argmax", 320), ("argmax_thumb", 192), (class_files(CLASSES)["LYM & <other>"], 320)):
        Image.fromarray(np.full((size * 3 // 4, size, 3), 90, np.uint8)).save(hm / f"{Path(name).stem}.webp")
    return res


def test_report_escapes_warns_and_links(planted_scores: tuple[Path, Path, Path], tmp_path: Path) -> None:
    res = _report_results(tmp_path, planted_scores)
    assert main(["report", str(res / "predictions.csv"), "--out", str(res / "report.html")]) == 0
    html = (res / "report.html").read_text()
    assert "id='untrained-warning'" in html and "untrained demo encoder" in html
    assert "LYM &amp; &lt;other&gt;" in html and "<other>" not in html  # the legend, escaped
    assert "s\\u003c1>" in html and "demo-untrained-123" in html  # the table data: no raw '<'
    assert 'src="http' not in html and "data:image" not in html  # nothing fetched, nothing inlined
    data = json.loads(html.split("id='report-data'>")[1].split("</script>")[0])
    (row,) = data["rows"]
    assert row[:5] == ["s<1>", "", "LYM & <other>", "ok", 3] and row[6] == {"TUM": 1.25, "LYM & <other>": 0.5}
    # heatmaps linked by a relative, quoted path that resolves from the report's folder
    from urllib.parse import unquote

    for name in ("thumb", "argmax", "predicted"):
        assert not row[7][name].startswith(("/", "file:")), row[7]
        assert (res / unquote(row[7][name])).is_file(), row[7][name]
    assert "s%3C1%3E" in row[7]["argmax"]
    # --embed inlines them instead: one file to send
    assert main(["report", str(res / "predictions.csv"), "--out", str(res / "one.html"), "--embed"]) == 0
    one = json.loads((res / "one.html").read_text().split("id='report-data'>")[1].split("</script>")[0])
    assert all(v.startswith("data:image/webp;base64,") for v in one["rows"][0][7].values())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--allow-file-access-from-files",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,800",
    ]
    return subprocess.run([*common, *args], check=True, timeout=120, capture_output=True, text=True)


def _probe(html: str, script: str) -> str:
    """The page with a script that, once the table is drawn, writes ``script``'s value
    into the title (what ``--dump-dom`` shows)."""
    return html.replace(
        "</body>",
        "<script>window.addEventListener('load', function(){document.title = 'PROBE ' + "
        f"({script});}});</script></body>",
    )


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed")
def test_report_renders_in_chromium_and_fits_1280(
    planted_scores: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    res = _report_results(tmp_path, planted_scores)
    write_report(res / "predictions.csv", res / "report.html")
    html = (res / "report.html").read_text()
    assert "figcaption" in html and "Most probable class per tile" in html and "class='cbar'" in html
    assert "regions (mm²)" in html
    probe = res / "probe.html"
    probe.write_text(
        _probe(
            html,
            "'W=' + document.documentElement.scrollWidth + ' I=' + window.innerWidth + "
            "' CELLS=' + JSON.stringify(Array.from(document.querySelectorAll('#slides tbody td'))"
            ".map(function(td){return td.textContent;})) + ' IMG=' + "
            "document.getElementById('detail-argmax').naturalWidth",
        )
    )
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path).stdout
    m = re.search(r"<title>PROBE W=(\d+) I=(\d+) CELLS=(.*) IMG=(\d+)</title>", dom, re.S)
    assert m, dom[:500]
    assert int(m.group(1)) <= int(m.group(2)) == 1280  # nothing overflows at 1280 x 800
    cells = json.loads(html_lib.unescape(m.group(3)))
    # names shown exactly as written (text, not markup); unlabelled: an empty cell, not "nan"
    assert cells[1:4] == ["s<1>", "", "LYM & <other>"] and "TUM 1.25" in cells[7]
    assert "LYM & <other> 0.70" in cells[4] and "nan" not in "".join(cells)
    assert int(m.group(4)) > 0  # the linked heatmap loaded from its relative path
    shot = tmp_path / "shot.png"
    _chromium([f"--screenshot={shot}", (res / "report.html").as_uri()], tmp_path)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (800, 1280) and img.std() > 10  # not blank
    top = img[:300]  # the red warning banner is rendered near the top
    assert ((abs(top[..., 0] - 253) < 6) & (abs(top[..., 1] - 226) < 6)).sum() > 1000


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed")
def test_report_of_1000_slides_is_small_fast_and_pages_sort_and_filter_across_all(tmp_path: Path) -> None:
    """At most 50 KB per slide plus a constant, loaded (table drawn) in under 5 s in
    headless Chromium; the table shows one page, sorting and filtering reach every slide."""
    import time

    res = tmp_path / "results"
    synthetic_cohort(res, 1000)
    write_report(res / "predictions.csv", res / "report.html")
    html = (res / "report.html").read_text()
    size = (res / "report.html").stat().st_size
    assert size <= 50_000 * 1000 + 100_000, size
    assert size < 2_000_000  # in fact far below the bound: about 0.5 KB a slide
    probe = res / "probe.html"
    probe.write_text(
        _probe(
            html,
            "document.body.dataset.ready + ' ROWS=' + document.querySelectorAll('#slides tbody tr').length"
            " + ' FIRST=' + document.querySelector('#slides tbody td:nth-child(2)').textContent"
            " + ' COUNT=' + document.getElementById('count').textContent",
        )
    )
    t0 = time.monotonic()
    dom = _chromium(["--dump-dom", probe.as_uri()], tmp_path).stdout
    took = time.monotonic() - t0
    m = re.search(r"<title>PROBE 1 ROWS=(\d+) FIRST=([^<]*) COUNT=([^<]*)</title>", dom)
    assert m, dom[-800:]
    assert int(m.group(1)) == 50 and m.group(2) == "slide 00000"
    assert m.group(3) == "1000 of 1000 slides; page 1 of 20"
    assert took < 5.0, took  # the whole browser process, start-up included
    # sorted by a column, descending, over all 1000 slides: the last id comes first
    dom = _chromium(["--dump-dom", probe.as_uri() + "#sort=slide&asc=0"], tmp_path).stdout
    assert "FIRST=slide 00999 " in dom
    # a filter reaches slides on every page; page 3 of the filtered rows
    dom = _chromium(["--dump-dom", probe.as_uri() + "#q=slide%200099&page=1"], tmp_path).stdout
    assert "ROWS=10 FIRST=slide 00990 COUNT=10 of 1000 slides; page 1 of 1" in dom
    dom = _chromium(["--dump-dom", probe.as_uri() + "#sort=tiles&asc=0&page=3"], tmp_path).stdout
    assert re.search(r"COUNT=1000 of 1000 slides; page 3 of 20", dom)


def test_segmentation_against_geojson_polygons(
    planted_scores: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Ground truth given as QuPath-style GeoJSON annotations (here: the planted regions)."""
    scores, _pred, d = planted_scores
    _geo(planted_scores)
    gj = json.loads((d / "p.geojson").read_text())
    truth = {
        "type": "FeatureCollection",
        "features": [f for f in gj["features"] if f["properties"]["objectType"] == "annotation"],
    }
    (d / "truth.geojson").write_text(json.dumps(truth))
    assert (
        main(
            [
                "evaluate-segmentation",
                str(scores),
                "--truth",
                str(d / "truth.geojson"),
                "--dims",
                "8192",
                "6144",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)["per_class"]
    assert res["TUM"]["dice"] > 0.9 and res["STR"]["dice"] > 0.9


def test_regions_exist_when_no_class_reaches_the_threshold(
    planted_scores: tuple[Path, Path, Path], planted: tuple[Path, Path], tmp_path: Path
) -> None:
    """Flattened probabilities (max 0.4): argmax regions still cover the planted classes,
    one annotation per class present, with their area in µm²."""
    ts = tile_scores.read(planted_scores[0], finest=False)
    df = ts.table.copy()
    cols = [c for c in df.columns if c.startswith("prob_")]
    p = df[cols].to_numpy()
    flat = 0.3 + 0.1 * (p == p.max(axis=1, keepdims=True))  # the planted class 0.4, others 0.3
    df[cols] = flat / flat.sum(axis=1, keepdims=True)
    assert df[cols].to_numpy().max() < 0.5
    tile_scores.write(TileScores("planted", ts.classes, df), tmp_path / "flat.parquet")
    out = tmp_path / "flat.geojson"
    export_geojson(tmp_path / "flat.parquet", out, colors=COLORS, level0_dims=(8192, 6144), mpp=0.25)
    regions = {
        f["properties"]["classification"]["name"]: f
        for f in json.loads(out.read_text())["features"]
        if f["properties"]["objectType"] == "annotation"
    }
    assert {"TUM", "STR"} <= set(regions)
    truth, scale = load_truth(planted[1])
    for cls in ("TUM", "STR"):
        geom = shapely.geometry.shape(regions[cls]["geometry"])
        m = regions[cls]["properties"]["measurements"]
        assert m["area_um2"] == pytest.approx(geom.area * 0.25**2)
        assert dice_iou(_rasterize(geom, truth[cls].shape, scale), truth[cls])["dice"] > 0.85
    # the threshold mode, by contrast, finds nothing here
    export_geojson(
        tmp_path / "flat.parquet",
        out,
        colors=COLORS,
        level0_dims=(8192, 6144),
        regions="threshold",
        threshold=0.5,
    )
    assert not [
        f for f in json.loads(out.read_text())["features"] if f["properties"]["objectType"] == "annotation"
    ]


def test_every_output_of_an_untrained_encoder_says_so(planted: tuple[Path, Path], tmp_path: Path) -> None:
    """Tile scores, the GeoJSON QuPath opens and the heatmap images of an untrained
    encoder's scores each carry the mark; a trained one's carry none."""
    from histoalign_wsi.outputs import heatmaps

    coords = np.array([[448 * i, 448 * 2] for i in range(4)], np.int32)
    probs = np.tile([0.2, 0.5, 0.3], (4, 1))
    table = planted_table("0.50mpp", 0.5, coords, 448, probs, CLASSES)
    drawn = {}
    for untrained in (True, False):
        p = tmp_path / f"u{untrained}.parquet"
        tile_scores.write(TileScores("s", tuple(CLASSES), table, untrained), p)
        assert tile_scores.read(p).untrained is untrained
        export_geojson(p, tmp_path / f"u{untrained}.geojson", colors=COLORS, level0_dims=(8192, 6144))
        gj = json.loads((tmp_path / f"u{untrained}.geojson").read_text())
        assert gj["histoalign"]["untrained"] is untrained
        with open_slide(planted[0]) as s:
            out = write_heatmaps(
                s, tile_scores.read(p), COLORS, tmp_path / f"hm{untrained}", **HM | {"fmt": "png"}
            )
        drawn[untrained] = np.asarray(Image.open(out / "argmax.png").convert("RGB"))
    red = (drawn[True][..., 0] > 180) & (drawn[True][..., 1] < 30) & (drawn[True][..., 2] < 30)
    assert red.sum() > 200 and heatmaps.UNTRAINED_MARK
    assert not (
        (drawn[False][..., 0] > 180) & (drawn[False][..., 1] < 30) & (drawn[False][..., 2] < 30)
    ).any()
