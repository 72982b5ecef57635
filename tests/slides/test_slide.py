"""Slide reading: real Aperio/TCGA/DICOM files, generated slides, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from histoalign_wsi.cli import main
from histoalign_wsi.errors import SlideError
from histoalign_wsi.slides.reader import open_slide

from ..conftest import CMU, shared


def test_info_cmu_reports_aperio_mpp(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(CMU)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vendor"] == "aperio"
    assert info["reader"] == "openslide"
    assert info["mpp_x"] == pytest.approx(0.499, abs=1e-3)
    assert info["objective_power"] == 20
    assert info["level_dimensions"] == [[2220, 2967]]
    assert {"thumbnail", "label", "macro"} <= set(info["associated_images"])


def test_tiffslide_backend_agrees_with_openslide() -> None:
    with open_slide(CMU, reader="openslide") as a, open_slide(CMU, reader="tiffslide") as b:
        assert a.mpp == pytest.approx(b.mpp)
        assert a.dimensions == b.dimensions
        ra = a.read_region((500, 700), 0, (64, 48))
        rb = b.read_region((500, 700), 0, (64, 48))
        assert ra.shape == rb.shape == (48, 64, 3)
        assert abs(ra.astype(int) - rb.astype(int)).mean() < 3


def test_tcga_jp2k_without_mpp_needs_override(capsys: pytest.CaptureFixture[str]) -> None:
    path = shared("wsi", "aperio_svs", "tcga-cr-7395-01a-01-ts1.svs")
    with open_slide(path) as s:
        assert s.level_count == 2 and s.mpp_x is None
        with pytest.raises(SlideError, match="--mpp"):
            _ = s.mpp
    with open_slide(path, mpp_override=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "override"
    assert main(["tissue", str(path), "--out", "/nonexistent/x.png"]) == 2
    err = capsys.readouterr().err
    assert "tcga-cr-7395" in err and "MPP" in err and "mpp_override" in err


def test_dicom_opened_by_openslide() -> None:
    path = shared("wsi", "dicom_wsi", "wsi2dcm_jpeg.dicom")
    with open_slide(path) as s:
        assert s.vendor == "dicom" and s.dimensions == (957, 715)
        assert s.read_region((0, 0), 0, (32, 32)).shape == (32, 32, 3)


def test_generated_slide_is_aperio(planted: tuple[Path, Path]) -> None:
    with open_slide(planted[0]) as s:
        assert (s.vendor, s.reader) == ("aperio", "openslide")
        assert s.mpp == pytest.approx(0.25) and s.objective_power == 40
        assert s.level_downsamples == [1.0, 4.0, 16.0]


def test_ome_tiff_falls_back_to_tiffslide(planted_ome: Path) -> None:
    with open_slide(planted_ome) as s:
        assert s.reader == "tiffslide"
        assert s.level_dimensions == [(4096, 3072), (1024, 768)] and s.mpp == pytest.approx(0.25)


def test_best_level(planted: tuple[Path, Path]) -> None:
    """On the multi-level generated slide: the coarsest level not coarser than asked."""
    with open_slide(planted[0]) as s:
        ds = s.level_downsamples
        assert len(ds) >= 3 and ds[1] == pytest.approx(4.0) and ds[2] == pytest.approx(16.0)
        assert s.best_level(1.0) == 0 and s.best_level(3.9) == 0
        assert s.best_level(4.0) == 1 and s.best_level(15.0) == 1
        assert s.best_level(16.0) == 2 and s.best_level(1e6) == len(ds) - 1


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        ("truncated", "truncated or damaged"),
        ("text", "cannot be opened"),
        ("unreadable", "cannot decode"),
        ("unopenable", "cannot"),
        ("directory", "is a directory"),
        ("empty", "empty file"),
    ],
)
def test_bad_slides_fail_clearly(
    make: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if make == "truncated":
        p = tmp_path / "trunc.svs"
        p.write_bytes(CMU.read_bytes()[:30000])
    elif make == "text":
        p = tmp_path / "notes.svs"
        p.write_text("this is not a slide\n")
    elif make == "unreadable":
        p = shared("wsi_synthetic_fixtures", "openslide-python", "unreadable.svs")
    elif make == "unopenable":
        p = shared("wsi_synthetic_fixtures", "openslide-python", "unopenable.tiff")
    elif make == "directory":
        p = tmp_path / "adir.svs"
        p.mkdir()
    else:
        p = tmp_path / "empty.svs"
        p.touch()
    before = p.read_bytes() if p.is_file() else None
    out = tmp_path / "out" / "mask.png"
    code = main(["tissue", str(p), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert p.name in err and problem in err
    assert not out.exists() and not out.with_suffix(".json").exists()
    if before is not None:
        assert p.read_bytes() == before  # inputs are never modified


def test_non_ascii_path_with_spaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "Pathologie Fälle ü"
    d.mkdir()
    p = d / "Schnitt 1 – ü.svs"
    shutil.copy(CMU, p)
    assert main(["info", str(p)]) == 0
    assert json.loads(capsys.readouterr().out)["mpp_x"] == pytest.approx(0.499, abs=1e-3)
    out = d / "res ü" / "tiles.zarr"
    assert main(["tile", str(p), "--out", str(out)]) == 0
    assert (out / "zarr.json").is_file()
