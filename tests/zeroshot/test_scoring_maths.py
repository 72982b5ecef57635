"""The scoring maths with exact expected values, computed independently of the code under
test, so that a wrong rule, a dropped term or a reversed index turns a test red."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histoalign_wsi.config import load_config
from histoalign_wsi.features.store import open_store
from histoalign_wsi.zeroshot.alignment import AlignmentSpec, class_logits, class_similarity, fused_logits
from histoalign_wsi.zeroshot.calibration import CalibrationOffsets
from histoalign_wsi.zeroshot.pooling import add_parent_context, pool, softmax, topk_count
from histoalign_wsi.zeroshot.scoring import score_store
from histoalign_wsi.zeroshot.text import EncoderText, TextEmbeddings

from ..planting import build_store, make_text, planted_features

SCALES = {"scales_mpp": [0.5, 1.0, 2.0]}


def _cfg(**kw: object):  # type: ignore[no-untyped-def]
    return load_config(overrides=SCALES | kw)


def _axes_text(scale: float = 1.0, dup: int = 1) -> EncoderText:
    """Class 0: prompts e0, e1, e2; class 1: prompt e3 (``dup`` copies of every prompt)."""
    eye = np.eye(4, dtype=np.float32)
    emb = np.concatenate([eye[[0, 1, 2]]] * dup + [eye[[3]]] * dup)
    cls = np.array([0, 0, 0] * dup + [1] * dup, np.int32)
    return EncoderText("e", emb, cls, ("name",) * len(cls), "f" * 64, scale, False)


def test_rules_give_their_exact_values() -> None:
    t = _axes_text()
    x = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)  # cosines with class 0's prompts: 1, 0, 0

    def sim(rule: str, **kw: float) -> float:
        return float(class_similarity(x, t, 2, rule=rule, **kw)[0, 0])  # type: ignore[arg-type]

    assert sim("centroid") == pytest.approx(1 / np.sqrt(3), abs=1e-6)
    assert sim("mean") == pytest.approx(1 / 3, abs=1e-6)
    assert sim("topk", topk=0.3) == pytest.approx(1.0, abs=1e-6)  # best 1 of 3
    assert sim("topk", topk=0.5) == pytest.approx(0.5, abs=1e-6)  # best 2 of 3
    # K is the fraction rounded up, never to the nearest: 0.4 of 3 prompts is 2 (1.2 up)
    assert sim("topk", topk=0.4) == pytest.approx(0.5, abs=1e-6)
    assert sim("topk", topk=0.67) == pytest.approx(1 / 3, abs=1e-6)  # 2.01 up: all 3
    lse = 0.05 * np.log((np.exp(1 / 0.05) + 2) / 3)
    assert sim("lse", temperature=0.05) == pytest.approx(lse, abs=1e-6)
    assert sim("lse", temperature=100.0) == pytest.approx(1 / 3, abs=2e-3)  # large t: the mean


@pytest.mark.parametrize("rule", ["centroid", "mean", "lse", "topk"])
def test_duplicating_a_class_prompts_changes_nothing(rule: str) -> None:
    """No rule favours a class for having more prompts."""
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = class_similarity(x, _axes_text(), 2, rule=rule, topk=0.3)
    b = class_similarity(x, _axes_text(dup=3), 2, rule=rule, topk=0.3)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_logit_scale_multiplies_similarity() -> None:
    x = np.array([[0.6, 0.0, 0.0, 0.8]], np.float32)
    t = _axes_text(scale=42.0)
    np.testing.assert_allclose(class_logits(x, t, 2), 42.0 * class_similarity(x, t, 2), rtol=1e-6)
    np.testing.assert_allclose(class_logits(x, t, 2)[0], [42.0 * 0.6 / np.sqrt(3), 42.0 * 0.8], rtol=1e-5)


def test_fused_logits_weight_each_encoder_by_its_own_text() -> None:
    x = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    a, b = _axes_text(scale=10.0), _axes_text(scale=30.0)
    text = TextEmbeddings("b", "h", ("c0", "c1"), {}, "histoalign", {"a": a, "b": b})
    spec = AlignmentSpec(rule="mean", encoder_weights={"a": 3.0, "b": 1.0})
    out = fused_logits({"a": x, "b": x}, text, spec)
    # class 0: mean cosine 1/3; weighted mean of 10/3 and 30/3 with weights 3:1
    assert out[0, 0] == pytest.approx((3 * 10 / 3 + 30 / 3) / 4, rel=1e-6)


def test_topk_pooling_takes_the_top_fraction_or_count() -> None:
    lg = np.arange(100, dtype=np.float32)[:, None] * np.array([[1.0, -1.0]], np.float32)
    assert topk_count(0.1, 100) == 10 and topk_count(5, 100) == 5 and topk_count(0.001, 100) == 1
    kw = {"temperature": 1.0}
    np.testing.assert_allclose(pool(lg, method="topk", k=0.1, **kw), [94.5, -4.5])
    np.testing.assert_allclose(pool(lg, method="topk", k=5, **kw), [97.0, -2.0])
    np.testing.assert_allclose(pool(lg, method="mean", k=1, **kw), [49.5, -49.5])
    np.testing.assert_allclose(pool(lg, method="max", k=1, **kw), [99.0, 0.0])


def test_soft_pooling_moves_from_mean_to_max() -> None:
    lg = np.random.default_rng(1).normal(scale=3.0, size=(200, 3)).astype(np.float32)
    mean, mx = lg.mean(axis=0), lg.max(axis=0)
    temps = [1000.0, 10.0, 3.0, 1.0, 0.3, 0.01]
    out = np.stack([pool(lg, method="soft", k=1, temperature=t) for t in temps])
    np.testing.assert_allclose(out[0], mean, atol=0.05)
    np.testing.assert_allclose(out[-1], mx, atol=1e-2)
    assert (np.diff(out, axis=0) > -1e-5).all()  # monotone from mean to max as t falls
    assert (out[3] - mean > 2.0).all()  # at t = 1 logit it concentrates far beyond the mean


def test_parent_context_averages_each_tile_with_its_own_parents() -> None:
    fine = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], np.float32)
    mid = np.array([[10.0, 0.0], [20.0, 0.0]], np.float32)
    coarse = np.array([[100.0, 0.0]], np.float32)
    parents = [(np.array([1, 0, -1], np.int32), mid), (np.array([0, 0, -1], np.int32), coarse)]
    out = add_parent_context(fine, parents, 0.5)
    np.testing.assert_allclose(
        out[:, 0], [0.5 * 1 + 0.5 * (20 + 100) / 2, 0.5 * 2 + 0.5 * (10 + 100) / 2, 3.0]
    )


def test_slide_probabilities_match_an_independent_computation(tmp_path: Path) -> None:
    """Mean pooling at the finest scale only: softmax(scale * mean_i cos(x_i, centroid_k))."""
    text = make_text()
    fine = planted_features(text, 256, {0: (0.3, 1.0)}, seed=2)
    other = planted_features(text, 64, {1: (1.0, 2.0)}, seed=3)
    st = open_store(build_store(tmp_path / "s.zarr", {0.5: fine, 1.0: other, 2.0: other[:16]}))
    pred = score_store(st, text, _cfg(pooling={"method": "mean", "scale_weights": [1, 0, 0]})).prediction
    t = text.encoders["demo"]
    cents = np.stack([t.emb[t.cls == k].mean(axis=0) for k in range(3)])
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    z = t.logit_scale * (fine.astype(np.float16).astype(np.float32) @ cents.T).mean(axis=0)
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    got = np.array([pred.probabilities[c] for c in text.classes])
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert got.max() > 0.9  # with the logit scale the planted class is a confident call


def test_tile_scores_carry_parent_context_by_geometry(tmp_path: Path) -> None:
    """Each fine tile's context comes from the coarse tiles that contain it (found here by
    coordinates, not from the store's parent arrays)."""
    text = make_text()
    feats = {
        0.5: planted_features(text, 256, {}, seed=4),
        1.0: planted_features(text, 64, {0: (0.5, 2.0)}, seed=5),
        2.0: planted_features(text, 16, {1: (0.5, 2.0)}, seed=6),
    }
    st = open_store(build_store(tmp_path / "s.zarr", feats))
    tab = score_store(st, text, _cfg(pooling={"parent_context": 0.4})).tiles.table
    raw = score_store(st, text, _cfg(pooling={"parent_context": 0.0})).tiles.table
    cols = [c for c in tab.columns if c.startswith("logit_")]
    by_scale = {s: raw[raw["scale"] == s] for s in ("0.50mpp", "1.00mpp", "2.00mpp")}
    fine, ctx = by_scale["0.50mpp"], tab[tab["scale"] == "0.50mpp"]
    for i in range(0, len(fine), 17):
        x, y = int(fine["x"].iloc[i]), int(fine["y"].iloc[i])
        ps = []
        for s in ("1.00mpp", "2.00mpp"):
            c = by_scale[s]
            inside = (c["x"] <= x) & (x < c["x"] + c["size0"]) & (c["y"] <= y) & (y < c["y"] + c["size0"])
            if inside.any():
                ps.append(c.loc[inside, cols].to_numpy()[0])
        own = fine[cols].to_numpy()[i]
        want = 0.6 * own + 0.4 * np.mean(ps, axis=0) if ps else own
        np.testing.assert_allclose(ctx[cols].to_numpy()[i], want, atol=1e-4)


def test_calibration_subtracts_its_offsets(tmp_path: Path) -> None:
    text = make_text()
    fine = planted_features(text, 128, {0: (0.4, 1.0)}, seed=7)
    st = open_store(build_store(tmp_path / "s.zarr", {0.5: fine, 1.0: fine[:32], 2.0: fine[:8]}))
    cfg = _cfg(pooling={"parent_context": 0.0})
    off = {"0.50mpp": (100.0, 0.0, 0.0), "1.00mpp": (100.0, 0.0, 0.0), "2.00mpp": (100.0, 0.0, 0.0)}
    cal = CalibrationOffsets(
        bag_hash=text.bag_hash,
        classes=text.classes,
        rule="centroid",
        encoders={"demo": text.encoders["demo"].weights_sha256},
        encoder_weights={"demo": 1.0},
        weighting="slide",
        n_slides=1,
        offsets=off,
    )
    a = score_store(st, text, cfg)
    b = score_store(st, text, cfg, calibration=cal)
    assert a.prediction.predicted_class == "TUM" and b.prediction.predicted_class != "TUM"
    cols = [c for c in a.tiles.table.columns if c.startswith("logit_")]
    diff = a.tiles.table[cols].to_numpy() - b.tiles.table[cols].to_numpy()
    np.testing.assert_allclose(diff, np.tile([100.0, 0.0, 0.0], (len(diff), 1)), atol=1e-4)


def test_calibration_offsets_are_refused_when_they_do_not_match(tmp_path: Path) -> None:
    from histoalign_wsi.errors import StoreError
    from histoalign_wsi.zeroshot.calibration import cohort_offsets

    text = make_text()
    p = build_store(tmp_path / "s.zarr", {m: planted_features(text, 16, {}, seed=1) for m in (0.5, 1.0, 2.0)})
    off = cohort_offsets([p], text, _cfg())
    off.write(tmp_path / "c.json")
    again = CalibrationOffsets.read(tmp_path / "c.json")
    assert again == off
    with pytest.raises(StoreError, match="rule 'centroid' but scoring uses 'lse'"):
        score_store(open_store(p), text, _cfg(alignment={"rule": "lse"}), calibration=again)
    other = make_text(("TUM", "STR", "LYM"))
    with pytest.raises(StoreError, match="classes"):
        again.check(other, AlignmentSpec())
    import dataclasses

    short = dataclasses.replace(again, offsets={"0.50mpp": again.offsets["0.50mpp"]})
    with pytest.raises(StoreError, match=r"no offsets for scale 1\.00mpp"):
        score_store(open_store(p), text, _cfg(), calibration=short)


@pytest.mark.parametrize("rule", ["centroid", "lse", "topk"])
def test_calibration_offsets_are_the_mean_of_the_scored_logits(tmp_path: Path, rule: str) -> None:
    """The offsets equal the mean of exactly the logits scoring computes (the measured
    defect: lse offsets of [2.89, 4.01, 4.60] against true means of [1.83, 3.15, 3.67])."""
    from histoalign_wsi.zeroshot.calibration import cohort_offsets

    text = make_text()
    paths = [
        build_store(
            tmp_path / f"s{i}.zarr",
            {m: planted_features(text, 64, {i: (0.5, 1.0)}, seed=i + int(m * 10)) for m in (0.5, 1.0, 2.0)},
        )
        for i in range(2)
    ]
    cfg = _cfg(alignment={"rule": rule}, calibration_weighting="tile", pooling={"parent_context": 0.0})
    off = cohort_offsets(paths, text, cfg)
    tables = [score_store(open_store(p), text, cfg).tiles.table for p in paths]
    cols = [c for c in tables[0].columns if c.startswith("logit_")]
    for s in ("0.50mpp", "2.00mpp"):
        both = np.concatenate([t.loc[t["scale"] == s, cols].to_numpy() for t in tables])
        np.testing.assert_allclose(off.offset(s), both.mean(axis=0), atol=1e-3)


def test_softmax_is_a_distribution() -> None:
    z = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 0.0]], np.float32)
    p = softmax(z)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(p[0], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum(), rtol=1e-5)
    np.testing.assert_allclose(p[1], [0.5, 0.5, 0.0], atol=1e-6)


def test_calibration_file_is_checked_for_schema_and_encoder_weights(tmp_path: Path) -> None:
    from histoalign_wsi.errors import StoreError
    from histoalign_wsi.zeroshot.calibration import cohort_offsets

    text = make_text()
    p = build_store(tmp_path / "s.zarr", {m: planted_features(text, 16, {}, seed=2) for m in (0.5, 1.0, 2.0)})
    off = cohort_offsets([p], text, _cfg())
    with pytest.raises(StoreError, match="encoder_weights"):
        off.check(text, AlignmentSpec(encoder_weights={"demo": 2.0}))
    (tmp_path / "other.json").write_text('{"offsets": {}}')
    with pytest.raises(StoreError, match="is not a histoalign-calibration/1 file"):
        CalibrationOffsets.read(tmp_path / "other.json")


def test_pooling_edge_cases_and_types() -> None:
    one = np.array([[1.0, 2.0]], np.float32)
    for method in ("mean", "max", "topk", "soft"):
        out = pool(one, method=method, k=0.05, temperature=1.0)
        np.testing.assert_allclose(out, [1.0, 2.0], rtol=1e-6)
        assert out.dtype == np.float32
    with pytest.raises(ValueError, match="at least one tile"):
        pool(np.zeros((0, 2), np.float32), method="mean", k=1, temperature=1.0)
    assert topk_count(1, 100) == 1 and topk_count(1.0, 7) == 1  # a count of one, not a fraction
    assert topk_count(0.999, 100) == 100 and topk_count(250, 100) == 100
    assert softmax(np.zeros((1, 3), np.float32)).dtype == np.float32


def test_scale_fusion_is_a_normalised_weighted_mean() -> None:
    from histoalign_wsi.zeroshot.pooling import fuse_scales

    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 8.0], np.float32)
    out = fuse_scales({"a": a, "b": b, "c": None}, {"a": 1.0, "b": 3.0, "c": 5.0})
    np.testing.assert_allclose(out, [0.25, 6.0])  # (1 * a + 3 * b) / 4; c has no tiles
    assert out is not None and out.dtype == np.float32
    # a scale without a weight, or with weight 0, takes no part; none left gives None
    np.testing.assert_allclose(fuse_scales({"a": a, "b": b}, {"a": 2.0}), a)
    assert fuse_scales({"a": a}, {"a": 0.0}) is None


def test_parent_context_with_a_single_parent_and_encoder_weight_defaults() -> None:
    from histoalign_wsi.zeroshot.alignment import fuse_encoders

    fine = np.array([[2.0, 0.0], [4.0, 0.0]], np.float32)
    coarse = np.array([[10.0, 0.0]], np.float32)
    out = add_parent_context(fine, [(np.array([0, -1], np.int32), coarse)], 0.5)
    np.testing.assert_allclose(out[:, 0], [6.0, 4.0])  # one parent is enough for context
    a, b = np.ones((1, 2), np.float32), np.full((1, 2), 5.0, np.float32)
    np.testing.assert_allclose(fuse_encoders({"a": a, "b": b}, {"a": 3.0}), [[2.0, 2.0]])  # (3 + 5) / 4
    with pytest.raises(ValueError, match="sum to zero"):
        fuse_encoders({"a": a}, {"a": 0.0})


def test_alignment_spec_carries_every_setting_to_the_logits() -> None:
    spec = AlignmentSpec.from_config(
        _cfg(alignment={"rule": "lse", "temperature": 1.0, "topk": 0.5}, encoder_weights={"demo": 2.0})
    )
    assert (spec.rule, spec.temperature, spec.topk, dict(spec.encoder_weights)) == (
        "lse",
        1.0,
        0.5,
        {"demo": 2.0},
    )
    conch = AlignmentSpec.from_config(_cfg(protocol="conch", alignment={"rule": "mean"}))
    assert conch.rule == "centroid"
    t = _axes_text(scale=10.0)
    text = TextEmbeddings("b", "h", ("c0", "c1"), {}, "histoalign", {"e": t})
    x = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    for rule, kw in (("lse", {"temperature": 1.0}), ("topk", {"topk": 0.5})):
        got = fused_logits({"e": x}, text, AlignmentSpec(rule=rule, **kw))  # type: ignore[arg-type]
        np.testing.assert_allclose(got, class_logits(x, t, 2, rule=rule, **kw), rtol=1e-6)


def test_slide_weighted_offsets_count_one_tile_slides_and_skip_empty_ones(tmp_path: Path) -> None:
    """Slide A has one tile per scale, B eight, C none at 1.0 µm/px, and no slide has a
    tile at 2.0: slide weighting is the mean of the per-slide means of the slides that
    have tiles (A's single tile counts as much as B's eight; C is skipped, not a zero or a
    NaN), and a scale without any tile gets zero offsets for every class."""
    from histoalign_wsi.zeroshot.calibration import cohort_offsets

    text = make_text()
    d = text.encoders["demo"].emb.shape[1]
    sizes = {"A": (1, 1), "B": (8, 8), "C": (5, 0)}
    paths = []
    for i, (sid, (n05, n10)) in enumerate(sizes.items()):
        feats = {
            0.5: planted_features(text, n05, {i: (1.0, 1.0)}, seed=i),
            1.0: planted_features(text, n10, {i: (1.0, 1.0)}, seed=10 + i)
            if n10
            else np.zeros((0, d), np.float32),
            2.0: np.zeros((0, d), np.float32),
        }
        paths.append(build_store(tmp_path / f"{sid}.zarr", feats, slide_id=sid))
    cfg = _cfg(pooling={"parent_context": 0.0})
    off = cohort_offsets(paths, text, cfg)
    tables = [score_store(open_store(p), text, cfg).tiles.table for p in paths]
    cols = [c for c in tables[0].columns if c.startswith("logit_")]
    for s in ("0.50mpp", "1.00mpp"):
        means = [
            t.loc[t["scale"] == s, cols].to_numpy().mean(axis=0) for t in tables if (t["scale"] == s).any()
        ]
        assert len(means) == (3 if s == "0.50mpp" else 2)
        np.testing.assert_allclose(off.offset(s), np.mean(means, axis=0), atol=1e-3)
    assert off.offset("2.00mpp").tolist() == [0.0] * len(text.classes)
    (tmp_path / "bad.json").write_text("[1, 2]")
    from histoalign_wsi.errors import StoreError

    with pytest.raises(StoreError, match=r"calibration '.*bad\.json' is not a"):
        CalibrationOffsets.read(tmp_path / "bad.json")


def test_offsets_record_the_encoder_weights_and_name_the_scales_they_have(tmp_path: Path) -> None:
    from histoalign_wsi.errors import StoreError
    from histoalign_wsi.zeroshot.calibration import cohort_offsets

    text = make_text()
    p = build_store(tmp_path / "s.zarr", {m: planted_features(text, 8, {}, seed=3) for m in (0.5, 1.0, 2.0)})
    off = cohort_offsets([p], text, _cfg(encoder_weights={"demo": 2.0}))
    assert off.encoder_weights == {"demo": 2.0}
    assert off.offset("0.50mpp").dtype == np.float32  # subtracted from float32 logits: no upcast
    off.check(text, AlignmentSpec.from_config(_cfg(encoder_weights={"demo": 2.0})))  # accepted
    with pytest.raises(
        StoreError, match=r"has no offsets for scale 4\.00mpp \(it has 0\.50mpp, 1\.00mpp, 2\.00mpp\)"
    ):
        off.offset("4.00mpp")
    empty = CalibrationOffsets(
        off.bag_hash, off.classes, off.rule, off.encoders, off.encoder_weights, "slide", 0, {}
    )
    with pytest.raises(StoreError, match=r"\(it has none\)"):
        empty.offset("0.50mpp")


def test_fused_logits_compute_in_float32_from_float16_stores() -> None:
    """Stores hold float16 features: the logits are computed (and returned) in float32,
    as from the same features in float32, whatever the encoder weights' type."""
    text = make_text()
    rng = np.random.default_rng(4)
    x16 = planted_features(text, 50, {0: (0.5, 1.0)}, seed=4).astype(np.float16)
    spec = AlignmentSpec(rule="lse", temperature=0.5, encoder_weights={"demo": 3})
    got = fused_logits({"demo": x16}, text, spec)
    ref = fused_logits({"demo": x16.astype(np.float32)}, text, spec)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    two = {"demo": x16, "other": rng.normal(size=(50, x16.shape[1])).astype(np.float16)}
    text2 = TextEmbeddings(
        text.bag_name,
        text.bag_hash,
        text.classes,
        text.colors,
        text.protocol,
        {"demo": text.encoders["demo"], "other": text.encoders["demo"]},
    )
    assert (
        fused_logits(two, text2, AlignmentSpec(encoder_weights={"demo": 1, "other": 2})).dtype == np.float32
    )


def test_topk_fraction_on_an_exact_product_and_lse_at_a_cold_temperature() -> None:
    """topk 2/3 of 3 prompts is exactly 2 prompts (not 3); lse at temperature 0.001 on
    rows whose cosines differ by 2 stays finite per row (a shift by the global maximum
    would underflow the other row to log(0))."""
    t = _axes_text()
    x = np.array([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]], np.float32)
    top = class_similarity(x, t, 2, rule="topk", topk=2 / 3)
    np.testing.assert_allclose(
        top[:, 0], [0.5, 0.0], atol=1e-6
    )  # mean of the best 2 of (1, 0, 0) / (-1, 0, 0)
    cold = class_similarity(x, t, 2, rule="lse", temperature=0.001)
    assert np.isfinite(cold).all()
    want_b = 0.001 * np.log(2 / 3)  # row 2: exp(-1000) + 1 + 1, of 3: log-mean-exp at t
    np.testing.assert_allclose(cold[:, 0], [0.001 * np.log(1 / 3) + 1.0, want_b], atol=1e-5)
