"""Reruns are always right: after each change a user makes to a results folder's inputs,
a rerun through the real Snakemake workflow gives exactly what a run from scratch on the
changed inputs gives (arrays equal, JSON and CSV equal), and redoes only what changed.
One test per row of the README's "Running again" table."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from histoalign_wsi.features.store import open_store
from histoalign_wsi.slides.synthetic import make_demo_cohort

from .test_workflow import job_counts, smk

pytestmark = pytest.mark.slow

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
IDS = ("demo_01", "demo_02")


def _weights(path: Path, seed: int) -> None:
    """A small random open_clip model saved as safetensors (rewritten in place)."""
    import torch
    from safetensors.torch import save_file

    from histoalign_wsi.features.adapters import build_open_clip_from_cfg

    torch.manual_seed(seed)
    model = build_open_clip_from_cfg(TINY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _registry(w: Path, mean: float = 0.5) -> None:
    entry = {
        "kind": "open_clip",
        "embed_dim": 32,
        "model_cfg": TINY,
        "preprocess": {"size": 64, "mean": [mean] * 3, "std": [0.25] * 3, "interpolation": "bicubic"},
        "weights": {"path": "weights.safetensors"},
    }
    (w / "reg.yaml").write_text(yaml.safe_dump({"tiny": entry}))


def _config(w: Path, **kw: object) -> None:
    cfg = {
        "slides": "slides",
        "results": "results",
        "labels": "labels.csv",
        "encoders": ["tiny"],
        "encoder_registry": "reg.yaml",
        "scales_mpp": [1.0, 2.0],
        "heatmap": {"max_size": 256},
    } | kw
    (w / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run on two small slides with a tiny encoder from a local weights file,
    made in ``w`` and kept aside: each test gets it back at the same absolute path."""
    w = tmp_path_factory.mktemp("rerun") / "w"
    w.mkdir()
    make_demo_cohort(w / "slides", n=2, width=3072, height=2304, ome_every=9, masks_dir=w / "truth")
    (w / "labels.csv").write_text("slide_id,label\ndemo_01,TUM\ndemo_02,STR\n")
    _weights(w / "weights.safetensors", 0)
    _registry(w)
    _config(w)
    smk(w, "--cores", "2")
    stash = w.with_name("stash")
    w.rename(stash)
    return stash


@pytest.fixture()
def work(base: Path) -> Path:
    """The finished run, copied back where it was made (times and Snakemake's records
    kept), to change."""
    w = base.with_name("w")
    shutil.rmtree(w, ignore_errors=True)
    shutil.copytree(base, w, symlinks=True)
    return w


def _arrays(store: Path) -> dict[str, np.ndarray]:
    st = open_store(store)
    out = {}
    for s in st.scale_names:
        sv = st.scale(s)
        out[f"{s}/coords"] = sv.coords
        for e in st.encoders(s):
            out[f"{s}/{e}"] = np.asarray(st.features_array(s, e)[...])
    return out


def _pred(p: Path) -> dict[str, object]:
    return json.loads(p.read_text(encoding="utf-8"))


def assert_same_as_scratch(w: Path, *extra: str) -> None:
    """Run from scratch on the same inputs into ``scratch/`` and compare every output."""
    smk(w, "--cores", "2", "--config", "results=scratch", *extra)
    a, b = w / "results", w / "scratch"
    pd.testing.assert_frame_equal(pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv"))
    for name in ("metrics.json", "confusion_matrix.png"):
        assert (a / name).is_file() == (b / name).is_file(), name
    if (b / "metrics.json").is_file():
        assert _pred(a / "metrics.json") == _pred(b / "metrics.json")
    ra, rb = (x.read_text(encoding="utf-8") for x in (a / "report.html", b / "report.html"))
    assert ("<h2>Metrics</h2>" in ra) == ("<h2>Metrics</h2>" in rb)
    with np.load(a / "text_embeddings.npz") as ta, np.load(b / "text_embeddings.npz") as tb:
        assert set(ta) == set(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)
    for sid in IDS:
        for kind in ("tiles", "features"):
            xa, xb = _arrays(a / kind / f"{sid}.zarr"), _arrays(b / kind / f"{sid}.zarr")
            assert xa.keys() == xb.keys()
            for k in xa:
                np.testing.assert_array_equal(xa[k], xb[k], err_msg=f"{sid} {kind} {k}")
            assert (
                open_store(a / kind / f"{sid}.zarr").attrs["slide"]
                == open_store(b / kind / f"{sid}.zarr").attrs["slide"]
            )
        assert _pred(a / "predictions" / f"{sid}.json") == _pred(b / "predictions" / f"{sid}.json")
        assert _pred(a / "geojson" / f"{sid}.geojson") == _pred(b / "geojson" / f"{sid}.geojson")
        pd.testing.assert_frame_equal(
            pd.read_parquet(a / "tile_scores" / f"{sid}.parquet"),
            pd.read_parquet(b / "tile_scores" / f"{sid}.parquet"),
        )
        assert (a / "heatmaps" / sid / "argmax.webp").read_bytes() == (
            b / "heatmaps" / sid / "argmax.webp"
        ).read_bytes()


def _jobs(w: Path, *args: str) -> dict[str, int]:
    out = smk(w, "--cores", "2", "-n", *args)
    return job_counts(out.stdout + out.stderr)


def _log(w: Path, stage: str) -> str:
    return (w / "results" / "logs" / stage / "b00000.log").read_text(encoding="utf-8")


# --- the table's rows -------------------------------------------------------------------


def test_label_corrected_in_place(work: Path) -> None:
    """Row 1: the label sheet edited (same path, its mtime put back): metrics follow it."""
    sheet = work / "labels.csv"
    st = sheet.stat()
    sheet.write_text("slide_id,label\ndemo_01,STR\ndemo_02,STR\n")
    os.utime(sheet, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _jobs(work) == {"summarize": 1, "run_record": 1, "report": 1, "all": 1}
    smk(work, "--cores", "2")
    assert _pred(work / "results" / "metrics.json")["n"] == 2
    assert pd.read_csv(work / "results" / "predictions.csv")["label"].tolist() == ["STR", "STR"]
    assert_same_as_scratch(work)


def test_weights_rewritten_in_place(work: Path) -> None:
    """Row 2: another model's weights written over the same file: features, text
    embeddings and predictions are all redone (prepare is not)."""
    _weights(work / "weights.safetensors", 1)
    jobs = _jobs(work)
    assert "prepare" not in jobs and jobs["encode"] == 1 and jobs["embed_prompts"] == 1
    smk(work, "--cores", "2")
    assert_same_as_scratch(work)


def test_weights_rewritten_then_forceall(work: Path) -> None:
    """Row 3: the same, then ``--forceall``: every stage recomputes (none keeps a store),
    the run succeeds, and the cohort table lists current predictions only."""
    _weights(work / "weights.safetensors", 1)
    smk(work, "--cores", "2", "--forceall")
    assert "current, kept" not in _log(work, "encode") + _log(work, "prepare") + _log(work, "finish")
    assert_same_as_scratch(work)


def test_labels_removed(work: Path) -> None:
    """Row 4: ``labels: null`` after a labelled run: no metrics file, no metrics section."""
    _config(work, labels=None)
    smk(work, "--cores", "2")
    r = work / "results"
    assert not (r / "metrics.json").exists() and not (r / "confusion_matrix.png").exists()
    assert "<h2>Metrics</h2>" not in (r / "report.html").read_text(encoding="utf-8")
    assert_same_as_scratch(work)


def test_slide_replaced_with_its_old_mtime(work: Path, tmp_path: Path) -> None:
    """Row 5: another scan copied over a slide, its old mtime restored (``cp -p``, a
    restore): that slide is redone, the other kept."""
    other = make_demo_cohort(tmp_path / "rescan", n=2, width=3072, height=2304, seed=5, ome_every=9)
    slide = work / "slides" / "demo_02.svs"
    st = slide.stat()
    shutil.copyfile(other[1], slide)
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    smk(work, "--cores", "2")
    log = _log(work, "prepare")
    assert (
        "demo_01: tissue are current, kept" in log and "demo_02: tissue redone: input changed: slide" in log
    )
    assert_same_as_scratch(work)


def test_sheet_mpp_corrected(work: Path) -> None:
    """Row 6: a slide sheet's ``mpp`` corrected: tiles are laid again at the new MPP."""
    rows = "slide_id,path,mpp\ndemo_01,slides/demo_01.svs,{}\ndemo_02,slides/demo_02.svs,0.5\n"
    (work / "sheet.csv").write_text(rows.format(0.5))
    _config(work, slides="sheet.csv")
    smk(work, "--cores", "2")
    (work / "sheet.csv").write_text(rows.format(1.0))
    smk(work, "--cores", "2")
    assert open_store(work / "results" / "tiles" / "demo_01.zarr").attrs["slide"]["mpp"] == 1.0
    assert "demo_02: tiles are current, kept" in _log(work, "prepare")
    assert_same_as_scratch(work)


def test_registry_edited(work: Path) -> None:
    """Row 7: the encoder registry's preprocessing edited: features are redone."""
    _registry(work, mean=0.4)
    jobs = _jobs(work)
    assert jobs.get("encode") == 1 and "prepare" not in jobs
    smk(work, "--cores", "2")
    assert_same_as_scratch(work)


def test_text_cache_entry_damaged(work: Path) -> None:
    """Row 8: a text-embedding cache entry zeroed (same shape): recomputed, named."""
    (entry,) = (work / "results" / "cache" / "text").glob("*.npy")
    np.save(entry, np.zeros_like(np.load(entry)))
    (work / "results" / "text_embeddings.npz").unlink()
    smk(work, "--cores", "2", "results/text_embeddings.npz")  # the entry is read again
    smk(work, "--cores", "2")
    log = _log_embed(work)
    assert f"{entry.name} is damaged (rows are not unit vectors" in log
    assert np.allclose(np.linalg.norm(np.load(entry), axis=1), 1.0, atol=1e-2)
    assert_same_as_scratch(work)


def _log_embed(w: Path) -> str:
    return (w / "results" / "logs" / "embed_prompts.log").read_text(encoding="utf-8")


def test_settings_that_change_nothing_rerun_nothing(work: Path) -> None:
    """``encode.batch_size`` changes no store: nothing to do."""
    out = smk(work, "--cores", "2", "-n", "--config", "encode={batch_size: 7}")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_heatmap_format_redraws_only_the_heatmaps(work: Path) -> None:
    smk(work, "--cores", "2", "--config", "heatmap={max_size: 256, format: png}")
    log = _log(work, "finish")
    assert log.count("scores are current, kept") == 2 and log.count("GeoJSON is current, kept") == 2
    assert log.count("heatmaps are redone: settings changed") == 2
    assert (work / "results" / "heatmaps" / "demo_01" / "argmax.png").is_file()


def test_a_new_slide_regroups_without_redoing_the_others(work: Path, tmp_path: Path) -> None:
    """A slide added, one job per slide: each kept slide is kept whatever its batch; a
    removed slide's files are named, and removed only with ``prune=true``."""
    new = make_demo_cohort(tmp_path / "more", n=1, width=3072, height=2304, seed=3, ome_every=9)[0]
    shutil.copyfile(new, work / "slides" / "demo_00.svs")
    (work / "labels.csv").write_text("slide_id,label\ndemo_00,TUM\ndemo_01,TUM\ndemo_02,STR\n")
    smk(work, "--cores", "2", "--config", "slides_per_job=1")
    r = work / "results"
    assert "demo_00: tissue are current" not in (r / "logs" / "prepare" / "b00000.log").read_text()
    for b, sid in (("b00001", "demo_01"), ("b00002", "demo_02")):
        for stage, what in (("prepare", "tiles"), ("encode", "features"), ("finish", "scores")):
            assert f"{sid}: {what} are current, kept" in (r / "logs" / stage / f"{b}.log").read_text(), (
                stage,
                sid,
            )
    (work / "slides" / "demo_00.svs").unlink()
    (work / "labels.csv").write_text("slide_id,label\ndemo_01,TUM\ndemo_02,STR\n")
    out = smk(work, "--cores", "2")
    assert "slides no longer in the cohort remain" in out.stderr and "demo_00" in out.stderr
    assert (r / "features" / "demo_00.zarr").is_dir()
    smk(work, "--cores", "2", "--config", "prune=true", "--forcerun", "summarize")
    assert not (r / "features" / "demo_00.zarr").exists() and not (r / "tissue" / "demo_00.png").exists()


def test_slide_folder_moved(work: Path) -> None:
    """The slide folder moved to another absolute path: nothing is recomputed, and every
    output names the slides' new place, as a run from scratch does."""
    (work / "slides").rename(work / "moved")
    _config(work, slides="moved")
    smk(work, "--cores", "2")
    for stage, what in (("prepare", "tiles"), ("encode", "features"), ("finish", "scores")):
        assert _log(work, stage).count(f"{what} are current, kept") == 2, stage
    assert_same_as_scratch(work)
    assert _pred(work / "results" / "predictions" / "demo_01.json")["slide_path"].endswith(
        "moved/demo_01.svs"
    )
