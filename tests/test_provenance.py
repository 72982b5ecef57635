"""Provenance records, file fingerprints and their cache, checked caches and the stale-
output rules, without Snakemake (fast). The workflow-level reruns are in test_rerun.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from histoalign_wsi import provenance
from histoalign_wsi.config import load_config
from histoalign_wsi.provenance import FINGERPRINT_BYTES, Expected, HashCache, differs, digest, settings_hash


def test_fingerprint_reads_both_ends_and_follows_a_rewrite(tmp_path: Path) -> None:
    """Size plus the first and last MB: a change at either end or in the size shows; the
    cache answers by stat, and a rewrite with the old mtime (cp -p) still shows."""
    f = tmp_path / "slide.svs"
    data = bytearray(os.urandom(3 * FINGERPRINT_BYTES))
    f.write_bytes(data)
    cache = HashCache(tmp_path / "h.json")
    fp = cache.fingerprint(f)
    assert fp.startswith(f"{len(data)}-")
    st = f.stat()
    for where in (10, len(data) - 10):  # either end
        changed = bytearray(data)
        changed[where] ^= 0xFF
        f.write_bytes(changed)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert cache.fingerprint(f) != fp, where
    f.write_bytes(data)
    assert cache.fingerprint(f) == fp
    middle = bytearray(data)
    middle[len(data) // 2] ^= 0xFF  # the middle is not read: by design, a cheap fingerprint
    assert HashCache().fingerprint(_write(tmp_path / "m.svs", middle)) == fp
    cache.save()
    again = HashCache(tmp_path / "h.json")
    assert again.fingerprint(f) == fp and not again._dirty  # answered from the saved cache


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(bytes(data))
    return p


def test_a_damaged_hash_cache_is_rebuilt(tmp_path: Path) -> None:
    (tmp_path / "h.json").write_text("{not json")
    f = _write(tmp_path / "x", b"abc")
    assert HashCache(tmp_path / "h.json").sha256(f) == HashCache().sha256(f)


def test_settings_hash_leaves_out_what_changes_nothing() -> None:
    a = load_config(overrides={"encode": {"batch_size": 8, "readers": 1}})
    b = load_config(overrides={"encode": {"batch_size": 64, "readers": 3, "prefetch": 7}})
    c = load_config(overrides={"encode": {"native_jpeg": False}})
    assert settings_hash(a, "encode") == settings_hash(b, "encode") != settings_hash(c, "encode")
    assert settings_hash(a, "score") == settings_hash(c, "score")
    d = load_config(overrides={"pooling": {"method": "max"}})
    assert settings_hash(a, "score") != settings_hash(d, "score")


def test_differs_names_what_changed() -> None:
    cfg = load_config()
    rec = provenance.make_record("score", cfg, {"features": "a", "text": "b", "calibration": None})
    assert differs(rec, rec) is None
    assert differs(None, rec) == "no provenance record"
    other = provenance.make_record("score", cfg, {"features": "z", "text": "b", "calibration": None})
    assert differs(other, rec) == "input changed: features"
    assert differs(rec | {"version": 0}, rec) == f"version 0 -> {provenance.STAGE_VERSIONS['score']}"
    assert differs(rec | {"settings": "x"}, rec) == "settings changed"
    assert digest(rec) != digest(other)


def test_encoder_identity_follows_weights_and_registry(tmp_path: Path) -> None:
    """The identity changes when the weights file is rewritten in place or the registry
    entry's preprocessing is edited; not when only its description is."""
    from histoalign_wsi.features.identity import encoder_identity
    from histoalign_wsi.features.registry import EncoderEntry

    w = _write(tmp_path / "w.safetensors", b"weights one")
    raw = {"kind": "open_clip", "embed_dim": 8, "architecture": "ViT-B-32", "weights": {"path": str(w)}}
    cache = HashCache()
    one = encoder_identity(EncoderEntry.parse("m", raw), offline=True, cache=cache)
    st = w.stat()
    w.write_bytes(b"weights two")
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    two = encoder_identity(EncoderEntry.parse("m", raw), offline=True, cache=cache)
    assert one["entry"] == two["entry"] and one["weights"] != two["weights"]
    described = encoder_identity(
        EncoderEntry.parse("m", raw | {"description": "new words"}), offline=True, cache=cache
    )
    assert described == two
    pre = encoder_identity(
        EncoderEntry.parse("m", raw | {"preprocess": {"mean": [0.4, 0.4, 0.4]}}), offline=True, cache=cache
    )
    assert pre["entry"] != two["entry"]
    w.unlink()
    assert encoder_identity(EncoderEntry.parse("m", raw), offline=True, cache=cache)["weights"] == "not found"


def test_text_record_follows_every_prompt(tmp_path: Path) -> None:
    bag = tmp_path / "bag.yaml"
    bag.write_text("classes:\n  tumour: {names: [tumour]}\n  stroma: {names: [stroma]}\n")
    e = Expected(load_config(overrides={"prompt_bag": str(bag)}), HashCache())
    first = e.text()
    bag.write_text("classes:\n  tumour: {names: [tumour, carcinoma]}\n  stroma: {names: [stroma]}\n")
    assert differs(first, Expected(e.cfg, HashCache()).text()) == "input changed: prompts"
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "bag.yaml"  # the bag's name is its file name: kept
    shutil.copy(bag, moved)
    cfg_moved = load_config(overrides={"prompt_bag": str(moved)})
    assert Expected(cfg_moved, HashCache()).text() == Expected(e.cfg, HashCache()).text()


# --- checked caches and text files ------------------------------------------------------


@pytest.fixture(scope="module")
def demo_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo encoder's text embeddings of a small bag, with their cache folder."""
    from histoalign_wsi.stages import run_embed_prompts

    d = tmp_path_factory.mktemp("text")
    bag = d / "bag.yaml"
    bag.write_text(
        "classes:\n  tumour: {names: [tumour]}\n  stroma: {names: [stroma]}\n  fat: {names: [fat]}\n"
    )
    cfg = load_config(overrides={"prompt_bag": str(bag), "results": str(d / "results")})
    out = run_embed_prompts(
        d / "results" / "text_embeddings.npz", cfg, cache=d / "results" / "cache" / "text"
    )
    return out, d / "results" / "cache" / "text"


@pytest.mark.parametrize("damage", ["zeros", "nan", "rows", "truncated"])
def test_a_damaged_cache_entry_is_named_and_recomputed(
    demo_text: tuple[Path, Path], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    from histoalign_wsi.features.adapters import load_encoders
    from histoalign_wsi.zeroshot.prompts import load_bag
    from histoalign_wsi.zeroshot.text import embed_bag, load_text

    text, cache = demo_text
    (entry,) = cache.glob("*.npy")
    good = np.load(entry)
    bad = {
        "zeros": np.zeros_like(good),
        "nan": np.where(np.arange(good.size).reshape(good.shape) == 3, np.nan, good),
        "rows": good[:-1],
    }
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    else:
        np.save(entry, bad[damage])
    ref = load_text(text)
    cfg = load_config(overrides={"prompt_bag": ref.bag_name})
    bag_path = text.parent.parent / "bag.yaml"
    te = embed_bag(load_bag(str(bag_path)), load_encoders(cfg), cache_dir=cache)
    assert entry.name in caplog.text and ("damaged" in caplog.text or "unreadable" in caplog.text)
    np.testing.assert_allclose(te.encoders["demo"].emb, ref.encoders["demo"].emb, atol=1e-6)
    np.testing.assert_allclose(np.load(entry), good, atol=1e-6)  # the entry is mended


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("zeros", "rows are not unit vectors"),
        ("nan", "holds NaN or infinite values"),
        ("cls", "class indices outside"),
        ("notzip", "not a readable .npz"),
    ],
)
def test_damaged_text_embeddings_are_refused_naming_the_file(
    demo_text: tuple[Path, Path], tmp_path: Path, damage: str, message: str
) -> None:
    from histoalign_wsi.errors import StoreError
    from histoalign_wsi.zeroshot.text import load_text

    src, _ = demo_text
    out = tmp_path / "t.npz"
    with np.load(src) as z:
        arrays = {k: z[k] for k in z}
    if damage == "zeros":
        arrays["demo.emb"] = np.zeros_like(arrays["demo.emb"])
    elif damage == "nan":
        arrays["demo.emb"][0, 0] = np.nan
    elif damage == "cls":
        arrays["demo.cls"] = arrays["demo.cls"] + 5
    np.savez(out, **arrays)
    if damage == "notzip":
        out.write_bytes(b"nothing")
    with pytest.raises(StoreError, match=message) as err:
        load_text(out)
    assert str(out) in str(err.value)


def test_text_embeddings_record_what_they_were_made_from(demo_text: tuple[Path, Path]) -> None:
    from histoalign_wsi.zeroshot.text import load_text

    te = load_text(demo_text[0])
    assert te.provenance is not None and te.provenance["stage"] == "embed_prompts"
    assert set(te.provenance["inputs"]) == {"prompts", "encoders"}
    assert te.provenance["inputs"]["encoders"]["demo"]["weights"] == "seed:0"


# --- what the cohort outputs show ---------------------------------------------------------


def _cohort(res: Path, n: int) -> tuple[list[Path], Path]:
    """Planted predictions and a label sheet for them."""
    from .planting import synthetic_cohort

    synthetic_cohort(res, n)
    preds = sorted((res / "predictions").glob("*.json"))
    labels = res / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{p.stem},class 1 é\n" for p in preds), encoding="utf-8")
    return preds, labels


def test_summarize_without_labels_removes_metrics_an_earlier_run_left(tmp_path: Path) -> None:
    from histoalign_wsi.stages import run_summarize

    preds, labels = _cohort(tmp_path, 4)
    metrics, confusion = tmp_path / "metrics.json", tmp_path / "cm.png"
    run_summarize(preds, tmp_path / "p.csv", labels=labels, metrics=metrics, confusion=confusion)
    m = json.loads(metrics.read_text())
    assert m["provenance"]["inputs"]["labels"] == HashCache().sha256(labels) and confusion.is_file()
    run_summarize(preds, tmp_path / "p.csv", metrics=metrics, confusion=confusion)
    assert not metrics.exists() and not confusion.exists()


def test_report_shows_only_the_sections_this_run_made(tmp_path: Path) -> None:
    from histoalign_wsi.outputs.report import write_report
    from histoalign_wsi.stages import run_summarize

    preds, labels = _cohort(tmp_path, 3)
    csv = tmp_path / "predictions.csv"
    run_summarize(preds, csv, labels=labels, metrics=tmp_path / "metrics.json")
    assert "<h2>Metrics</h2>" in write_report(csv, tmp_path / "a.html").read_text()
    assert "<h2>Metrics</h2>" not in write_report(csv, tmp_path / "b.html", show=[]).read_text()
    assert "<h2>Metrics</h2>" in write_report(csv, tmp_path / "c.html", show=["metrics"]).read_text()


def test_forced_stages_follow_snakemakes_flags() -> None:
    from types import SimpleNamespace

    from histoalign_wsi.workflow import forced_stages_of

    assert forced_stages_of(SimpleNamespace(forceall=True, forcerun=set())) == [
        "prepare",
        "encode",
        "embed_prompts",
        "finish",
    ]
    assert forced_stages_of(SimpleNamespace(forceall=False, forcerun={"encode", "report"})) == ["encode"]
    assert forced_stages_of(SimpleNamespace(forceall=False, forcerun=set())) == []


def test_a_forced_stage_is_read_from_the_lock(tmp_path: Path) -> None:
    from histoalign_wsi.runlock import acquire, forced_stages, release

    acquire(tmp_path, recompute=["encode"])
    assert forced_stages(tmp_path) == {"encode"}
    release(tmp_path)
    assert forced_stages(tmp_path) == frozenset()


def test_the_closing_line_tells_an_interrupted_run_from_a_failed_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from histoalign_wsi.run_status import finish_run
    from histoalign_wsi.runlock import acquire

    from .planting import synthetic_cohort

    res = tmp_path / "r"
    synthetic_cohort(res, 3)
    ids = sorted(p.stem for p in (res / "predictions").glob("*.json"))
    (res / "logs").mkdir()
    for line, expected in (
        ("INFO x: writing the report\n", "was STOPPED before it finished (interrupted"),
        ("histoalign-wsi report: error: no space left on device\n", "FAILED in a step after scoring"),
    ):
        acquire(res)
        (res / "logs" / "report.log").write_text(line)
        caplog.clear()
        with caplog.at_level("ERROR"):
            finish_run(res, ids, ok=False)
        assert expected in caplog.text and "all 3 slides are scored" in caplog.text


def test_an_embedded_report_over_the_size_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from histoalign_wsi.outputs import report
    from histoalign_wsi.stages import run_summarize

    preds, labels = _cohort(tmp_path, 3)
    csv = tmp_path / "predictions.csv"
    run_summarize(preds, csv, labels=labels, metrics=tmp_path / "metrics.json")
    monkeypatch.setattr(report, "EMBED_WARN_BYTES", 1000)
    with caplog.at_level("WARNING"):
        report.write_report(csv, tmp_path / "linked.html")
    assert "embedded images" not in caplog.text  # linked images: no warning
    with caplog.at_level("WARNING"):
        report.write_report(csv, tmp_path / "embedded.html", embed=True)
    assert "report.embed: false" in caplog.text and "3 slides" in caplog.text
    # the intervals reach the page beside each metric
    metrics = (tmp_path / "linked.html").read_text().split("<h2>Metrics</h2>", 1)[1].split("</table>", 1)[0]
    assert "[" in metrics and "percentile bootstrap" in metrics
