"""The site key, per-site results, site-held-out splits, per-site calibration and the site
probe, on sheets and planted feature stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histoalign_wsi.errors import ConfigError
from histoalign_wsi.learn.splits import cv_splits
from histoalign_wsi.outputs.intervals import Bootstrap, group_table
from histoalign_wsi.sites import resolve_sites
from tests.planting import make_prediction, make_text, site_offset_cohort

TCGA = ["TCGA-A7-A0CE-01Z-00-DX1", "TCGA-A7-A13D-01Z-00-DX1", "TCGA-BH-A0B3-01Z-00-DX1"]


def _sheet(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_tcga_pattern_gives_the_tissue_source_site() -> None:
    key = resolve_sites(TCGA, pattern="tcga")
    assert key is not None and dict(key.sites) == {TCGA[0]: "A7", TCGA[1]: "A7", TCGA[2]: "BH"}
    assert key.names == ["A7", "BH"] and "tcga" in key.by


def test_a_regular_expression_with_a_site_group(tmp_path: Path) -> None:
    key = resolve_sites(["hospA_001", "hospB_002"], pattern=r"^hosp(?P<site>[A-Z])_")
    assert key is not None and dict(key.sites) == {"hospA_001": "A", "hospB_002": "B"}
    with pytest.raises(ConfigError, match=r"no \(\?P<site>"):
        resolve_sites(["x"], pattern=r"^(hosp)")
    with pytest.raises(ConfigError, match="not a regular expression"):
        resolve_sites(["x"], pattern="(")


def test_a_pattern_that_matches_no_slide_is_refused() -> None:
    with pytest.raises(ConfigError, match="matches none of the 2 slides"):
        resolve_sites(["demo_01", "demo_02"], pattern="tcga")


def test_slides_left_without_a_site_are_named() -> None:
    with pytest.raises(ConfigError, match=r"1 of 2 slides have no site.*'demo_01'"):
        resolve_sites([TCGA[0], "demo_01"], pattern="tcga")


def test_sheet_columns_and_conflicts(tmp_path: Path) -> None:
    labels = _sheet(
        tmp_path / "labels.csv", "slide_id,label,site", [f"{TCGA[0]},TUM,Site one", f"{TCGA[1]},STR,ñ"]
    )
    key = resolve_sites(TCGA[:2], label_sheet=labels)
    assert key is not None and dict(key.sites) == {TCGA[0]: "Site one", TCGA[1]: "ñ"}  # free text stays free
    # the pattern says A7 for both: the sheet contradicts it
    with pytest.raises(ConfigError, match=r"two sites: 'Site one' from the label sheet and 'A7'"):
        resolve_sites(TCGA[:2], label_sheet=labels, pattern="tcga")
    twice = _sheet(tmp_path / "twice.csv", "slide_id,label,site", [f"{TCGA[0]},TUM,x", f"{TCGA[0]},TUM,y"])
    with pytest.raises(ConfigError, match=r"has two sites, 'x' \(line 2\) and 'y' \(line 3\)"):
        resolve_sites(TCGA[:1], label_sheet=twice)
    slides = _sheet(tmp_path / "slides.csv", "slide_id,path,site", [f"{TCGA[0]},a.svs,x"])
    with pytest.raises(ConfigError, match="two sites: 'x' from the slide sheet and 'y' from the label sheet"):
        resolve_sites(
            TCGA[:1],
            slide_sheet=slides,
            label_sheet=_sheet(tmp_path / "l.csv", "slide_id,label,site", [f"{TCGA[0]},TUM,y"]),
        )
    assert resolve_sites(TCGA[:1]) is None


def test_the_workflow_refuses_a_bad_site_key_before_any_job(tmp_path: Path) -> None:
    from histoalign_wsi.workflow import load_workflow

    small = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"
    (tmp_path / "slides").mkdir()
    for name in ("demo_01.svs", "demo_02.svs"):
        (tmp_path / "slides" / name).symlink_to(small)
    base = {"slides": str(tmp_path / "slides"), "results": str(tmp_path / "res"), "encoders": ["demo"]}
    with pytest.raises(ConfigError, match="site_pattern 'tcga' matches none of the 2 slides"):
        load_workflow(base | {"site_pattern": "tcga"})
    with pytest.raises(ConfigError, match="calibration_groups: site needs a site key"):
        load_workflow(base | {"calibration_groups": "site"})
    wf = load_workflow(base | {"site_pattern": r"demo_(?P<site>\d+)"})
    assert wf.site_key is not None and f"{tmp_path}/res/site_signature.json" in wf.final_outputs()


def test_summarize_writes_sites_and_a_per_site_table(tmp_path: Path) -> None:
    from histoalign_wsi.outputs.predictions import summarize
    from histoalign_wsi.sites import SiteKey

    classes = ("TUM", "STR")
    rng = np.random.default_rng(1)
    preds, labels, sites = [], {}, {}
    for i in range(24):
        sid = f"s{i:02d}"
        truth = classes[i % 2]
        p = float(rng.uniform(0.3, 0.9)) if truth == "TUM" else float(rng.uniform(0.1, 0.7))
        probs = {"TUM": p, "STR": 1 - p}
        best = max(probs, key=lambda c: probs[c])
        colors = {"TUM": (200, 0, 0), "STR": (0, 200, 0)}
        preds.append(make_prediction(sid, classes, colors, probabilities=probs, predicted_class=best))
        labels[sid], sites[sid] = truth, ("North", "South", "East")[i % 3]
    sites["s23"] = "Solo"  # a site with one slide, one class
    key = SiteKey(sites, "test")
    boot = Bootstrap(resamples=300, seed=4)
    table = summarize(
        preds,
        tmp_path / "p.csv",
        labels=labels,
        metrics_json=tmp_path / "m.json",
        sites=lambda ids: key,
        boot=boot,
    )
    csv = pd.read_csv(tmp_path / "p.csv")
    assert (
        list(csv.columns[:2]) == ["slide_id", "site"] and csv.set_index("slide_id")["site"]["s23"] == "Solo"
    )
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["bootstrap"]["unit"] == "slide" and m["bootstrap"]["resamples"] == 300
    lo, hi = m["ci"]["balanced_accuracy"]
    assert lo <= m["balanced_accuracy"] <= hi and lo < hi
    probs = table[["prob_TUM", "prob_STR"]].to_numpy(float)
    want = group_table(
        table["label"].tolist(),
        table["predicted_class"].tolist(),
        probs,
        classes,
        [sites[s] for s in table["slide_id"]],
        groups=table["slide_id"].tolist(),
        boot=boot,
    )
    assert json.loads(json.dumps(want)) == m["per_site"]["sites"]
    assert "one class" in m["per_site"]["sites"]["Solo"]["note"]
    assert "balanced_accuracy" not in m["per_site"]["sites"]["Solo"]


def test_leave_one_site_out_keeps_each_site_and_patient_on_one_side() -> None:
    ids = [f"s{i}" for i in range(12)]
    y = np.array([i % 2 for i in range(12)], np.int64)
    sites = {s: "ABC"[i % 3] for i, s in enumerate(ids)}
    patients = {s: f"p{i // 2}" if i % 3 == 0 else s for i, s in enumerate(ids)}
    patients = {s: f"{sites[s]}-{p}" for s, p in patients.items()}
    sp = cv_splits(ids, y, folds=5, seed=0, cv="site", patients=patients, sites=sites)
    assert sp.cv == "site" and "leave-one-site-out" in sp.by and sorted(sp.held_out) == ["A", "B", "C"]
    for tr, te in sp.folds:
        assert len({sites[ids[i]] for i in te}) == 1
        assert not {sites[ids[i]] for i in tr} & {sites[ids[i]] for i in te}
    many = cv_splits(ids, y, folds=2, seed=0, cv="site", sites=sites)
    assert len(many.folds) == 2 and "site-grouped 2-fold" in many.by
    crossing = dict(patients) | {"s3": patients["s1"]}  # one patient at sites A and B
    with pytest.raises(ConfigError, match="has slides at two sites"):
        cv_splits(ids, y, folds=3, seed=0, cv="site", patients=crossing, sites=sites)
    with pytest.raises(ConfigError, match="needs a site key"):
        cv_splits(ids, y, folds=3, seed=0, cv="site")


def test_no_fitted_step_sees_the_held_out_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spy on every fit of the cross-validation: its training slides never include a
    slide of the site being tested."""
    from histoalign_wsi.learn import heads
    from histoalign_wsi.learn.bags import BagSource
    from histoalign_wsi.stages.learning import scorer

    text = make_text(("TUM", "STR", "NORM"))
    stores, sites, labels = site_offset_cohort(tmp_path, text, per_site=4, push=0.0)
    source = BagSource(stores)
    seen: list[list[str]] = []
    real = heads.fit_head

    def spy(name, src, ids, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(list(ids))
        return real(name, src, ids, *a, **k)

    monkeypatch.setattr(heads, "fit_head", spy)
    ids = sorted(source.ids)
    classes = ["TUM", "STR", "NORM"]
    cv = heads.cross_validate(
        source,
        ids,
        labels,
        classes,
        heads=["linear"],
        folds=5,
        seed=0,
        epochs=1,
        score=scorer(classes),
        cv="site",
        sites=sites,
    )
    assert cv["split"]["held_out_sites"] == ["A", "B", "C"]
    for fold, trained in zip(cv["linear"]["folds"], seen, strict=True):
        held = {sites[s] for s in fold["slides"]}
        assert len(held) == 1 and not {sites[s] for s in trained} & held


def test_per_site_calibration_removes_a_planted_site_offset(tmp_path: Path) -> None:
    from histoalign_wsi.config import load_config
    from histoalign_wsi.features.store import open_store
    from histoalign_wsi.zeroshot.calibration import CalibrationOffsets, cohort_offsets
    from histoalign_wsi.zeroshot.scoring import score_store

    text = make_text(("TUM", "STR", "NORM"))
    stores, sites, labels = site_offset_cohort(tmp_path, text)
    cfg = load_config(overrides={"encoders": ["demo"], "scales_mpp": [0.5]})
    left, correct = {}, {}
    for groups in ("cohort", "site"):
        cal = cohort_offsets(stores, text, cfg, sites=sites if groups == "site" else None)
        cal.write(tmp_path / f"{groups}.json")
        cal = CalibrationOffsets.read(tmp_path / f"{groups}.json")  # as the finish stage reads it
        means, ok = {}, 0
        for p in stores:
            sc = score_store(open_store(p), text, cfg, calibration=cal)
            t = sc.tiles.table
            means.setdefault(sites[p.stem], []).append(
                t[[c for c in t.columns if c.startswith("logit_")]].mean()
            )
            ok += sc.prediction.predicted_class == labels[p.stem]
        m = np.stack([np.mean(v, axis=0) for v in means.values()])
        left[groups], correct[groups] = float(np.abs(m - m.mean(axis=0)).max()), ok / len(stores)
    assert left["site"] < 1e-3 < 1.0 < left["cohort"]
    assert correct["site"] > correct["cohort"] + 0.2
    with pytest.raises(Exception, match="has no site in this per-site calibration"):
        CalibrationOffsets.read(tmp_path / "site.json").offset("0.50mpp", slide_id="elsewhere")


def test_the_site_probe_sees_a_site_shift_and_the_control_does_not(tmp_path: Path) -> None:
    from histoalign_wsi.learn.site_probe import oof_site_probs, permuted_sites

    rng = np.random.default_rng(0)
    sites = [s for s in "ABC" for _ in range(10)]
    shift = {s: rng.normal(size=16) for s in "ABC"}
    x = np.stack([rng.normal(size=16) + 1.5 * shift[s] for s in sites]).astype(np.float32)
    groups = [f"p{i // 2}" for i in range(30)]  # two slides per patient, one site each
    probs, names, split = oof_site_probs(x, sites, groups, folds=5, seed=0)
    acc = np.mean([names[k] == s for k, s in zip(probs.argmax(1), sites, strict=True)])
    assert acc > 0.9 and split["folds"] == 5
    shuffled = permuted_sites(sites, groups, seed=1)
    assert all(shuffled[i] == shuffled[i + 1] for i in range(0, 30, 2))  # a patient keeps one site
    pp, nn, _ = oof_site_probs(x, shuffled, groups, folds=5, seed=0)
    control = np.mean([nn[k] == s for k, s in zip(pp.argmax(1), shuffled, strict=True)])
    assert control < 0.6
    with pytest.raises(ConfigError, match="two sites with two patients"):
        oof_site_probs(x[:4], ["A", "A", "B", "B"], ["p", "p", "q", "q"], folds=5, seed=0)


def test_few_shot_by_site_never_draws_a_shot_from_the_held_out_site() -> None:
    from histoalign_wsi.learn.fewshot import FewShotData, _splits

    n = 60
    rng = np.random.default_rng(0)
    data = FewShotData(
        rng.normal(size=(n, 8)).astype(np.float32),
        np.arange(n) % 3,
        rng.normal(size=(n, 3)).astype(np.float32),
        ("a", "b", "c"),
    )
    sites = [("X", "Y", "Z")[(i // 3) % 3] for i in range(n)]
    held = set()
    for _, _, site, (tr, te) in _splits(data, [2], 2, 0, None, sites):
        assert {sites[i] for i in te} == {site} and site not in {sites[i] for i in tr}
        held.add(site)
    assert held == {"X", "Y", "Z"}


def test_reports_and_distill_keep_a_site_on_one_side_when_asked(tmp_path: Path) -> None:
    """``split_by: site``: the groups a train-reports or distill split keeps together are
    the sites (so a test split is whole hospitals), refused without a site key."""
    from histoalign_wsi.config import load_config
    from histoalign_wsi.learn.reports import split_slides
    from histoalign_wsi.stages.reports import _split_groups

    sites = ("A1", "B2", "C3", "D4", "E5", "F6", "G7", "H8")
    ids = [f"TCGA-{s}-{i:04d}" for s in sites for i in range(3)]
    cfg = load_config(overrides={"site_pattern": "tcga", "train_reports": {"split_by": "site"}})
    groups = _split_groups(cfg, "site", ids, {}, None)
    assert {groups[s] for s in ids} == set(sites)
    splits = split_slides(ids, groups=groups, given=None, fractions=(0.25, 0.25), seed=0, where="test")
    sides = {name: {groups[s] for s in part} for name, part in splits.items()}
    assert not sides["train"] & sides["test"] and not sides["val"] & sides["test"]
    assert _split_groups(cfg, "patient", ids, {"x": "p"}, None) == {"x": "p"}
    with pytest.raises(ConfigError, match="split_by: site needs a site key"):
        _split_groups(load_config(), "site", ids, {}, None)
