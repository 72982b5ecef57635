"""Bootstrap intervals, checked against an independent computation: the documented
resampling scheme written out here by hand, and scikit-learn's metrics on each draw."""

from __future__ import annotations

import numpy as np
import pytest

from histoalign_wsi.outputs.intervals import (
    METRICS,
    Bootstrap,
    draws,
    fast_metrics,
    format_ci,
    group_table,
    with_intervals,
)
from histoalign_wsi.outputs.metrics import classification_metrics

CLASSES = ["tumor", "stroma", "normal"]


def _cohort(n: int = 60, seed: int = 3) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs[rng.random(n) < 0.3] = np.round(probs[rng.random(n) < 0.3][:1], 1)  # ties
    pred = [CLASSES[k] for k in probs.argmax(axis=1)]
    pred[4] = "no tissue"  # a slide without tiles: wrong, out of the AUCs
    probs[4] = np.nan
    patients = [f"p{i // 2}" for i in range(n)]  # two slides per patient
    return [CLASSES[k] for k in y], pred, probs, patients


def _by_hand(yt, yp, probs, units, boot):  # type: ignore[no-untyped-def]
    """The module's documented scheme, written independently, scored by scikit-learn."""
    uniq = sorted(set(units))
    rows_of = {u: [i for i, v in enumerate(units) if v == u] for u in uniq}
    rng = np.random.default_rng(boot.seed)
    vals: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(boot.resamples):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = [i for g in pick for i in rows_of[uniq[g]]]
        m = classification_metrics([yt[i] for i in idx], [yp[i] for i in idx], probs[idx], CLASSES)
        for k in METRICS:
            if m[k] is not None:
                vals[k].append(m[k])
    return {k: [np.percentile(v, 2.5), np.percentile(v, 97.5)] for k, v in vals.items()}


def test_point_metrics_equal_the_reference_definitions() -> None:
    yt, yp, probs, _ = _cohort()
    ref = classification_metrics(yt, yp, probs, CLASSES)
    got = with_intervals(yt, yp, probs, CLASSES, boot=Bootstrap(resamples=0))
    for k in METRICS:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k


@pytest.mark.parametrize("grouped", [True, False])
def test_intervals_equal_an_independent_computation(grouped: bool) -> None:
    yt, yp, probs, patients = _cohort()
    boot = Bootstrap(resamples=200, seed=11)
    units = patients if grouped else [str(i) for i in range(len(yt))]
    got = with_intervals(yt, yp, probs, CLASSES, groups=patients if grouped else None, boot=boot)
    want = _by_hand(yt, yp, probs, units, boot)
    for k in METRICS:
        assert got["ci"][k] == pytest.approx(want[k], abs=1e-12), k
        assert got["ci"][k][0] <= got[k] <= got["ci"][k][1] or k == "kappa"


def test_resampling_patients_is_not_resampling_slides() -> None:
    """Breaking the grouping (slides drawn instead of patients) changes the interval."""
    yt, yp, probs, patients = _cohort()
    boot = Bootstrap(resamples=200, seed=11)
    by_patient = with_intervals(yt, yp, probs, CLASSES, groups=patients, boot=boot)["ci"]
    by_slide = with_intervals(yt, yp, probs, CLASSES, boot=boot)["ci"]
    assert by_patient["balanced_accuracy"] != by_slide["balanced_accuracy"]


def test_draws_keep_a_patients_slides_together_and_are_seeded() -> None:
    groups = ["a", "b", "a", "c", "b", "a"]
    for idx in draws(groups, 20, seed=5):
        picked = [groups[i] for i in idx]
        for g in set(picked):  # every slide of a drawn patient, as often as it was drawn
            assert picked.count(g) % groups.count(g) == 0
    first = [d.tolist() for d in draws(groups, 5, seed=5)]
    assert first == [d.tolist() for d in draws(groups, 5, seed=5)]
    assert first != [d.tolist() for d in draws(groups, 5, seed=6)]


def test_fast_metrics_handle_one_class_and_empty() -> None:
    y = np.array([0, 0, 0])
    m = fast_metrics(y, np.array([0, 1, 0]), np.full((3, 3), 1 / 3), 3)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["auc_macro_ovr"] is None
    assert fast_metrics(y[:0], y[:0], np.zeros((0, 3)), 3)["accuracy"] is None


def test_group_table_per_site_equals_each_sites_own_computation() -> None:
    yt, yp, probs, patients = _cohort(90)
    sites = [("A", "B", "C")[i % 3] for i in range(len(yt))]
    sites[-6:] = ["D"] * 6
    for i in range(len(yt) - 6, len(yt)):
        yt[i] = "tumor"
    boot = Bootstrap(resamples=100, seed=2)
    table = group_table(yt, yp, probs, CLASSES, sites, groups=patients, boot=boot)
    assert sorted(table) == ["A", "B", "C", "D"]
    for s in ("A", "B", "C"):
        rows = [i for i, v in enumerate(sites) if v == s]
        own = with_intervals(
            [yt[i] for i in rows],
            [yp[i] for i in rows],
            probs[rows],
            CLASSES,
            groups=[patients[i] for i in rows],
            boot=boot,
        )
        assert table[s]["n"] == len(rows)
        assert table[s]["balanced_accuracy"] == own["balanced_accuracy"]
        assert table[s]["ci"]["auc_macro_ovr"] == own["ci"]["auc_macro_ovr"]
    assert "balanced_accuracy" not in table["D"] and "one class" in table["D"]["note"]
    assert table["D"]["accuracy"] is not None


def test_format_ci() -> None:
    assert format_ci(0.81234, [0.7, 0.9]) == "0.812 [0.700, 0.900]"
    assert format_ci(None, None) == "n/a"


def test_a_proportions_interval_uses_the_same_draws() -> None:
    from histoalign_wsi.outputs.intervals import proportion_ci

    hits = [True, False, True, True, False, True, False, True, True, True]
    boot = Bootstrap(resamples=300, seed=9)
    rng = np.random.default_rng(9)
    vals = [np.mean([hits[i] for i in rng.integers(0, 10, 10)]) for _ in range(300)]
    want = [np.percentile(vals, 2.5), np.percentile(vals, 97.5)]
    assert proportion_ci(hits, boot=boot) == pytest.approx(want, abs=1e-12)
    assert proportion_ci([], boot=boot) is None
