"""Per-slide stages in batches (what the workflow runs): a bad slide in a batch never
loses its batchmates, the encoder loads once per batch and not at all when every store
is current, a rerun retries only what failed, and the manifests stand for their slides
in every command that takes stores or predictions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from histoalign_wsi.batches import (
    BatchSlide,
    ManifestRow,
    expand_inputs,
    parse_spec,
    read_manifest,
    retry_token,
    write_manifest,
)
from histoalign_wsi.cli import main
from histoalign_wsi.config import load_config
from histoalign_wsi.errors import ConfigError, HistoAlignError, SlideError
from histoalign_wsi.features.store import open_store
from histoalign_wsi.stages import pick_slides, run_batch

from .conftest import CMU


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[BatchSlide], Path]:
    d = tmp_path_factory.mktemp("batch")
    (d / "slides").mkdir()
    good = [d / "slides" / "gut 1 — ü.svs", d / "slides" / "good2.svs"]
    for p in good:
        shutil.copy(CMU, p)
    bad = d / "slides" / "broken.svs"
    bad.write_bytes(CMU.read_bytes()[:20000])
    slides = [
        BatchSlide("gut_1_ü", str(good[0])),
        BatchSlide("broken", str(bad)),
        BatchSlide("good2", str(good[1])),
    ]
    return slides, d


def _count_loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from histoalign_wsi.features import adapters

    calls: list[int] = []
    real = adapters.load_encoders

    def counting(*a: object, **k: object) -> object:
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(adapters, "load_encoders", counting)
    return calls


def test_a_bad_slide_in_a_batch_loses_no_good_one(
    cohort: tuple[list[BatchSlide], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    slides, d = cohort
    res, cfg = d / "results", load_config()
    m = res / "batches"
    rows = run_batch("prepare", slides, res, m / "prepare.tsv", cfg)
    assert [r.status for r in rows] == ["ok", "failed", "ok"]
    assert "broken.svs" in rows[1].error and "truncated or damaged" in rows[1].error
    assert "\n" not in rows[1].error
    loads = _count_loads(monkeypatch)
    rows = run_batch("encode", slides, res, m / "encode.tsv", cfg, upstream=m / "prepare.tsv")
    assert [r.status for r in rows] == ["ok", "upstream", "ok"] and loads == [1]  # once per batch
    assert rows[1].error.startswith("prepare: ")  # carried, not retried by this stage
    for sid in ("gut_1_ü", "good2"):
        assert open_store(res / "features" / f"{sid}.zarr").validate() == []
    text = res / "text.npz"
    assert main(["embed-prompts", "--out", str(text), "--cache", str(d / "cache")]) == 0
    rows = run_batch(
        "finish", slides, res, m / "finish.tsv", cfg, upstream=m / "encode.tsv", text=text, threads=1
    )
    assert [r.status for r in rows] == ["ok", "upstream", "ok"]
    for sid in ("gut_1_ü", "good2"):
        assert (res / "predictions" / f"{sid}.json").is_file()
        assert (res / "heatmaps" / sid / "argmax.webp").is_file()
        assert (res / "geojson" / f"{sid}.geojson").stat().st_size > 100
    assert not (res / "predictions" / "broken.json").exists()
    # the manifests stand for their good slides wherever stores or predictions are taken
    assert expand_inputs([m / "encode.tsv", Path("other.zarr")]) == [
        res / "features" / "gut_1_ü.zarr",
        res / "features" / "good2.zarr",
        Path("other.zarr"),
    ]
    assert main(["summarize", str(m / "finish.tsv"), "--out", str(d / "p.csv")]) == 0
    # header + the two good slides + the failed one, named with its error and no probabilities
    table = pd.read_csv(d / "p.csv")
    assert len(table) == 3 and sorted(table["status"]) == ["failed", "ok", "ok"]
    bad = table[table["status"] == "failed"].iloc[0]
    assert bad["slide_id"] == "broken" and "truncated or damaged" in bad["error"]
    assert bad.filter(like="prob_").isna().all()


def test_a_rerun_keeps_current_stores_and_redoes_changed_ones(
    cohort: tuple[list[BatchSlide], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import zarr

    slides, d = cohort
    res, m = d / "results", d / "results" / "batches"
    if not (m / "prepare.tsv").is_file():
        pytest.skip("needs the batch of the test above")
    cfg = load_config()
    store, other_store = (res / "features" / f"{s}.zarr" / "zarr.json" for s in ("good2", "gut_1_ü"))
    before = store.stat().st_mtime_ns
    loads = _count_loads(monkeypatch)
    rows = run_batch("encode", slides, res, m / "encode2.tsv", cfg, upstream=m / "prepare.tsv")
    assert [r.status for r in rows] == ["ok", "upstream", "ok"]
    assert loads == [] and store.stat().st_mtime_ns == before  # nothing to encode: no model loaded
    # a setting that changes how the stage runs, not what it writes: still current
    faster = load_config(overrides={"encode": {"batch_size": 16, "readers": 1}})
    run_batch("encode", slides, res, m / "encode3.tsv", faster, upstream=m / "prepare.tsv")
    assert loads == [] and store.stat().st_mtime_ns == before
    # one that changes what it writes: the stores are not current any more, and are redone
    other = load_config(overrides={"encode": {"native_jpeg": False}})
    run_batch("encode", slides, res, m / "encode3.tsv", other, upstream=m / "prepare.tsv")
    assert loads == [1] and store.stat().st_mtime_ns > before
    # a slide re-tiled (its tile store records other inputs): only its features are redone
    tiles = zarr.open_group(res / "tiles" / "gut_1_ü.zarr", mode="r+")
    rec = dict(tiles.attrs["provenance"])
    tiles.update_attributes({"provenance": rec | {"inputs": rec["inputs"] | {"sheet_mpp": 0.25}}})
    kept, redone = store.stat().st_mtime_ns, other_store.stat().st_mtime_ns
    run_batch("encode", slides, res, m / "encode3.tsv", other, upstream=m / "prepare.tsv")
    assert store.stat().st_mtime_ns == kept and other_store.stat().st_mtime_ns > redone
    tiles.update_attributes({"provenance": rec})


def test_a_new_computation_version_redoes_its_stage_and_those_after(
    cohort: tuple[list[BatchSlide], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bumping a stage's computation version redoes that stage and the later ones, for
    every slide, and keeps the earlier stages; a new package version redoes everything."""
    from histoalign_wsi import provenance

    slides, d = cohort
    res, m = d / "results", d / "results" / "batches"
    if not (m / "finish.tsv").is_file():
        pytest.skip("needs the batch of the first test")
    cfg = load_config()
    state = {"text": res / "text.npz", "threads": 1}

    def stamps() -> dict[str, int]:
        files = {
            "tiles": res / "tiles" / "good2.zarr" / "zarr.json",
            "features": res / "features" / "good2.zarr" / "zarr.json",
            "scores": res / "tile_scores" / "good2.parquet",
            "geojson": res / "geojson" / "good2.geojson",
        }
        return {k: p.stat().st_mtime_ns for k, p in files.items()}

    def run_all() -> None:
        run_batch("prepare", slides, res, m / "p.tsv", cfg)
        run_batch("encode", slides, res, m / "e.tsv", cfg, upstream=m / "p.tsv")
        run_batch("finish", slides, res, m / "f.tsv", cfg, upstream=m / "e.tsv", **state)

    run_all()  # brings every output up to this configuration
    first = stamps()
    run_all()
    assert stamps() == first  # all current: nothing redone
    monkeypatch.setitem(provenance.STAGE_VERSIONS, "encode", provenance.STAGE_VERSIONS["encode"] + 1)
    run_all()
    second = stamps()
    assert second["tiles"] == first["tiles"]
    assert all(second[k] > first[k] for k in ("features", "scores", "geojson"))
    monkeypatch.setitem(provenance.STAGE_VERSIONS, "geojson", provenance.STAGE_VERSIONS["geojson"] + 1)
    run_all()
    third = stamps()
    assert {k: third[k] == second[k] for k in third} == {
        "tiles": True,
        "features": True,
        "scores": True,
        "geojson": False,
    }
    monkeypatch.setattr(provenance, "__version__", "99.0")
    run_all()
    assert all(v > third[k] for k, v in stamps().items())


def test_an_encoder_that_cannot_load_fails_the_batch_as_a_whole(
    cohort: tuple[list[BatchSlide], Path], tmp_path: Path
) -> None:
    slides, _ = cohort
    reg = tmp_path / "reg.yaml"
    reg.write_text(
        "nowhere:\n  kind: open_clip\n  architecture: ViT-B-16\n  weights: {path: no.pt}\n  embed_dim: 512\n"
    )
    cfg = load_config(overrides={"encoder_registry": str(reg), "encoders": ["nowhere"]})
    res = tmp_path / "r"
    run_batch("prepare", slides[:1], res, res / "p.tsv", load_config())
    with pytest.raises(HistoAlignError, match=r"nowhere|no\.pt"):
        run_batch("encode", slides[:1], res, res / "e.tsv", cfg, upstream=res / "p.tsv")
    assert not (res / "e.tsv").exists()  # no manifest: the job fails, every slide is retried


def test_retry_token_changes_only_while_a_slide_has_failed(tmp_path: Path) -> None:
    m = tmp_path / "m.tsv"
    assert retry_token(m) == ""  # no manifest yet
    write_manifest(m, [ManifestRow("a", "ok", "x")], token="")
    assert retry_token(m) == ""  # no failure: the token the batch ran with, nothing reruns
    write_manifest(m, [ManifestRow("a", "ok", "x"), ManifestRow("b", "failed", "", "boom")], token="")
    first = retry_token(m)
    assert first.startswith("retry-") and first != ""  # the last run's token was "": rerun
    os.utime(m, ns=(m.stat().st_mtime_ns + 10**9,) * 2)
    assert retry_token(m) != first  # it failed again: another token, tried again next time
    write_manifest(m, [ManifestRow("a", "ok", "x"), ManifestRow("b", "ok", "y")], token=first)
    assert retry_token(m) == first  # fixed: the token it ran with, so no further rerun
    rows, token = read_manifest(m)
    assert token == first and [r.slide_id for r in rows] == ["a", "b"]
    write_manifest(m, [ManifestRow("a", "upstream", "", "prepare: x")], token="t")
    assert retry_token(m) == "t"  # an earlier stage's failure is that stage's to retry


def test_a_slide_target_and_a_bad_spec_are_named(tmp_path: Path) -> None:
    m = write_manifest(
        tmp_path / "m.tsv",
        [
            ManifestRow("a b", "ok", "p/a b.json"),
            ManifestRow("c", "failed", "", "encode: slide 'c.svs': boom"),
        ],
    )
    pick_slides([BatchSlide("a b", "a b.svs")], m, tmp_path / "a.tsv")
    assert read_manifest(tmp_path / "a.tsv")[0] == [ManifestRow("a b", "ok", "p/a b.json")]
    with pytest.raises(SlideError, match=r"encode: slide 'c\.svs': boom"):
        pick_slides([BatchSlide("c", "c.svs")], m, tmp_path / "c.tsv")
    assert not (tmp_path / "c.tsv").exists()
    # the same through the CLI, as the workflow's `slide` rule calls it
    base = ["batch", "pick", "--results", str(tmp_path), "--upstream", str(m)]
    assert (
        main([*base, "--spec", json.dumps([["a b", "a b.svs", None]]), "--out", str(tmp_path / "o.tsv")]) == 0
    )
    assert main([*base, "--spec", json.dumps([["c", "c.svs", None]]), "--out", str(tmp_path / "p.tsv")]) == 2
    assert (tmp_path / "o.tsv").is_file() and not (tmp_path / "p.tsv").exists()
    spec = json.dumps([["a b", "/x/a b.svs", 0.25], ["c", "c.svs", None]])
    assert parse_spec(spec) == [BatchSlide("a b", "/x/a b.svs", 0.25), BatchSlide("c", "c.svs", None)]
    with pytest.raises(ConfigError, match="batch spec"):
        parse_spec('{"a": 1}')
    (tmp_path / "x.tsv").write_text("slide_id\tstatus\n")
    with pytest.raises(ConfigError, match="not a batch manifest"):
        read_manifest(tmp_path / "x.tsv")
    assert expand_inputs([tmp_path / "x.tsv"]) == [tmp_path / "x.tsv"]  # not a manifest: as given


def test_an_added_encoder_does_not_re_encode_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second encoder added to the config: the first one's features are copied from the
    current store (not encoded again), and the store equals one made from scratch."""
    import numpy as np

    slide = tmp_path / "s.svs"
    shutil.copy(CMU, slide)
    reg = tmp_path / "reg.yaml"
    from histoalign_wsi.features import registry

    demo = (Path(registry.__file__).parent / "registry.yaml").read_text()
    block = demo[demo.index("demo:") : demo.index("plip:")].replace("demo:", "demo2:", 1)
    reg.write_text(block.replace("seed: 0", "seed: 1"))
    one = load_config()
    two = load_config(overrides={"encoders": ["demo", "demo2"], "encoder_registry": str(reg)})
    slides = [BatchSlide("s", str(slide))]
    for res in (tmp_path / "r", tmp_path / "scratch"):
        run_batch("prepare", slides, res, res / "p.tsv", one)
    r = tmp_path / "r"
    run_batch("encode", slides, r, r / "e1.tsv", one, upstream=r / "p.tsv")
    caplog.clear()
    with caplog.at_level("INFO"):
        run_batch("encode", slides, r, r / "e2.tsv", two, upstream=r / "p.tsv")
    assert "features of demo kept from the current store" in caplog.text
    s = tmp_path / "scratch"
    run_batch("encode", slides, s, s / "e.tsv", two, upstream=s / "p.tsv")
    a, b = open_store(r / "features" / "s.zarr"), open_store(s / "features" / "s.zarr")
    assert a.validate() == [] and a.attrs["provenance"] == b.attrs["provenance"]
    for scale in a.scale_names:
        assert a.encoders(scale) == ["demo", "demo2"]
        for enc in ("demo", "demo2"):
            np.testing.assert_array_equal(a.features(scale, enc), b.features(scale, enc))


def test_a_damaged_store_is_remade_not_kept(tmp_path: Path) -> None:
    """A feature chunk deleted from a store whose record is current: the encode stage
    reads every feature before keeping a store, so it remakes this one (what
    ``--forcerun encode`` does after a refusal), equal to the original."""
    import numpy as np

    slide = tmp_path / "s.svs"
    shutil.copy(CMU, slide)
    cfg, slides, r = load_config(), [BatchSlide("s", str(slide))], tmp_path / "r"
    run_batch("prepare", slides, r, r / "p.tsv", cfg)
    run_batch("encode", slides, r, r / "e.tsv", cfg, upstream=r / "p.tsv")
    store = r / "features" / "s.zarr"
    before = {s: open_store(store).features(s, "demo") for s in open_store(store).scale_names}
    chunk = next((store / "scales").glob("*/features/demo/c/0/0"))
    chunk.unlink()
    assert open_store(store).validate() != []
    rows = run_batch("encode", slides, r, r / "e2.tsv", cfg, upstream=r / "p.tsv")
    assert rows[0].ok and open_store(store).validate() == []
    for s, x in before.items():
        np.testing.assert_array_equal(open_store(store).features(s, "demo"), x)
