"""Zero-shot scoring with planted signals: alignment, MIL and scale-aware pooling,
predictions, metrics and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histoalign_wsi.config import load_config
from histoalign_wsi.errors import ConfigError, PromptBagError, StoreError
from histoalign_wsi.features.store import open_store
from histoalign_wsi.outputs.metrics import classification_metrics
from histoalign_wsi.outputs.predictions import summarize
from histoalign_wsi.zeroshot.alignment import class_similarity
from histoalign_wsi.zeroshot.prediction import load_predictions
from histoalign_wsi.zeroshot.prompts import load_bag, parse_bag
from histoalign_wsi.zeroshot.scoring import score_store, write_scores

from ..planting import build_store, make_text, planted_features

SCALES = {"scales_mpp": [0.5, 1.0, 2.0]}


def _cfg(**kw: object):  # type: ignore[no-untyped-def]
    return load_config(overrides=SCALES | kw)


def _three_scales(text, fine, mid=None, coarse=None, seed=0):  # type: ignore[no-untyped-def]
    n = len(fine)
    rng = np.random.default_rng(seed)
    neutral = lambda m: planted_features(text, m, {}, seed=int(rng.integers(1 << 30)))  # noqa: E731
    return {
        0.5: fine,
        1.0: mid if mid is not None else neutral(n // 4),
        2.0: coarse if coarse is not None else neutral(n // 16),
    }


@pytest.mark.parametrize("method", ["mean", "topk", "max", "soft"])
@pytest.mark.parametrize("label", [0, 1, 2])
def test_label_recovered_at_20_percent(tmp_path: Path, method: str, label: int) -> None:
    text = make_text()
    fine = planted_features(text, 400, {label: (0.2, 1.0)}, seed=label)
    st = open_store(build_store(tmp_path / "s.zarr", _three_scales(text, fine)))
    pred = score_store(st, text, _cfg(pooling={"method": method, "topk": 0.1})).prediction
    assert pred.predicted_class == text.classes[label]
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_topk_finds_5_percent_tumour_where_mean_fails(tmp_path: Path) -> None:
    text = make_text()
    fine = planted_features(text, 400, {0: (0.05, 1.2), 1: (0.95, 0.25)}, seed=7)
    st = open_store(build_store(tmp_path / "s.zarr", _three_scales(text, fine)))
    w = {"scale_weights": [1, 0, 0]}
    topk = score_store(st, text, _cfg(pooling={"method": "topk", "topk": 0.05} | w)).prediction
    mean = score_store(st, text, _cfg(pooling={"method": "mean"} | w)).prediction
    assert topk.predicted_class == "TUM"
    assert mean.predicted_class == "STR"


def test_coarse_only_class_needs_scale_aware_fusion(tmp_path: Path) -> None:
    text = make_text()
    fine = planted_features(text, 256, {1: (1.0, 0.15)}, seed=1)
    coarse = planted_features(text, 16, {2: (1.0, 1.5)}, seed=2)
    st = open_store(build_store(tmp_path / "s.zarr", _three_scales(text, fine, coarse=coarse)))
    fine_only = score_store(st, text, _cfg(pooling={"method": "mean", "scale_weights": [1, 0, 0]})).prediction
    fused = score_store(st, text, _cfg(pooling={"method": "mean", "scale_weights": [1, 1, 1]})).prediction
    assert fine_only.predicted_class == "STR"
    assert fused.predicted_class == "NORM"
    assert fused.per_scale["2.00mpp"]["n_tiles"] == 16


def test_tile_order_changes_nothing(tmp_path: Path) -> None:
    text = make_text()
    feats = _three_scales(text, planted_features(text, 256, {0: (0.1, 1.0), 1: (0.3, 0.5)}, seed=3))
    perm = {m: f[np.random.default_rng(5).permutation(len(f))] for m, f in feats.items()}
    for method in ("mean", "max", "topk", "soft"):
        cfg = _cfg(pooling={"method": method, "parent_context": 0.0})
        a = score_store(open_store(build_store(tmp_path / f"a{method}.zarr", feats)), text, cfg).prediction
        b = score_store(open_store(build_store(tmp_path / f"b{method}.zarr", perm)), text, cfg).prediction
        assert a.predicted_class == b.predicted_class
        for c in text.classes:
            assert a.probabilities[c] == pytest.approx(b.probabilities[c], abs=1e-5)


def test_zero_tiles_is_no_tissue_not_nan(tmp_path: Path) -> None:
    text = make_text()
    empty = {m: np.zeros((0, 32), np.float32) for m in (0.5, 1.0, 2.0)}
    st = open_store(build_store(tmp_path / "e.zarr", empty))
    scores = score_store(st, text, _cfg())
    assert scores.prediction.status == "no_tissue"
    assert scores.prediction.predicted_class == "no tissue" and scores.prediction.probabilities is None
    write_scores(scores, tmp_path / "p.json", tmp_path / "t.parquet")
    json.loads((tmp_path / "p.json").read_text())  # valid JSON: no NaN
    assert "NaN" not in (tmp_path / "p.json").read_text()
    table = summarize(load_predictions([tmp_path / "p.json"]), tmp_path / "predictions.csv")
    assert table.loc[0, "predicted_class"] == "no tissue"


def test_parent_context_moves_tile_scores_toward_parents(tmp_path: Path) -> None:
    text = make_text()
    fine = planted_features(text, 256, {}, seed=4)
    coarse = planted_features(text, 16, {0: (1.0, 1.5)}, seed=5)
    st = open_store(build_store(tmp_path / "s.zarr", _three_scales(text, fine, coarse=coarse)))
    no = score_store(st, text, _cfg(pooling={"parent_context": 0.0})).tiles.table
    yes = score_store(st, text, _cfg(pooling={"parent_context": 0.5})).tiles.table
    f0, f1 = no[no["scale"] == "0.50mpp"], yes[yes["scale"] == "0.50mpp"]
    assert f1["prob_TUM"].mean() > f0["prob_TUM"].mean() + 0.05


def test_centroid_equals_open_clip_zero_shot_classifier() -> None:
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from histoalign_wsi.features import load_registry
    from histoalign_wsi.features.adapters import load_encoder
    from histoalign_wsi.zeroshot.text import embed_bag

    enc = load_encoder(load_registry()["demo"])
    bag = parse_bag(
        {
            "templates": ["a photo of {}.", "an H&E image of {}.", "{} tissue."],
            "classes": {
                "tumour": {"names": ["tumour"]},
                "stroma": {"names": ["stroma"]},
                "fat": {"names": ["adipose"]},
            },
        },
        name="t",
    )
    text = embed_bag(bag, [enc], protocol="histoalign")  # the bag has no descriptions
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    with torch.no_grad():
        w = build_zero_shot_classifier(
            enc.model,
            tok,
            ["tumour", "stroma", "adipose"],
            list(bag.templates),
            num_classes_per_batch=2,
            device="cpu",
            use_tqdm=False,
        )
    feats = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ours = class_similarity(feats, text.encoders["demo"], 3, rule="centroid")
    np.testing.assert_allclose(ours, feats @ w.numpy(), atol=1e-5)


@pytest.mark.parametrize("rule", ["mean", "lse", "topk"])
def test_other_rules_are_bounded_by_prompt_similarities(rule: str) -> None:
    text = make_text()
    feats = planted_features(text, 50, {0: (0.5, 1.0)}, seed=9)
    t = text.encoders["demo"]
    sims = feats @ t.emb.T
    out = class_similarity(feats, t, 3, rule=rule, temperature=0.05, topk=3)
    for k in range(3):
        s = sims[:, t.cls == k]
        assert (out[:, k] <= s.max(axis=1) + 1e-5).all() and (out[:, k] >= s.min(axis=1) - 1e-5).all()
    assert (
        class_similarity(feats, t, 3, rule="topk", topk=1)
        >= class_similarity(feats, t, 3, rule="mean") - 1e-6
    ).all()


def test_metrics_match_scikit_learn() -> None:
    from sklearn import metrics as skm

    classes = ["a", "b", "c"]
    y = ["a", "a", "b", "b", "c", "c", "a", "c"]
    p = ["a", "b", "b", "b", "c", "a", "a", "c"]
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.3, 0.5, 0.2],
            [0.2, 0.6, 0.2],
            [0.1, 0.8, 0.1],
            [0.1, 0.2, 0.7],
            [0.5, 0.1, 0.4],
            [0.6, 0.3, 0.1],
            [0.2, 0.2, 0.6],
        ]
    )
    m = classification_metrics(y, p, probs, classes)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert m["auc_macro_ovr"] == pytest.approx(
        skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )
    prec = skm.precision_score(y, p, labels=classes, average=None)
    assert [m["per_class"][c]["precision"] for c in classes] == pytest.approx(list(prec))
    assert m["confusion_matrix"]["matrix"] == skm.confusion_matrix(y, p, labels=classes).tolist()


def test_shipped_bags_are_complete() -> None:
    for name, n in [
        ("brca", 3),
        ("nsclc", 2),
        ("rcc", 3),
        ("breast_benign_malignant", 2),
        ("breakhis", 8),
        ("crc", 9),
    ]:
        bag = load_bag(name)
        assert len(bag.classes) == n and len(bag.templates) >= 16
        for c in bag.classes:
            assert len(c.names) >= 3
            if name != "crc" or c.name != "BACK":
                assert all(
                    len(c.descriptions.get(g, ())) >= 3 for g in ("morphology", "cause", "presentation")
                ), c.name


def test_bad_bags_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(PromptBagError, match=r"classes\.B\.names.*no prompts"):
        parse_bag({"templates": ["{}."], "classes": {"A": {"names": ["a"]}, "B": {"names": []}}}, name="x")
    with pytest.raises(PromptBagError, match="template 'an image of tissue' must contain"):
        parse_bag(
            {"templates": ["an image of tissue"], "classes": {"A": {"names": ["a"]}, "B": {"names": ["b"]}}},
            name="x",
        )
    with pytest.raises(PromptBagError, match=r"descriptions\.histology: unknown group"):
        parse_bag(
            {"classes": {"A": {"names": ["a"], "descriptions": {"histology": ["x"]}}, "B": {"names": ["b"]}}},
            name="x",
        )
    with pytest.raises(PromptBagError, match="unknown prompt bag 'nope'"):
        load_bag("nope")


def test_label_sheet_with_unknown_slides_or_classes(tmp_path: Path) -> None:
    text = make_text()
    st = open_store(
        build_store(tmp_path / "s.zarr", _three_scales(text, planted_features(text, 64, {}, seed=1)))
    )
    write_scores(score_store(st, text, _cfg()), tmp_path / "s.json", tmp_path / "s.parquet")
    with pytest.raises(ConfigError, match="not scored: ghost"):
        summarize(
            load_predictions([tmp_path / "s.json"]), tmp_path / "p.csv", labels={"s": "TUM", "ghost": "TUM"}
        )
    with pytest.raises(ConfigError, match="not in the prompt bag: Tumour"):
        summarize(load_predictions([tmp_path / "s.json"]), tmp_path / "p.csv", labels={"s": "Tumour"})
    summarize(
        load_predictions([tmp_path / "s.json"]),
        tmp_path / "p.csv",
        labels={"s": "TUM"},
        metrics_json=tmp_path / "m.json",
        confusion_png=tmp_path / "cm.png",
    )
    assert (
        json.loads((tmp_path / "m.json").read_text())["n"] == 1 and (tmp_path / "cm.png").stat().st_size > 0
    )


def test_mixed_weights_are_refused_naming_both_hashes(tmp_path: Path) -> None:
    text = make_text()
    st = open_store(
        build_store(
            tmp_path / "s.zarr", _three_scales(text, planted_features(text, 64, {}, seed=1)), sha="a" * 64
        )
    )
    with pytest.raises(StoreError, match=f"{'a' * 64}.*{'f' * 64}") as err:
        score_store(st, text, _cfg())
    assert str(tmp_path / "s.zarr") in str(err.value)


def test_store_missing_a_configured_scale(tmp_path: Path) -> None:
    text = make_text()
    st = open_store(build_store(tmp_path / "s.zarr", {0.5: planted_features(text, 64, {}, seed=1)}))
    with pytest.raises(StoreError, match=r"no scale 1\.00mpp"):
        score_store(st, text, _cfg())


def test_cohort_calibration_out_of_core(tmp_path: Path) -> None:
    from histoalign_wsi.zeroshot.alignment import AlignmentSpec
    from histoalign_wsi.zeroshot.calibration import cohort_offsets
    from histoalign_wsi.zeroshot.scoring import tile_logits

    text = make_text()
    # slides of very different sizes: tile weighting and slide weighting must differ
    paths = [
        build_store(
            tmp_path / f"s{i}.zarr",
            _three_scales(text, planted_features(text, n, {i: (0.3, 1.0)}, seed=i)),
        )
        for i, n in enumerate((1024, 128, 64))
    ]
    per_slide = [
        tile_logits(open_store(p), "0.50mpp", text, AlignmentSpec.from_config(_cfg())) for p in paths
    ]
    by_tile = np.concatenate(per_slide).mean(axis=0)
    by_slide = np.mean([lg.mean(axis=0) for lg in per_slide], axis=0)
    assert np.abs(by_tile - by_slide).max() > 0.5  # the planted sizes make the two visible
    off_tile = cohort_offsets(paths, text, _cfg(calibration_weighting="tile"))
    np.testing.assert_allclose(off_tile.offset("0.50mpp"), by_tile, rtol=1e-4, atol=1e-4)
    off = cohort_offsets(paths, text, _cfg())
    assert off.weighting == "slide" and off.n_slides == 3
    np.testing.assert_allclose(off.offset("0.50mpp"), by_slide, rtol=1e-4, atol=1e-4)
    pred = score_store(open_store(paths[0]), text, _cfg(), calibration=off).prediction
    assert pred.calibrated and sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_protocol_of_text_and_config_must_match(tmp_path: Path) -> None:
    text = make_text()
    st = open_store(
        build_store(tmp_path / "s.zarr", _three_scales(text, planted_features(text, 64, {}, seed=1)))
    )
    with pytest.raises(StoreError, match="protocol 'histoalign' but scoring uses 'conch'"):
        score_store(st, text, _cfg(protocol="conch"))


def test_conch_protocol_is_one_scale_centroid_and_topj(tmp_path: Path) -> None:
    import dataclasses

    text = dataclasses.replace(make_text(), protocol="conch")
    # at the chosen scale a 2 % NORM focus in STR; at the other scales, only TUM
    fine = planted_features(text, 400, {2: (0.02, 1.5), 1: (0.98, 0.25)}, seed=11)
    tum = planted_features(text, 100, {0: (1.0, 1.5)}, seed=12)
    st = open_store(build_store(tmp_path / "s.zarr", _three_scales(text, fine, mid=tum, coarse=tum[:25])))
    cfg = _cfg(alignment={"rule": "mean"}, protocol="conch", conch={"topj": 5})
    pred = score_store(st, text, cfg).prediction
    assert pred.alignment == {"protocol": "conch", "rule": "centroid"}
    assert pred.pooling == {"method": "topk", "topj": 5, "scale_mpp": 0.5} and pred.calibrated is False
    assert list(pred.per_scale) == ["0.50mpp"] and pred.predicted_class == "NORM"
    topj = pred.extra["topj"]
    assert sorted(topj, key=int) == ["1", "5", "10", "50", "100"]
    assert topj["5"]["predicted_class"] == "NORM" and topj["100"]["predicted_class"] == "STR"
    # the configured j is the prediction
    assert pred.probabilities == topj["5"]["probabilities"]
    big_j = score_store(st, text, _cfg(protocol="conch", conch={"topj": 100})).prediction
    assert big_j.predicted_class == "STR"


def test_conch_protocol_configuration_is_checked() -> None:
    with pytest.raises(ConfigError, match="exactly one encoder"):
        _cfg(protocol="conch", encoders=["demo", "plip"])
    with pytest.raises(ConfigError, match="no calibration"):
        _cfg(protocol="conch", calibration=True)
    with pytest.raises(ConfigError, match=r"conch.scale_mpp: 0.25 is not one of scales_mpp"):
        _cfg(protocol="conch", conch={"scale_mpp": 0.25})


def test_conch_prompts_are_the_published_templates_and_names() -> None:
    from histoalign_wsi.zeroshot.prompts import conch_templates

    tm = conch_templates()
    assert len(tm) == 22 and len(set(tm)) == 22 and "{}, H&E stain." in tm
    bag = load_bag("nsclc")
    texts, cls, groups = bag.texts(protocol="conch")
    assert sorted(set(cls)) == [0, 1]
    assert len(texts) == 2 * 4 * 22 and set(groups) == {"name"}
    assert "a photomicrograph showing lung adenocarcinoma." in texts
    assert "squamous cell carcinoma of the lung, H&E." in texts
    rcc = load_bag("rcc")
    for c in rcc.classes:
        assert len(c.conch_names) == 4, c.name
    richer, _, g = bag.texts()
    assert {"morphology", "cause", "presentation"} <= set(g) and len(richer) != len(texts)


def test_conch_scale_summary_and_a_slide_without_tiles_at_the_conch_scale(tmp_path: Path) -> None:
    import dataclasses

    import zarr

    from histoalign_wsi.zeroshot.pooling import softmax

    text = dataclasses.replace(make_text(), protocol="conch")
    fine = planted_features(text, 40, {1: (1.0, 1.5)}, seed=21)
    st = open_store(build_store(tmp_path / "s.zarr", _three_scales(text, fine)))
    pred = score_store(st, text, _cfg(protocol="conch", conch={"topj": 5})).prediction
    summ = pred.per_scale["0.50mpp"]
    assert summ["n_tiles"] == 40 and pred.predicted_class == "STR"
    pooled = np.array(list(summ["pooled_logits"].values()), np.float32)
    np.testing.assert_allclose(list(summ["probabilities"].values()), softmax(pooled[None])[0], rtol=1e-5)
    assert summ["probabilities"] == pred.probabilities  # the chosen j's probabilities
    # no tile at the conch scale (the coarser ones have some): no prediction, no crash
    d = text.encoders["demo"].emb.shape[1]
    empty = _three_scales(text, np.zeros((0, d), np.float32), mid=fine[:8], coarse=fine[:2])
    st0 = open_store(build_store(tmp_path / "e.zarr", empty))
    p0 = score_store(st0, text, _cfg(protocol="conch")).prediction
    assert p0.probabilities is None and p0.status == "no_tissue"
    assert all(v["probabilities"] is None and v["predicted_class"] is None for v in p0.extra["topj"].values())
    # a slide smaller than one finest tile (448 px at level 0) is "no_tiles"; one that fits one is not
    for side, status in ((447, "no_tiles"), (448, "no_tissue")):
        path = build_store(
            tmp_path / f"small{side}.zarr", {m: np.zeros((0, d), np.float32) for m in (0.5, 1.0, 2.0)}
        )
        root = zarr.open_group(path, mode="r+")
        root.attrs["slide"] = dict(root.attrs["slide"]) | {"level0_dims": [side, 5000]}
        assert score_store(open_store(path), text, _cfg(protocol="conch")).prediction.status == status


def test_region_areas_and_top_tiles_at_the_finest_scale(tmp_path: Path) -> None:
    """30 STR and 10 TUM tiles at 0.5 µm/px (448 level-0 px at 0.25 µm/px: 0.112 mm a
    side); the coarser scales hold neutral tiles. Areas count the finest scale's argmax
    tiles; the top tiles are the finest scale's most STR-like ones, best first."""
    text = make_text(scale=5.0)  # a low logit scale: probabilities stay below 1
    fine = planted_features(text, 40, {1: (0.75, 2.0), 0: (0.25, 2.0)}, seed=31)
    st = open_store(build_store(tmp_path / "s.zarr", _three_scales(text, fine)))
    res = score_store(st, text, _cfg(pooling={"method": "mean", "top_tiles": 5}))
    pred = res.prediction
    assert pred.predicted_class == "STR"
    tile_mm2 = (448 * 0.25 / 1000) ** 2
    areas = pred.extra["region_area_mm2"]
    assert areas == pytest.approx({"STR": 30 * tile_mm2, "TUM": 10 * tile_mm2})
    top = pred.top_tiles
    assert len(top) == 5 and all(set(t) == {"scale", "x", "y", "size0", "probability"} for t in top)
    assert {t["scale"] for t in top} == {"0.50mpp"} and {t["size0"] for t in top} == {448}
    fine_coords = {tuple(c) for c in st.scale("0.50mpp").coords[:30].tolist()}  # the STR tiles
    assert all((t["x"], t["y"]) in fine_coords for t in top)
    table = res.tiles.table
    str_probs = np.sort(table.loc[table["scale"] == "0.50mpp", "prob_STR"].to_numpy())[::-1][:5]
    np.testing.assert_allclose([t["probability"] for t in top], str_probs, rtol=1e-6)
    assert str_probs.max() < 0.999


def test_prediction_records_status_encoders_and_slide(tmp_path: Path) -> None:
    import zarr

    from histoalign_wsi.zeroshot.scoring import NO_TILES, NO_TISSUE

    text = make_text()
    fine = planted_features(text, 16, {0: (1.0, 2.0)}, seed=41)
    st = open_store(build_store(tmp_path / "s.zarr", _three_scales(text, fine), slide_id="Fall 1"))
    pred = score_store(st, text, _cfg(encoder_weights={"demo": 2.0})).prediction
    assert pred.status == "ok" and pred.slide_path == "Fall 1.svs"
    assert pred.encoders == [{"name": "demo", "weights_sha256": "f" * 64, "untrained": False, "weight": 2.0}]
    assert set(pred.extra["region_area_mm2"]) == {"TUM"}
    assert pred.prompt_bag == {"name": text.bag_name, "hash": text.bag_hash} and pred.untrained is False
    # features from the untrained demo encoder mark every prediction untrained
    zarr.open_group(tmp_path / "s.zarr", mode="r+").attrs["untrained"] = True
    assert score_store(open_store(tmp_path / "s.zarr"), text, _cfg()).prediction.untrained is True
    d = fine.shape[1]
    for side, status, label in ((300, "no_tiles", NO_TILES), (5000, "no_tissue", NO_TISSUE)):
        path = build_store(
            tmp_path / f"e{side}.zarr", {m: np.zeros((0, d), np.float32) for m in (0.5, 1.0, 2.0)}
        )
        root = zarr.open_group(path, mode="r+")
        root.attrs["slide"] = dict(root.attrs["slide"]) | {"level0_dims": [side, side]}
        p = score_store(open_store(path), text, _cfg()).prediction
        assert (p.status, p.predicted_class, p.probabilities, p.top_tiles) == (status, label, None, [])
    assert NO_TILES != NO_TISSUE


def test_prediction_records_the_settings_it_was_scored_with(tmp_path: Path) -> None:
    """The prediction JSON says how it was made: alignment rule, pooling settings, scale
    and encoder weights (1.0 each when not configured), and per-scale pooled logits that
    are the pooled tile logits of that scale; an empty scale says so with the same keys."""
    from histoalign_wsi.zeroshot.alignment import AlignmentSpec
    from histoalign_wsi.zeroshot.pooling import pool
    from histoalign_wsi.zeroshot.scoring import tile_logits

    text = make_text()
    fine = planted_features(text, 32, {1: (1.0, 2.0)}, seed=43)
    cfg = _cfg(pooling={"method": "topk", "topk": 0.25, "parent_context": 0.3})
    st = open_store(build_store(tmp_path / "s.zarr", _three_scales(text, fine), slide_id="Fall 2"))
    scores = score_store(st, text, cfg)
    pred = scores.prediction
    assert pred.alignment == {"protocol": "histoalign", "rule": cfg.alignment.rule}
    assert pred.pooling == {
        "method": "topk",
        "topk": 0.25,
        "soft_temperature": cfg.pooling.soft_temperature,
        "scale_weights": {"0.50mpp": 1.0, "1.00mpp": 1.0, "2.00mpp": 1.0},
        "parent_context": 0.3,
    }
    assert [e["weight"] for e in pred.encoders] == [1.0]
    assert scores.tiles.slide_id == "Fall 2"
    spec = AlignmentSpec.from_config(cfg)
    for s in ("0.50mpp", "1.00mpp", "2.00mpp"):
        want = pool(tile_logits(st, s, text, spec), method="topk", k=0.25, temperature=1.0)
        got = pred.per_scale[s]["pooled_logits"]
        assert got is not None and np.allclose([got[c] for c in text.classes], want, atol=1e-5), s
    # a slide whose coarsest scale kept no tiles
    d = fine.shape[1]
    scales = _three_scales(text, fine) | {2.0: np.zeros((0, d), np.float32)}
    st2 = open_store(build_store(tmp_path / "e.zarr", scales))
    empty = score_store(st2, text, _cfg()).prediction.per_scale["2.00mpp"]
    assert empty == {"n_tiles": 0, "pooled_logits": None, "probabilities": None}
    # the tile table keeps float32 numbers (the parquet schema users read)
    table = scores.tiles.table
    assert {str(table[c].dtype) for c in table.columns if c.startswith(("prob", "logit"))} == {"float32"}
    assert table["tissue_fraction"].dtype == np.float32
    # one tile at the finest scale: top tiles and region areas still come from that scale
    one = _three_scales(text, fine[:1], mid=fine[:2], coarse=fine[:1])
    p1 = score_store(open_store(build_store(tmp_path / "one.zarr", one)), text, _cfg()).prediction
    assert [t["scale"] for t in p1.top_tiles] == ["0.50mpp"]
    assert sum(p1.extra["region_area_mm2"].values()) == pytest.approx(
        (st.scale("0.50mpp").size0 * float(st.attrs["slide"]["mpp"]) / 1000) ** 2
    )


def test_errors_name_the_store_and_the_scales_it_has(tmp_path: Path) -> None:
    text = make_text()
    fine = planted_features(text, 16, {0: (1.0, 2.0)}, seed=44)
    path = build_store(tmp_path / "Fall 3.zarr", _three_scales(text, fine))
    with pytest.raises(StoreError) as err:
        score_store(open_store(path), text, _cfg(scales_mpp=[0.5, 1.0, 4.0]))
    msg = str(err.value)
    assert str(path) in msg and "no scale 4.00mpp" in msg and "(it has 0.50mpp, 1.00mpp, 2.00mpp)" in msg


#: CONCH's CRC-100K class names as published (mahmoodlab/CONCH,
#: prompts/crc100k_prompts_all_per_class.json), copied here to check the bag against
CONCH_CRC100K = {
    "ADI": ["adipose", "adipose tissue", "adipocytes", "fat", "fat cells"],
    "BACK": ["background", "penmarking", "empty space", "background artifacts"],
    "DEB": ["debris", "colorectal adenocarcinoma debris and necrosis", "necrosis", "necrotic debris"],
    "LYM": ["lymphocytes", "lymphoid aggregate", "immune cells", "lymphoid infiltrate", "inflammatory cells"],
    "MUC": ["mucus", "mucin", "mucus pool", "mucin pool"],
    "MUS": ["smooth muscle", "smooth muscle tissue", "muscle", "muscularis propria", "muscularis mucosa"],
    "NORM": ["normal colon mucosa", "uninvolved colon mucosa", "normal colonic mucosa", "benign epithelium"],
    "STR": [
        "cancer-associated stroma",
        "tumor-associated stroma",
        "stromal cells",
        "stromal tissue",
        "stroma",
    ],
    "TUM": [
        "colorectal adenocarcinoma epithelium",
        "colorectal adenocarcinoma",
        "tumor",
        "adenocarcinoma",
        "malignant epithelium",
    ],
}


def test_the_crc_bag_carries_conchs_published_class_names() -> None:
    bag = load_bag("crc")
    assert {c.name: list(c.conch_names) for c in bag.classes} == CONCH_CRC100K
    texts, _, _ = bag.texts(protocol="conch")
    assert len(texts) == 22 * sum(map(len, CONCH_CRC100K.values()))
    assert "a photomicrograph showing penmarking." in texts


def test_the_conch_protocol_uses_conch_names_and_nothing_else(tmp_path: Path) -> None:
    """Names and conch_names disjoint: each protocol's prompts hold only its own list."""
    p = tmp_path / "b.yaml"
    p.write_text(
        "classes:\n"
        "  A: {names: [alpha tissue], conch_names: [conch a one, conch a two]}\n"
        "  B: {names: [beta tissue], conch_names: [conch b]}\n"
    )
    bag = load_bag(str(p))
    conch, cls, _ = bag.texts(protocol="conch")
    assert all("conch" in t for t in conch) and not any("alpha" in t or "beta" in t for t in conch)
    assert [int(k) for k in cls].count(0) == 2 * 22 and [int(k) for k in cls].count(1) == 22
    ours, _, _ = bag.texts()
    assert not any("conch" in t for t in ours) and any("alpha tissue" in t for t in ours)
