"""Classification metrics over the classes present, slides without tiles as failures, and
segmentation scored on the argmax map with false positives counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from histoalign_wsi.outputs.metrics import classification_metrics
from histoalign_wsi.outputs.predictions import summarize
from histoalign_wsi.outputs.segmentation import evaluate_segmentation
from histoalign_wsi.zeroshot.tile_scores import TileScores

from ..planting import make_prediction, planted_table

EIGHT = ["A", "B", "C", "D", "E", "F", "G", "H"]


def _three_of_eight() -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    y = ["A"] * 6 + ["C"] * 5 + ["F"] * 4
    p = ["A", "A", "A", "A", "C", "F", "C", "C", "C", "A", "C", "F", "F", "A", "F"]
    probs = np.zeros((len(y), 8))
    for i, c in enumerate(p):  # probability only on the three present classes, max at the prediction
        k = [0, 2, 5]
        w = rng.uniform(0.05, 0.3, size=3)
        w[k.index(EIGHT.index(c))] = 1.0
        probs[i, k] = w / w.sum()
    return y, p, probs


def test_eight_class_bag_with_three_classes_present() -> None:
    y, p, probs = _three_of_eight()
    m = classification_metrics(y, p, probs, EIGHT)
    assert m["classes_present"] == ["A", "C", "F"] and m["classes_absent"] == ["B", "D", "E", "G", "H"]
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))  # sklearn's default
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, p, average="weighted"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    present = probs[:, [0, 2, 5]]
    assert m["auc_macro_ovr"] == pytest.approx(
        skm.roc_auc_score(y, present, multi_class="ovr", labels=["A", "C", "F"])
    )
    assert m["auc_macro_ovo"] == pytest.approx(
        skm.roc_auc_score(y, present, multi_class="ovo", labels=["A", "C", "F"])
    )
    # an absent class counted as F1 = 0 would give 3/8 of the present macro-F1
    assert m["macro_f1"] > 0.6
    assert m["per_class"]["B"]["support"] == 0 and m["per_class"]["B"]["auc_ovr"] is None


def test_ovo_differs_from_ovr_where_it_should() -> None:
    rng = np.random.default_rng(3)
    y = list(rng.choice(["a", "b", "c"], size=30))
    probs = rng.dirichlet([1, 1, 1], size=30)
    p = [["a", "b", "c"][k] for k in probs.argmax(axis=1)]
    m = classification_metrics(y, p, probs, ["a", "b", "c"])
    assert m["auc_macro_ovo"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovo"))
    assert m["auc_macro_ovr"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert abs(m["auc_macro_ovo"] - m["auc_macro_ovr"]) > 1e-3


def test_no_labelled_slide_gives_empty_metrics_not_a_crash() -> None:
    m = classification_metrics([], [], np.zeros((0, 3)), ["a", "b", "c"])
    assert m["n"] == 0 and m["accuracy"] is None and "no labelled slide" in m["note"]


def test_slides_without_tiles_count_as_failures(tmp_path: Path) -> None:
    classes = ["TUM", "STR"]
    colors = {"TUM": (200, 0, 0), "STR": (0, 0, 200)}
    preds = [
        make_prediction("a", classes, colors, predicted_class="TUM", probabilities={"TUM": 0.9, "STR": 0.1}),
        make_prediction("b", classes, colors, predicted_class="STR", probabilities={"TUM": 0.2, "STR": 0.8}),
        make_prediction(
            "c", classes, colors, status="no_tissue", predicted_class="no tissue", probabilities=None
        ),
    ]
    labels = {"a": "TUM", "b": "STR", "c": "TUM"}
    table = summarize(preds, tmp_path / "p.csv", labels=labels, metrics_json=tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
    assert m["n_without_tiles"] == 1 and m["slides_without_tiles"] == ["c"]
    assert m["confusion_matrix"]["labels"] == ["TUM", "STR", "no tissue"]
    assert m["confusion_matrix"]["matrix"][0] == [1, 0, 1]
    assert np.isnan(table.loc[table["slide_id"] == "c", "prob_TUM"]).all()


def _seg_case(tmp_path: Path) -> tuple[TileScores, Path]:
    """A 4 x 1 row of tiles: truth TUM on the left half, STR on the right; the tiles say
    TUM (0.45 / 0.35 / 0.2), TUM, STR, and LYM (absent from the truth) on the last."""
    classes = ["TUM", "STR", "LYM"]
    coords = np.array([[0, 0], [100, 0], [200, 0], [300, 0]], np.int32)
    probs = np.array([[0.45, 0.35, 0.2], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.3, 0.6]])
    ts = TileScores("s", tuple(classes), planted_table("0.50mpp", 0.5, coords, 100, probs, classes))
    tum = np.zeros((1, 4), np.uint8)
    tum[0, :2] = 255
    Image.fromarray(tum).save(tmp_path / "TUM.png")
    Image.fromarray(255 - tum).save(tmp_path / "STR.png")
    (tmp_path / "masks.json").write_text(
        json.dumps({"level0_px_per_mask_px": 100, "masks": {"TUM": "TUM.png", "STR": "STR.png"}})
    )
    return ts, tmp_path / "masks.json"


def test_segmentation_scores_the_argmax_map_and_counts_false_positives(tmp_path: Path) -> None:
    ts, truth = _seg_case(tmp_path)
    res = evaluate_segmentation(ts, truth)
    pc = res["per_class"]
    assert res["mode"] == "argmax"
    assert pc["TUM"]["dice"] == pytest.approx(1.0)  # both left tiles, the first by argmax below 0.5
    assert pc["STR"]["dice"] == pytest.approx(2 * 1 / (1 + 2))  # one of two truth pixels
    assert pc["LYM"]["dice"] == 0.0 and pc["LYM"]["in_truth"] is False  # a false-positive region costs
    assert res["dice_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert res["dice_micro"] == pytest.approx(2 * (2 + 1) / ((2 + 2) + (1 + 2) + (1 + 0)))
    thr = evaluate_segmentation(ts, truth, mode="threshold", threshold=0.5)
    # with p >= 0.5 the first tile lands in no class at all
    assert thr["per_class"]["TUM"]["dice"] == pytest.approx(2 * 1 / (1 + 2))


def test_dice_and_iou_exact() -> None:
    from histoalign_wsi.outputs.metrics import dice_iou

    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :] = True  # 8 px
    b[1:3, :2] = True  # 4 px, 2 of them inside a
    r = dice_iou(a, b)
    assert r["dice"] == pytest.approx(2 * 2 / (8 + 4)) and r["iou"] == pytest.approx(2 / (8 + 4 - 2))
    same_size_apart = dice_iou(
        np.eye(4, dtype=bool), np.fliplr(np.eye(4, dtype=bool)) & ~np.eye(4, dtype=bool)
    )
    assert same_size_apart["dice"] == 0.0 and same_size_apart["iou"] == 0.0
    assert dice_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == {"dice": 1.0, "iou": 1.0}


def test_segmentation_keys_misses_and_empty_cases(tmp_path: Path) -> None:
    ts, truth = _seg_case(tmp_path)
    # a class in the truth that no tile predicts still counts (Dice 0)
    meta = json.loads(truth.read_text())
    lym = np.zeros((1, 4), np.uint8)
    lym[0, 3] = 255
    Image.fromarray(lym).save(tmp_path / "MUC.png")
    meta["masks"]["MUC"] = "MUC.png"
    truth.write_text(json.dumps(meta))
    classes = ["TUM", "STR", "LYM", "MUC"]
    probs = np.c_[ts.probs(), np.zeros(4)]
    ts4 = TileScores(
        "s",
        tuple(classes),
        planted_table("0.50mpp", 0.5, np.asarray(ts.table[["x", "y"]]), 100, probs, classes),
    )
    res = evaluate_segmentation(ts4, truth)
    assert res["per_class"]["MUC"] == {"dice": 0.0, "iou": 0.0, "in_truth": True}
    assert res["per_class"]["TUM"]["in_truth"] is True and res["threshold"] is None
    assert res["iou_macro"] == pytest.approx(np.mean([v["iou"] for v in res["per_class"].values()]))
    # a probability exactly at the threshold is in (p >= threshold); the default threshold is 0.5
    thr = evaluate_segmentation(ts4, truth, mode="threshold")
    assert thr["threshold"] == 0.5 and thr["mode"] == "threshold"
    edge = np.array([[0.5, 0.25, 0.25, 0.0]] * 4)
    ts_edge = TileScores(
        "s",
        tuple(classes),
        planted_table("0.50mpp", 0.5, np.asarray(ts.table[["x", "y"]]), 100, edge, classes),
    )
    assert evaluate_segmentation(ts_edge, truth, mode="threshold")["per_class"]["TUM"][
        "dice"
    ] == pytest.approx(2 * 2 / (4 + 2))
    # nothing predicted and nothing true: no per-class entry and no averages (not NaN)
    empty = TileScores(
        "s",
        tuple(classes),
        planted_table("0.50mpp", 0.5, np.zeros((0, 2), np.int32), 100, np.zeros((0, 4)), classes),
    )
    res0 = evaluate_segmentation(empty, truth)
    assert res0["dice_macro"] == pytest.approx(0.0) and res0["dice_micro"] == pytest.approx(0.0)
    Image.fromarray(np.zeros((1, 4), np.uint8)).save(tmp_path / "none.png")
    (tmp_path / "none.json").write_text(
        json.dumps({"level0_px_per_mask_px": 100, "masks": {"TUM": "none.png"}})
    )
    res1 = evaluate_segmentation(empty, tmp_path / "none.json")
    assert res1["per_class"] == {} and res1["dice_macro"] is None and res1["iou_macro"] is None
    assert res1["dice_micro"] is None


def test_segmentation_goes_past_an_absent_class_and_thresholds_masks_at_128(tmp_path: Path) -> None:
    """A class neither predicted nor true (ADI, first in the bag) is left out without
    stopping the classes after it; a truth class outside the bag is listed; mask pixels
    count from 128 (grey edges of 127 are background)."""
    classes = ["ADI", "TUM", "STR"]
    coords = np.array([[0, 0], [100, 0], [200, 0], [300, 0]], np.int32)
    probs = np.array([[0.0, 0.9, 0.1], [0.0, 0.9, 0.1], [0.0, 0.1, 0.9], [0.0, 0.1, 0.9]])
    ts = TileScores("s", tuple(classes), planted_table("0.50mpp", 0.5, coords, 100, probs, classes))
    tum = np.array([[128, 255, 127, 0]], np.uint8)  # 128 and 255 are TUM; 127 is not
    Image.fromarray(tum).save(tmp_path / "TUM.png")
    Image.fromarray(np.array([[0, 0, 255, 255]], np.uint8)).save(tmp_path / "STR.png")
    Image.fromarray(np.array([[0, 0, 0, 255]], np.uint8)).save(tmp_path / "NEC.png")
    (tmp_path / "m.json").write_text(
        json.dumps(
            {
                "level0_px_per_mask_px": 100,
                "masks": {"TUM": "TUM.png", "STR": "STR.png", "Nekrose": "NEC.png"},
            }
        )
    )
    res = evaluate_segmentation(ts, tmp_path / "m.json")
    assert set(res["per_class"]) == {"TUM", "STR"}  # ADI left out, and TUM/STR still scored after it
    assert res["per_class"]["TUM"]["dice"] == pytest.approx(1.0)  # 128 counts, 127 does not
    assert res["per_class"]["STR"]["dice"] == pytest.approx(1.0)
    assert res["truth_classes_not_scored"] == ["Nekrose"]


def test_metrics_with_no_labels_one_positive_and_one_class() -> None:
    from histoalign_wsi.outputs.metrics import classification_metrics

    classes = ["TUM", "STR", "LYM"]
    none = classification_metrics([], [], np.zeros((0, 3)), classes)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "auc_macro_ovr", "auc_macro_ovo"):
        assert key in none and none[key] is None, key
    assert none["per_class"] == {} and none["note"] == "no labelled slide was scored"
    # LYM has a single labelled slide: its AUC (3 of 4 negatives below it) still counts
    y = ["TUM", "TUM", "STR", "STR", "LYM"]
    probs = np.array([[0.8, 0.1, 0.1], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.3, 0.4, 0.3]])
    m = classification_metrics(y, ["TUM", "TUM", "STR", "STR", "STR"], probs, classes)
    assert m["auc_macro_ovr"] == pytest.approx((1 + 1 + 0.75) / 3)
    ovo = skm.roc_auc_score(y, probs[:, [2, 1, 0]], multi_class="ovo", labels=sorted(classes))
    assert m["auc_macro_ovo"] == pytest.approx(ovo) and ovo < 1
    # one class present: no AUC can be computed, and it is None (null in JSON), not NaN
    one = classification_metrics(["TUM", "TUM"], ["TUM", "STR"], probs[:2], classes)
    assert one["auc_macro_ovr"] is None and one["auc_macro_ovo"] is None
    assert one["accuracy"] == 0.5
    # F1 over the classes present in the labels only: TUM (P 1, R 1/2), not the predicted-only STR
    assert one["macro_f1"] == pytest.approx(2 / 3) and one["weighted_f1"] == pytest.approx(2 / 3)
    # a present class that is never predicted has precision 0 (not 1), recall 0, F1 0
    never = classification_metrics(["TUM", "STR"], ["TUM", "TUM"], probs[:2], classes)
    str_row = {k: v for k, v in never["per_class"]["STR"].items() if k != "auc_ovr"}
    assert str_row == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert never["per_class"]["TUM"]["precision"] == 0.5 and never["per_class"]["TUM"]["recall"] == 1.0


def test_a_slide_without_tiles_is_wrong_in_accuracy_and_out_of_the_auc(tmp_path: Path) -> None:
    """The rule for a tile-less slide: counted wrong where predictions are counted, left
    out where probabilities are ranked; an AUC that filled its row with 0 or 1 would move
    its own class's AUC and the others' (checked against sklearn on the other rows)."""
    from sklearn.metrics import roc_auc_score

    classes = ["TUM", "STR", "NORM"]
    y = ["TUM", "TUM", "STR", "STR", "NORM", "NORM", "STR"]
    pred = ["TUM", "STR", "STR", "NORM", "NORM", "TUM", "no tiles (slide smaller than a tile)"]
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(3), size=len(y))
    probs[-1] = np.nan
    m = classification_metrics(y, pred, probs, classes)
    assert m["accuracy"] == pytest.approx(3 / 7) and m["n_auc"] == 6
    yt = np.array(y[:-1])
    for k, c in enumerate(classes):
        assert m["per_class"][c]["auc_ovr"] == pytest.approx(roc_auc_score(yt == c, probs[:-1, k]))
    assert m["per_class"]["STR"]["recall"] == pytest.approx(1 / 3)  # the tile-less STR slide: missed


def test_kappa_is_cohens_against_sklearn_and_by_hand() -> None:
    """Cohen's kappa (CONCH reports it): by hand on a 2x2 table and equal to sklearn's on
    a random one, a tile-less slide counted as a disagreement."""
    y = ["a", "a", "b", "b", "b"]
    p = ["a", "b", "b", "b", "a"]
    po, pe = 3 / 5, (2 / 5) * (2 / 5) + (3 / 5) * (3 / 5)
    m = classification_metrics(y, p, np.full((5, 2), 0.5), ["a", "b"])
    assert m["kappa"] == pytest.approx((po - pe) / (1 - pe))
    rng = np.random.default_rng(2)
    cls = ["TUM", "STR", "NORM"]
    y = rng.choice(cls, 40).tolist()
    p = rng.choice([*cls, "no tiles (slide smaller than a tile)"], 40).tolist()
    m = classification_metrics(y, p, rng.dirichlet(np.ones(3), 40), cls)
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, p))
    assert classification_metrics(["a", "a"], ["a", "a"], np.ones((2, 2)) / 2, ["a", "b"])["kappa"] is None


def test_the_conch_protocols_every_j_is_reported_and_the_configured_one_predicts(tmp_path: Path) -> None:
    """Each j's metrics equal those computed directly from that j's predictions; the
    cohort's prediction and headline metrics stay the configured j's; the report labels
    the table as not held out."""
    from histoalign_wsi.outputs.report import write_report

    classes = ["TUM", "STR", "NORM"]
    colors = {c: (1, 2, 3) for c in classes}
    rng = np.random.default_rng(5)
    y = rng.choice(classes, 12).tolist()
    by_j: dict[int, list[tuple[str, list[float]]]] = {}
    preds = []
    for i in range(12):
        topj = {}
        for j in (1, 5, 10):
            p = rng.dirichlet(np.ones(3))
            by_j.setdefault(j, []).append((classes[int(p.argmax())], p.tolist()))
            topj[str(j)] = {
                "predicted_class": classes[int(p.argmax())],
                "probabilities": dict(zip(classes, p, strict=True)),
            }
        pred = make_prediction(
            f"s{i}",
            classes,
            colors,
            predicted_class=topj["5"]["predicted_class"],
            probabilities=topj["5"]["probabilities"],
            pooling={"method": "topk", "topj": 5},
            extra={"topj": topj},
        )
        preds.append(pred)
    labels = {f"s{i}": y[i] for i in range(12)}
    summarize(preds, tmp_path / "p.csv", labels=labels, metrics_json=tmp_path / "metrics.json")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["topj"]["configured_j"] == 5 and "not a held-out figure" in m["topj"]["note"]
    for j in (1, 5, 10):
        direct = classification_metrics(
            y, [c for c, _ in by_j[j]], np.array([p for _, p in by_j[j]]), classes
        )
        assert m["topj"]["by_j"][str(j)]["balanced_accuracy"] == pytest.approx(direct["balanced_accuracy"])
        assert m["topj"]["by_j"][str(j)]["auc_macro_ovr"] == pytest.approx(direct["auc_macro_ovr"])
    assert m["balanced_accuracy"] == pytest.approx(m["topj"]["by_j"]["5"]["balanced_accuracy"])
    page = write_report(tmp_path / "p.csv", tmp_path / "r.html", results=tmp_path).read_text()
    assert "CONCH top-j pooling, every j" in page and "5 (the prediction)" in page


def test_an_ordered_bag_gets_the_quadratic_weighted_kappa(tmp_path: Path) -> None:
    """A bag declaring ``ordered: true`` (grades): quadratic weighted kappa equals
    sklearn's on the slides whose prediction is a grade; an unordered bag has none."""
    from histoalign_wsi.zeroshot.prompts import load_bag

    bag = tmp_path / "grades.yaml"
    bag.write_text("ordered: true\nclasses:\n  G1: {names: [g1]}\n  G2: {names: [g2]}\n  G3: {names: [g3]}\n")
    assert load_bag(str(bag)).ordered and not load_bag("crc").ordered
    classes = ["G1", "G2", "G3"]
    y = ["G1", "G1", "G2", "G2", "G3", "G3", "G2"]
    p = ["G1", "G2", "G2", "G3", "G3", "G1", "no tiles (slide smaller than a tile)"]
    preds = [
        make_prediction(f"s{i}", classes, {c: (1, 2, 3) for c in classes}, predicted_class=c, prompt_bag=pb)
        for pb in ({"name": "grades", "hash": "0", "ordered": True},)
        for i, c in enumerate(p)
    ]
    labels = {f"s{i}": c for i, c in enumerate(y)}
    summarize(preds, tmp_path / "p.csv", labels=labels, metrics_json=tmp_path / "m.json")
    qwk = json.loads((tmp_path / "m.json").read_text())["quadratic_weighted_kappa"]
    assert qwk["n"] == 6 and qwk["order"] == classes
    assert qwk["value"] == pytest.approx(
        skm.cohen_kappa_score(y[:6], p[:6], labels=classes, weights="quadratic")
    )
    plain = [
        make_prediction(f"s{i}", classes, {c: (1, 2, 3) for c in classes}, predicted_class=c)
        for i, c in enumerate(p)
    ]
    summarize(plain, tmp_path / "q.csv", labels=labels, metrics_json=tmp_path / "n.json")
    assert "quadratic_weighted_kappa" not in json.loads((tmp_path / "n.json").read_text())
