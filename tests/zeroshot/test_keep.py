"""KEEP's slide protocol, part by part, against independent computations on planted
stores, and the "other tissue" classes of any protocol."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest

from histoalign_wsi.config import load_config
from histoalign_wsi.errors import PromptBagError, StoreError
from histoalign_wsi.features.store import open_store
from histoalign_wsi.zeroshot.keep import Screening, classifier, prompt_sets, rank_score, screen, smooth, vote
from histoalign_wsi.zeroshot.prompts import parse_bag
from histoalign_wsi.zeroshot.scoring import score_store
from tests.planting import build_store, class_vector, make_text, unit

CLASSES = ("IDC", "ILC", "normal")


def _text(protocol: str = "keep"):  # type: ignore[no-untyped-def]
    t = make_text(CLASSES, per_class=3)
    return dataclasses.replace(t, protocol=protocol, other=("normal",))


def _cfg(**keep: object):  # type: ignore[no-untyped-def]
    return load_config(
        overrides={
            "encoders": ["demo"],
            "scales_mpp": [0.5],
            "protocol": "keep",
            "keep": {"screening": False} | keep,
        }
    )


def _store(tmp: Path, text, layout: list[int], name: str = "s") -> Path:  # type: ignore[no-untyped-def]
    """One row of tiles (x = 448 i); tile i near class ``layout[i]``'s prompts."""
    rng = np.random.default_rng(len(layout))
    x = np.stack([class_vector(text, k) + 0.05 * rng.normal(size=32) for k in layout])
    return build_store(tmp / f"{name}.zarr", {0.5: unit(x)}, slide_id=name)


def test_prompt_sets_are_every_combination_or_a_seeded_draw() -> None:
    cls = np.array([0, 0, 1, 1, 1, 2], np.int32)
    every = prompt_sets(cls, [0, 1, 2], max_sets=100, seed=0)
    assert every == [list(c) for c in itertools.product([0, 1], [2, 3, 4], [5])]
    some = prompt_sets(cls, [0, 1, 2], max_sets=4, seed=3)
    assert len(some) == 4 and len({tuple(s) for s in some}) == 4 and all(s in every for s in some)
    assert some == prompt_sets(cls, [0, 1, 2], max_sets=4, seed=3)
    assert prompt_sets(cls, [0, 1], max_sets=100, seed=0) == [
        list(c) for c in itertools.product([0, 1], [2, 3, 4])
    ]


def test_rank_score_is_keeps_formula() -> None:
    rng = np.random.default_rng(0)
    logits = rng.uniform(-0.2, 0.6, size=(50, 4, 3))
    want = []
    for j in range(4):  # KEEP's rank_cls_score, one classifier at a time
        lg = logits[:, j, :]
        first = lg.max(axis=1)
        second = np.sort(lg, axis=1)[:, -2]
        want.append(((first - second) - np.abs(first + second - 1)).mean())
    np.testing.assert_allclose(rank_score(logits), want, atol=1e-12)


def test_screening_prefers_the_set_that_separates_the_tiles(tmp_path: Path) -> None:
    text = _text()
    t = text.encoders["demo"]
    feats = [unit(np.stack([class_vector(text, k) for k in (0, 0, 1, 2)]))]
    emb = t.emb.copy()
    emb[1] = unit(emb[0] + emb[3])  # prompt 1 of IDC is half ILC: a confused prompt
    sets = prompt_sets(t.cls, [0, 1, 2], max_sets=1000, seed=0)
    scores, top = screen(feats, emb, sets, top_n=3)
    assert all(1 not in sets[j] for j in top)  # the confused prompt is screened out
    assert max(scores[j] for j in range(len(sets)) if 1 in sets[j]) < min(scores[j] for j in top)
    c = classifier(emb, [sets[j] for j in top])
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-6)


def test_smoothing_averages_the_up_left_window() -> None:
    coords = np.array([[x * 10, y * 10] for y in range(3) for x in range(3)], np.int32)
    logits = np.arange(27, dtype=np.float32).reshape(9, 3)
    got = smooth(logits, coords, 10)
    grid = logits.reshape(3, 3, 3)
    for y, x in itertools.product(range(3), range(3)):
        window = [grid[yy, xx] for yy in (y - 1, y) for xx in (x - 1, x) if yy >= 0 and xx >= 0]
        np.testing.assert_allclose(got[y * 3 + x], np.mean(window, axis=0))


def test_the_vote_leaves_other_tissue_out_of_the_slide_decision() -> None:
    decisions = np.array([2] * 6 + [0] * 3 + [1] * 1)  # mostly normal
    best, share = vote(decisions, 3, [0, 1])
    assert best == 0 and share.tolist() == [0.3, 0.1]
    # the other class first in the bag: the decision classes are 1 and 2
    best, share = vote(np.array([0] * 6 + [2] * 3 + [1] * 1), 3, [1, 2])
    assert best == 1 and share.tolist() == [0.1, 0.3]


def test_keep_scores_a_planted_slide_part_by_part(tmp_path: Path) -> None:
    text = _text()
    # 20 tiles: 10 normal, 6 ILC, 4 IDC, and one IDC tile alone between ILC tiles
    layout = [2] * 10 + [1, 1, 1, 0, 1, 1, 1] + [0, 0, 0]
    p = _store(tmp_path, text, layout)
    sc = score_store(open_store(p), text, _cfg(smoothing=False))
    assert sc.prediction.classes == ("IDC", "ILC") and sc.prediction.predicted_class == "ILC"
    assert sc.prediction.probabilities == pytest.approx({"IDC": 4 / 10, "ILC": 6 / 10})
    assert list(sc.tiles.classes) == list(CLASSES)  # the tiles keep the normal class
    # smoothing, on two rows of 64 tiles: a lone IDC tile (row 1, x = 15) inside ILC takes
    # ILC from its up, left and up-left neighbours; a tile inside IDC stays IDC
    row = [2] * 10 + [1] * 11 + [0] * 10 + [2] * 33
    grid = row + row[:15] + [0] + row[16:]
    g = _store(tmp_path, text, grid, name="grid")

    def tiles(**kw: bool) -> np.ndarray:
        t = score_store(open_store(g), text, _cfg(**kw)).tiles.table
        return t[[c for c in t.columns if c.startswith("prob_")]].to_numpy().argmax(axis=1)

    assert tiles(smoothing=False)[64 + 15] == 0 and tiles(smoothing=True)[64 + 15] == 1
    assert tiles(smoothing=True)[64 + 25] == 0
    # without the normal class, normal tiles are forced into IDC or ILC
    forced = score_store(open_store(p), text, _cfg(smoothing=False, other_classes=False)).prediction
    assert sum(forced.probabilities.values()) == pytest.approx(1.0)
    assert forced.probabilities != sc.prediction.probabilities
    mean = score_store(open_store(p), text, _cfg(smoothing=False, vote=False)).prediction
    assert mean.pooling["method"] == "mean_probability" and mean.predicted_class == "ILC"


def test_keep_with_screening_needs_its_file_and_checks_it(tmp_path: Path) -> None:
    text = _text()
    p = _store(tmp_path, text, [0, 0, 1, 2])
    with pytest.raises(StoreError, match="needs the screened prompt sets"):
        score_store(open_store(p), text, _cfg(screening=True))
    t = text.encoders["demo"]
    sets = prompt_sets(t.cls, [0, 1, 2], max_sets=1000, seed=0)
    scr = Screening(text.bag_hash, "demo", t.weights_sha256, CLASSES, sets, [0.0] * len(sets), [0, 1], 1)
    scr.write(tmp_path / "s.json")
    got = score_store(
        open_store(p), text, _cfg(screening=True), screening=Screening.read(tmp_path / "s.json")
    )
    assert got.prediction.alignment["prompt_sets"] == 2
    other = dataclasses.replace(scr, weights_sha256="0" * 64)
    with pytest.raises(StoreError, match="re-run 'screen-prompts'"):
        score_store(open_store(p), text, _cfg(screening=True), screening=other)


def test_other_classes_in_the_histoalign_protocol(tmp_path: Path) -> None:
    text = _text("histoalign")
    p = _store(tmp_path, text, [2] * 8 + [1] * 2)
    cfg = load_config(overrides={"encoders": ["demo"], "scales_mpp": [0.5]})
    pred = score_store(open_store(p), text, cfg).prediction
    assert pred.classes == ("IDC", "ILC") and pred.predicted_class == "ILC"
    assert set(pred.colors) == set(CLASSES) and sum(pred.probabilities.values()) == pytest.approx(1.0)
    assert pred.extra["other_classes"] == ["normal"]


def test_a_bag_declares_other_tissue() -> None:
    raw = {
        "templates": ["{}"],
        "classes": {"a": {"names": ["a"]}, "b": {"names": ["b"]}, "n": {"names": ["n"], "other": True}},
    }
    bag = parse_bag(raw, name="x")
    assert bag.decision_classes == ["a", "b"] and bag.other_classes == ("n",)
    plain = parse_bag(
        {**raw, "classes": {k: {"names": v["names"]} for k, v in raw["classes"].items()}}, name="x"
    )
    assert plain.content_hash != bag.content_hash
    with pytest.raises(PromptBagError, match="two classes it can be predicted as"):
        parse_bag({**raw, "classes": {**raw["classes"], "b": {"names": ["b"], "other": True}}}, name="x")
    with pytest.raises(PromptBagError, match="other must be true or false"):
        parse_bag({**raw, "classes": {**raw["classes"], "n": {"names": ["n"], "other": "yes"}}}, name="x")
    keep_texts, cls, _ = bag.texts(protocol="keep")
    assert keep_texts == ["a.", "b.", "n."] and cls == [0, 1, 2]
