"""The encode stage: read once for all scales, store schema, determinism, atomicity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from histoalign_wsi.cli import main
from histoalign_wsi.errors import SlideError
from histoalign_wsi.features.store import open_store
from histoalign_wsi.slides.reader import Slide
from histoalign_wsi.slides.synthetic import DemoSlideSpec, write_slide

from ..conftest import read_scaled


@pytest.fixture(scope="module")
def tiles(planted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("enc")
    assert main(["tile", str(planted[0]), "--out", str(d / "tiles.zarr")]) == 0
    return d / "tiles.zarr"


def encode(tiles: Path, slide: Path, out: Path) -> Path:
    assert (
        main(
            ["encode", str(tiles), "--slide", str(slide), "--out", str(out), "--set", "encode.batch_size=48"]
        )
        == 0
    )
    return out


def assert_same_features(a_path: Path, b_path: Path) -> None:
    a, b = open_store(a_path), open_store(b_path)
    for name in a.scale_names:
        np.testing.assert_array_equal(a.features(name, "demo"), b.features(name, "demo"))


@pytest.fixture(scope="module")
def features(planted: tuple[Path, Path], tiles: Path) -> Path:
    return encode(tiles, planted[0], tiles.parent / "features.zarr")


def test_store_is_valid_and_complete(features: Path, tiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st, tl = open_store(features), open_store(tiles)
    assert st.validate() == []
    assert st.attrs["untrained"] is True
    for name in st.scale_names:
        np.testing.assert_array_equal(st.scale(name).coords, tl.scale(name).coords)
        arr = st.features_array(name, "demo")
        assert arr.dtype == np.float16 and arr.shape == (len(st.scale(name).coords), 64)
        assert arr.chunks[0] >= min(arr.shape[0], 1024)
        assert arr.attrs["weights_sha256"].startswith("demo-untrained-")
        f = st.features(name, "demo")
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=5e-3)
    assert main(["inspect", str(features)]) == 0
    assert '"problems": []' in capsys.readouterr().out


def test_features_match_per_tile_encoding(features: Path, planted: tuple[Path, Path]) -> None:
    """Block reads + device resizing give the same features as reading each tile alone."""
    import torch

    from histoalign_wsi.features import load_registry
    from histoalign_wsi.features.adapters import load_encoder
    from histoalign_wsi.features.encode import preprocess_on_device
    from histoalign_wsi.slides.reader import open_slide

    st = open_store(features)
    enc = load_encoder(load_registry()["demo"])
    with open_slide(planted[0]) as s:
        for name in st.scale_names:
            sv = st.scale(name)
            idx = np.linspace(0, len(sv.coords) - 1, 4).astype(int)
            tiles = np.stack([read_scaled(s, tuple(sv.coords[i]), sv.size0, 224) for i in idx])
            x = preprocess_on_device(torch.from_numpy(tiles.copy()).permute(0, 3, 1, 2).float(), enc)
            ref = enc.encode_image(x).numpy()
            got = st.features(name, "demo")[idx]
            cos = (ref * got).sum(axis=1)
            assert (cos > 0.995).all(), (name, cos)


def test_rerun_gives_identical_features(features: Path, tiles: Path, planted: tuple[Path, Path]) -> None:
    again = tiles.parent / "again.zarr"
    assert_same_features(features, encode(tiles, planted[0], again))


def test_kill_during_encoding_leaves_nothing_complete(
    tiles: Path, planted: tuple[Path, Path], features: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed.zarr"
    code = (
        "import time, histoalign_wsi.features.encode as e\n"
        "orig = e._Forward.__call__\n"
        "def slow(self, t):\n    time.sleep(0.5)\n    return orig(self, t)\n"
        "e._Forward.__call__ = slow\n"
        "from histoalign_wsi.cli import main\n"
        f"main(['encode', {str(tiles)!r}, '--slide', {str(planted[0])!r}, '--out', {str(out)!r},"
        " '--set', 'encode.batch_size=8'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(tmp_path.glob(".killed.zarr.tmp-*")):
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only the temporary name, never the final one
    assert list(tmp_path.glob(".killed.zarr.tmp-*"))
    assert_same_features(features, encode(tiles, planted[0], out))
    assert not list(tmp_path.glob(".killed.zarr.tmp-*"))  # the dead writer's temporary is cleaned up


def test_zero_tile_slide_gives_empty_valid_store(tmp_path: Path) -> None:
    p = write_slide(DemoSlideSpec(name="blank", width=2048, height=2048, regions=()), tmp_path / "blank.svs")
    assert main(["tile", str(p), "--out", str(tmp_path / "t.zarr")]) == 0
    assert (
        main(["encode", str(tmp_path / "t.zarr"), "--slide", str(p), "--out", str(tmp_path / "f.zarr")]) == 0
    )
    st = open_store(tmp_path / "f.zarr")
    assert st.validate() == []
    assert all(st.features_array(n, "demo").shape == (0, 64) for n in st.scale_names)


@pytest.mark.parametrize(
    ("method", "extra"), [("read_region", ["--set", "encode.native_jpeg=false"]), ("read_scaled", [])]
)
def test_read_failure_mid_slide_names_coordinates(
    tiles: Path,
    planted: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    method: str,
    extra: list[str],
) -> None:
    """A decode failure in the fourth block read, through OpenSlide or the native JPEG
    path: exit 2 naming the slide and the coordinates, and no store left behind."""
    orig = getattr(Slide, method)
    calls = {"n": 0}

    def flaky(self: Slide, location: tuple[int, int], *rest: object) -> object:
        calls["n"] += 1
        if calls["n"] == 4:
            raise SlideError(self.path, f"cannot decode pixels at level-0 x={location[0]}, y={location[1]}")
        return orig(self, location, *rest)

    monkeypatch.setattr(Slide, method, flaky)
    out = tmp_path / "f.zarr"
    assert main(["encode", str(tiles), "--slide", str(planted[0]), "--out", str(out), *extra]) == 2
    assert calls["n"] >= 4
    err = capsys.readouterr().err
    assert "planted.svs" in err and "x=" in err and "y=" in err
    assert not out.exists() and not list(tmp_path.glob(".f.zarr*"))


def test_unknown_encoder_is_refused(
    tiles: Path, planted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "encode",
            str(tiles),
            "--slide",
            str(planted[0]),
            "--out",
            str(tmp_path / "x.zarr"),
            "--set",
            "encoders=[nonesuch]",
        ]
    )
    assert code == 2 and "nonesuch" in capsys.readouterr().err


@pytest.mark.parametrize(("threads", "expected"), [(1, (1, 1)), (2, (1, 1)), (3, (1, 2)), (8, (2, 6))])
def test_thread_budget_splits_and_never_exceeds(threads: int, expected: tuple[int, int]) -> None:
    from histoalign_wsi.features.encode import thread_budget

    readers, torch_threads = thread_budget(threads, 2)
    assert (readers, torch_threads) == expected
    assert threads == 1 or readers + torch_threads <= threads


def test_encode_runs_within_its_thread_budget(
    tiles: Path, planted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the stage, torch has the share given to it and the readers the rest."""
    import torch

    from histoalign_wsi.features import encode as enc_mod

    seen: dict[str, int] = {}
    real = enc_mod.run_pipeline

    def spy(slide, scales, encoders, arrays, settings):  # type: ignore[no-untyped-def]
        seen["torch"], seen["readers"] = torch.get_num_threads(), settings.readers
        return real(slide, scales, encoders, arrays, settings)

    monkeypatch.setattr(enc_mod, "run_pipeline", spy)
    before = torch.get_num_threads()
    try:
        args = ["encode", str(tiles), "--slide", str(planted[0]), "--out", str(tmp_path / "f.zarr")]
        assert main([*args, "--threads", "3"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == {"torch": 2, "readers": 1}


def test_progress_lines_when_not_a_terminal(
    tiles: Path, planted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under Snakemake stderr is no terminal: short progress lines, not a tqdm bar."""
    import io

    from histoalign_wsi._progress import Progress

    buf = io.StringIO()
    with Progress(10, desc="encode x", every=0.0, stream=buf) as bar:
        for _ in range(10):
            bar.update()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("encode x: 1/10 tiles (10%)") and len(lines) == 11 and " in " in lines[-1]
    quiet = io.StringIO()
    with Progress(10, desc="q", every=3600.0, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue().count("\n") == 1  # bounded: only the closing line
    encode(tiles, planted[0], tmp_path / "f.zarr")
    n = sum(
        len(open_store(tmp_path / "f.zarr").scale(s).coords)
        for s in open_store(tmp_path / "f.zarr").scale_names
    )
    err = capsys.readouterr().err
    assert f"encode planted.svs: {n}/{n} tiles (100%) in " in err and "tiles/s" in err


def test_cpu_uint8_pyramid_matches_the_float_area_resize() -> None:
    """The CPU path keeps tiles uint8 (Pillow box reduce); the device path resizes floats
    (avg_pool2d / area). Same tiles within rounding, at integer and non-integer factors."""
    import torch

    from histoalign_wsi.features.pyramids import BlockPyramid as _BlockPyramid
    from histoalign_wsi.features.pyramids import CpuPyramid as _CpuPyramid

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(896, 896, 3), dtype=np.uint8)
    img[:448, :448] = 30  # flat areas keep a wrong crop offset visible
    cpu = _CpuPyramid(img, 112)
    dev = _BlockPyramid(torch.from_numpy(img).permute(2, 0, 1)[None].float(), 112)
    coords = np.array([[0, 0], [448, 0], [448, 448], [224, 672]], np.int32)
    for size_px in (112.0, 224.0, 448.0, 300.0):
        keep = coords[(coords + size_px <= 896).all(axis=1)]
        a = torch.from_numpy(cpu.tiles(keep, 0, 0, size_px, 1.0))
        b = dev.tiles(keep, 0, 0, size_px, 1.0)
        assert a.dtype == torch.uint8 and a.shape == b.shape == (len(keep), 3, 112, 112)
        diff = (a.float() - b).abs()
        # one uint8 rounding per reduce: 4x cascades from 2x, so it is rounded twice
        assert float(diff.max()) <= (1.0 if size_px == 448.0 else 0.5 + 1e-3), size_px
        assert float(diff.mean()) < 0.3
        if size_px == 224.0:  # a 2x area reduce, checked by hand for one pixel
            x, y = keep[1]
            want = img[y : y + 2, x : x + 2].reshape(-1, 3).mean(axis=0)
            assert np.allclose(a[1, :, 0, 0].numpy(), want, atol=0.5 + 1e-6)


def test_encode_runs_torch_on_its_share_of_the_thread_budget(
    tiles: Path, planted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import histoalign_wsi.features.encode as encode_mod
    from histoalign_wsi.features.encode import thread_budget

    seen: list[tuple[int, int]] = []
    real = encode_mod.run_pipeline

    def spy(slide, scales, encoders, arrays, settings):  # type: ignore[no-untyped-def]
        seen.append((torch.get_num_threads(), settings.readers))
        return real(slide, scales, encoders, arrays, settings)

    monkeypatch.setattr(encode_mod, "run_pipeline", spy)
    before = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "encode",
                    str(tiles),
                    "--slide",
                    str(planted[0]),
                    "--out",
                    str(tmp_path / "f.zarr"),
                    "--threads",
                    "3",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(before)
    readers, torch_threads = thread_budget(3, 2)
    assert seen == [(torch_threads, readers)] and readers + torch_threads == 3
    assert thread_budget(1, 2) == (1, 1) and thread_budget(8, 2) == (2, 6)


def test_batches_are_whole_mixed_scale_and_keep_each_scales_order() -> None:
    """Pieces of several scales become batches of exactly ``size`` tiles (only the last
    partial), each row labelled with its scale and kept in arrival order."""
    from histoalign_wsi.features.encode import _batches

    # tile k of scale s is a constant image of value 10 * s + k: its identity survives the cut
    def piece(s: int, ks: range) -> tuple[int, np.ndarray]:
        return s, np.stack([np.full((3, 2, 2), 10 * s + k, np.uint8) for k in ks])

    pieces = [piece(0, range(0, 5)), piece(1, range(0, 3)), (2, np.zeros((0, 3, 2, 2), np.uint8))]
    pieces += [piece(0, range(5, 9)), piece(2, range(0, 2))]
    out = list(_batches(iter(pieces), 4))
    assert [len(b.tiles) for b in out] == [4, 4, 4, 2]
    rows: dict[int, list[int]] = {}
    for b in out:
        covered = 0
        for sc, start, k in b.segments:
            assert start == covered  # segments tile the batch, in order
            covered += k
            rows.setdefault(sc, []).extend(int(v) - 10 * sc for v in b.tiles[start : start + k, 0, 0, 0])
        assert covered == len(b.tiles)
    assert rows == {0: list(range(9)), 1: [0, 1, 2], 2: [0, 1]}
    assert out[1].segments == ((0, 0, 1), (1, 1, 3))  # a batch that mixes scales


def test_geometry_copy_keeps_the_geometry_and_leaves_features_and_source_alone(
    features: Path, tmp_path: Path
) -> None:
    """The new store copies the source's attributes, coordinates, tissue fractions and
    parent links, but no features the source holds; the source is untouched; and a
    failure inside leaves no store behind."""
    from histoalign_wsi.features.store import copy_geometry

    src = open_store(features)  # a store that holds features: they must not come along
    files = {p: p.read_bytes() for p in features.rglob("*") if p.is_file()}
    with copy_geometry(src, tmp_path / "new.zarr") as root:
        assert root["scales/0.50mpp/features"] is not None
    new = open_store(tmp_path / "new.zarr")
    assert new.attrs == src.attrs and new.scale_names == src.scale_names
    for name in src.scale_names:
        a, b = src.scale(name), new.scale(name)
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.tissue_fraction, b.tissue_fraction)
        assert a.parents.keys() == b.parents.keys() and a.attrs == b.attrs
        for k in a.parents:
            np.testing.assert_array_equal(a.parents[k], b.parents[k])
        assert src.encoders(name) == ["demo"] and new.encoders(name) == []
    assert {p: p.read_bytes() for p in features.rglob("*") if p.is_file()} == files
    with pytest.raises(RuntimeError), copy_geometry(src, tmp_path / "failed.zarr"):
        raise RuntimeError("encoder crashed")
    assert not (tmp_path / "failed.zarr").exists() and sorted(tmp_path.iterdir()) == [tmp_path / "new.zarr"]
