"""Held out means held out. Each probe and head is run on high-dimensional noise, where a
right fit is at chance and a fit that saw its test rows is near 1.0; spies check that no
test row reaches a fit; splits keep a patient on one side; the contrastive loss is checked
against a hand computation; the corpus loses the cohort's own reports."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from histoalign_wsi.cli import main
from histoalign_wsi.errors import ConfigError
from histoalign_wsi.learn import evaluation, fewshot, heads
from histoalign_wsi.learn.abmil import ABMILConfig, ScaleAwareABMIL, _inner_split
from histoalign_wsi.learn.bags import BagSource
from histoalign_wsi.learn.contrastive import info_nce
from histoalign_wsi.learn.fewshot import FewShotData, draw, few_shot_curves
from histoalign_wsi.learn.groups import patch_groups
from histoalign_wsi.learn.reports import Corpus, text_key
from histoalign_wsi.stages.learning import scorer

from ..planting import build_store, unit

NOISE_DIM = 300
CLASSES = ["STR", "TUM"]


def _noise(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, NOISE_DIM)).astype(np.float32), [CLASSES[i % 2] for i in range(n)]


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[np.ndarray]:
    """Record the rows passed to ``module.name`` (a fit on (x, y, ...))."""
    seen: list[np.ndarray] = []
    real: Callable[..., Any] = getattr(module, name)

    def spy(x: np.ndarray, *a: Any, **k: Any) -> Any:
        seen.append(np.array(x, copy=True))
        return real(x, *a, **k)

    monkeypatch.setattr(module, name, spy)
    return seen


def _rows_in(rows: np.ndarray, pool: np.ndarray) -> int:
    """How many of ``rows`` appear (exactly) among ``pool``'s rows."""
    keys = {r.tobytes() for r in pool}
    return sum(r.tobytes() in keys for r in rows)


# ---- the contrastive loss ---------------------------------------------------------------


def test_info_nce_equals_the_clip_loss_computed_by_hand() -> None:
    """Both directions, with the temperature: rows and columns of the logits differ, so a
    one-way loss or a loss without its scale gives another number."""
    rng = np.random.default_rng(3)
    z = unit(rng.normal(size=(4, 6)))
    t = unit(rng.normal(size=(4, 6)))
    scale = 7.5
    logits = scale * z.astype(np.float64) @ t.T.astype(np.float64)

    def ce(m: np.ndarray) -> float:  # mean cross-entropy, target = the diagonal
        m = m - m.max(axis=1, keepdims=True)
        logp = m - np.log(np.exp(m).sum(axis=1, keepdims=True))
        return float(-np.mean(np.diag(logp)))

    want = (ce(logits) + ce(logits.T)) / 2
    got = float(info_nce(torch.from_numpy(z), torch.from_numpy(t), torch.tensor(scale)))
    assert got == pytest.approx(want, abs=1e-5)
    # the two directions really differ here, and so does the unscaled loss
    assert abs(ce(logits) - ce(logits.T)) > 0.01
    assert abs(ce(logits / scale) - want) > 0.05


# ---- attention ------------------------------------------------------------------------


def test_attention_is_a_distribution_over_each_slides_tiles() -> None:
    torch.manual_seed(0)
    model = ScaleAwareABMIL(ABMILConfig(in_dim=8, n_classes=3, n_scales=2)).eval()
    for n in (1, 5, 37):
        x = torch.randn(n, 8)
        scale = torch.randint(0, 2, (n,))
        _, a = model(x, scale)
        assert a.shape == (n,)
        assert bool((a >= 0).all()) and float(a.sum()) == pytest.approx(1.0, abs=1e-6)
        if n > 1:  # a real distribution, not all ones or one-hot by construction
            assert float(a.max()) < 1.0


def test_the_ablation_starts_from_the_same_weights() -> None:
    """With one seed, every layer the two variants share starts equal: the ablation
    differs only by the scale embedding."""
    cfg = ABMILConfig(in_dim=16, n_classes=2, n_scales=3)
    torch.manual_seed(11)
    aware = ScaleAwareABMIL(cfg)
    torch.manual_seed(11)
    blind = ScaleAwareABMIL(ABMILConfig(in_dim=16, n_classes=2, n_scales=3, scale_embedding=False))
    a, b = aware.state_dict(), blind.state_dict()
    assert set(a) - set(b) == {"scale_emb.weight"} and set(b) <= set(a)
    for k in b:
        assert torch.equal(a[k], b[k]), k


# ---- probes on noise --------------------------------------------------------------------


def test_probe_cv_is_at_chance_on_noise_and_never_fits_a_test_row(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _noise(30)
    fits = _spy(monkeypatch, evaluation, "fit_linear_full")
    res = evaluation.probe_cv(x, y, CLASSES, scorer(CLASSES), folds=5, seed=0)
    assert res["mean"]["balanced_accuracy"] < 0.7, res["mean"]
    assert len(fits) == 5
    for fitted in fits:
        assert len(fitted) == 24  # 4 of 5 folds
    # every row is in exactly 4 of the 5 fits: never in the fit of its own test fold
    counts = [sum(_rows_in(x[i : i + 1], f) for f in fits) for i in range(len(x))]
    assert counts == [4] * len(x)


def test_probe_cv_folds_count_patients_not_slides() -> None:
    x, y = _noise(12)
    groups = {i: f"p{i // 4}" for i in range(12)}  # 3 patients: at most 3 folds
    res = evaluation.probe_cv(x, y, CLASSES, scorer(CLASSES), folds=5, seed=0, groups=groups)
    assert res["folds"] == 3


def test_few_shot_probe_is_at_chance_on_noise_and_never_fits_a_test_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y = _noise(60)
    labels = np.array([CLASSES.index(c) for c in y], np.int64)
    data = FewShotData(unit(x), labels, np.zeros((60, 2), np.float32), tuple(CLASSES))
    fits = _spy(monkeypatch, fewshot, "fit_linear_full")
    rows = few_shot_curves(data, shots=[8], repeats=4, seed=0, score=scorer(CLASSES))
    probe = [r["balanced_accuracy"] for r in rows if r["method"] == "linear probe"]
    assert np.mean(probe) < 0.7, probe
    for r, fitted in enumerate(fits):
        _, te = draw(labels, 8, r, CLASSES)
        assert len(fitted) == 16 and _rows_in(data.features[te], fitted) == 0


def _noise_stores(tmp: Path, n: int) -> tuple[list[Path], dict[str, str]]:
    x, y = _noise(n, seed=5)
    paths, labels = [], {}
    for i in range(n):
        sid = f"n{i:02d}"
        paths.append(build_store(tmp / f"{sid}.zarr", {0.5: unit(x[i : i + 1])}, slide_id=sid))
        labels[sid] = y[i]
    return paths, labels


def test_cross_validated_heads_are_at_chance_on_noise_and_never_fit_a_held_out_slide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, labels = _noise_stores(tmp_path, 30)
    source = BagSource(paths)
    ids = sorted(labels)
    calls: list[list[str]] = []
    real = heads.fit_head

    def spy(name: str, src: BagSource, fit_ids: list[str], *a: Any, **k: Any) -> Any:
        calls.append(list(fit_ids))
        return real(name, src, fit_ids, *a, **k)

    monkeypatch.setattr(heads, "fit_head", spy)
    cv = heads.cross_validate(
        source, ids, labels, CLASSES, heads=["linear"], folds=5, seed=0, epochs=1, score=scorer(CLASSES)
    )
    assert cv["linear"]["mean"]["balanced_accuracy"] < 0.7, cv["linear"]["mean"]
    assert len(calls) == 5
    for fitted, fold in zip(calls, cv["linear"]["folds"], strict=True):
        assert not set(fitted) & set(fold["slides"]) and len(fitted) + len(fold["slides"]) == 30


def test_a_fold_without_a_class_is_refused_or_expanded(tmp_path: Path) -> None:
    """Class C's slides all come from one patient: 2-fold CV by patient cannot train on C
    in one fold, so it is refused in one line; a head fitted without a class still gives
    one probability column per class (0 for the absent class)."""
    rng = np.random.default_rng(0)
    paths, labels, patients = [], {}, {}
    for i in range(12):
        sid = f"c{i:02d}"
        cls = ["A", "B", "C"][i % 3]
        paths.append(
            build_store(tmp_path / f"{sid}.zarr", {0.5: unit(rng.normal(size=(2, 8)))}, slide_id=sid)
        )
        labels[sid], patients[sid] = cls, ("pc" if cls == "C" else f"p{i}")
    source = BagSource(paths)
    ids = sorted(labels)
    with pytest.raises(ConfigError, match="class 'C' has 1") as err:
        heads.cross_validate(
            source,
            ids,
            labels,
            ["A", "B", "C"],
            heads=["linear"],
            folds=2,
            seed=0,
            epochs=1,
            score=scorer(["A", "B", "C"]),
            groups=patients,
        )
    assert "patients" in str(err.value) and "\n" not in str(err.value)
    ab = [s for s in ids if labels[s] != "C"]
    y = np.array([["A", "B", "C"].index(labels[s]) for s in ab])
    head = heads.fit_head("linear", source, ab, y, ["A", "B", "C"], seed=0, epochs=1)
    p, _ = head.predict(source.bag(ids[2]))
    assert p.shape == (3,) and p[2] == 0.0 and p.sum() == pytest.approx(1.0, abs=1e-6)


# ---- splits by patient ------------------------------------------------------------------


def test_the_early_stopping_split_keeps_patients_together() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1])
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "f", "e", "f"]
    for seed in range(10):
        tr, va = _inner_split(y, 0.3, np.random.default_rng(seed), groups)
        assert va and tr and sorted(tr + va) == list(range(12))
        assert not {groups[i] for i in tr} & {groups[i] for i in va}
    # without groups, each slide is its own group (the former behaviour)
    tr, va = _inner_split(y, 0.25, np.random.default_rng(0))
    assert len(va) == 4 and not set(tr) & set(va)  # round(0.25 * 6) of each class


BREAKHIS = [
    f"SOB_{t}_{s}-14-{p}-40-{i:03d}.png"
    for t, s, p in (("B", "A", "22549AB"), ("M", "DC", "4372B"))
    for i in range(2)
]


def test_patch_groups_from_breakhis_names_a_sheet_and_a_pattern(tmp_path: Path) -> None:
    root = tmp_path / "p"
    paths = [root / "x" / n for n in BREAKHIS]
    g = patch_groups(paths, root)
    assert g.keys == ("14-22549AB", "14-22549AB", "14-4372B", "14-4372B") and "BreakHis" in g.by
    assert patch_groups(paths, root, pattern="none").keys is None
    other = [root / "x" / "a.png", root / "x" / "b.png"]
    assert patch_groups(other, root).keys is None  # auto: no key found, said so
    assert patch_groups(other, root, pattern=r"(?P<patient>^[a-z])").keys == ("a", "b")
    with pytest.raises(ConfigError, match=r"'a\.png' does not match the group pattern"):
        patch_groups(other, root, pattern="breakhis")
    sheet = tmp_path / "g.csv"
    pd.DataFrame({"path": ["x/a.png", "b.png"], "patient_id": ["P 1", "P 1"]}).to_csv(sheet, index=False)
    assert patch_groups(other, root, sheet=sheet).keys == ("P 1", "P 1")
    pd.DataFrame({"path": ["x/a.png"], "patient_id": ["P 1"]}).to_csv(sheet, index=False)
    with pytest.raises(ConfigError, match=r"no patient_id for 1 patch\(es\): x/b.png"):
        patch_groups(other, root, sheet=sheet)


def test_few_shot_draws_by_patient_never_share_a_patient() -> None:
    labels = np.repeat([0, 1], 40)
    groups = [f"p{i // 5}" for i in range(80)]  # 8 patients per class, 5 patches each
    for seed in range(5):
        tr, te = draw(labels, 4, seed, CLASSES, groups)
        assert len(tr) == 8 and len(te) > 0
        assert not {groups[i] for i in tr} & {groups[i] for i in te}
        assert set(labels[te]) == {0, 1}
    with pytest.raises(ConfigError, match="by patient needs more patches of class 'STR'"):
        draw(labels, 40, 0, CLASSES, groups)


def test_few_shot_on_patient_noise_is_at_chance_by_patient() -> None:
    """Each patient has its own offset: with patches of a drawn patient tested, a probe
    would recognise the patient; drawn by patient, it is at chance."""
    rng = np.random.default_rng(1)
    n_pat, per = 8, 20
    offsets = rng.normal(size=(n_pat, NOISE_DIM)) * 3
    x = np.concatenate([offsets[p] + rng.normal(size=(per, NOISE_DIM)) for p in range(n_pat)])
    pat_label = rng.permutation(np.repeat([0, 1], n_pat // 2))
    labels = np.repeat(pat_label, per).astype(np.int64)
    groups = [f"p{p}" for p in range(n_pat) for _ in range(per)]
    data = FewShotData(unit(x), labels, np.zeros((len(x), 2), np.float32), tuple(CLASSES))

    def mean_probe(g: list[str] | None) -> float:
        rows = few_shot_curves(data, shots=[4], repeats=6, seed=0, score=scorer(CLASSES), groups=g)
        return float(np.mean([r["balanced_accuracy"] for r in rows if r["method"] == "linear probe"]))

    leaky, grouped = mean_probe(None), mean_probe(groups)
    assert leaky > 0.8 and grouped < 0.7, (leaky, grouped)


# ---- the corpus and the cohort's own reports --------------------------------------------


def test_corpus_loses_reports_equal_to_the_cohorts_own() -> None:
    own = ["Invasive ductal carcinoma, grade 2.", "Lymph node: benign."]
    corpus = Corpus(
        Path("c"),
        ("a", "b", "c", "d"),
        ("invasive  ductal carcinoma -- GRADE 2", "Something else entirely.", "Lymph node; benign", "Ü"),
    )
    kept, dropped = corpus.without(own)
    assert dropped == ["a", "c"] and kept.ids == ("b", "d") and kept.texts[1] == "Ü"
    assert text_key("Befund: Karzinom.") == text_key("befund karzinom") != text_key("befund karzinome")


def test_pair_reports_excludes_the_cohorts_reports_and_distill_splits_by_patient(tmp_path: Path) -> None:
    """Patches named as BreakHis names them: the items carry their patient; the corpus
    holds two of the cohort's own reports in another layout, which are left out; distill's
    test patients have no patch in training."""
    from PIL import Image

    rng = np.random.default_rng(0)
    names = []
    for cls, t in (("TUM", "M"), ("STR", "B")):
        (tmp_path / "patches" / cls).mkdir(parents=True)
        for p in range(4):
            for i in range(3):
                name = f"SOB_{t}_A-14-{cls}{p}-40-{i:03d}.png"
                img = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(tmp_path / "patches" / cls / name)
                names.append(f"{cls}/{name}")
    cohort = tmp_path / "cohort reports.csv"
    pd.DataFrame({"slide_id": ["a", "b"], "report": ["Tumour: grade 2.", "Stroma only."]}).to_csv(
        cohort, index=False
    )
    corpus = tmp_path / "corpus.csv"
    texts = ["TUMOUR  grade 2", "stroma, only"] + [f"Report {i}: findings." for i in range(10)]
    pd.DataFrame({"report": texts}).to_csv(corpus, index=False)
    out = tmp_path / "pairs"
    args = ["pair-reports", str(tmp_path / "patches"), "--corpus", str(corpus), "--out", str(out)]
    assert main([*args, "--reports", str(cohort), "-k", "2"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["corpus_excluded_as_cohort_reports"] == 2 and s["corpus_reports"] == 10
    pairs = pd.read_csv(out / "pairs.csv")
    assert not pairs["report_id"].astype(str).isin(["line 2", "line 3"]).any()
    assert main(["distill", str(out), "--out", str(tmp_path / "d"), "--set", "distill.epochs=3"]) == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert "BreakHis" in m["split_by"] and m["n_groups"] == 8
    patient = {n: n.split("-")[2] for n in names}
    test_patients = {patient[i] for i in m["test_items"]}
    train = [n for n in names if n not in set(m["test_items"])]
    assert test_patients and not test_patients & {patient[n] for n in train}


def test_distill_on_slides_splits_by_the_label_sheets_patients(tmp_path: Path) -> None:
    from histoalign_wsi.config import load_config
    from histoalign_wsi.features.adapters import load_encoder
    from histoalign_wsi.features.registry import load_registry
    from histoalign_wsi.stages import run_distill, run_pair_reports

    demo = load_encoder(load_registry()["demo"])
    rng = np.random.default_rng(0)
    paths, rows = [], []
    for i in range(16):
        sid = f"s{i:02d}"
        f = unit(rng.normal(size=(4, demo.entry.embed_dim)))
        paths.append(build_store(tmp_path / f"{sid}.zarr", {0.5: f}, slide_id=sid, sha=demo.weights_sha256))
        rows.append({"slide_id": sid, "label": CLASSES[(i // 2) % 2], "patient_id": f"P{i // 2}"})
    sheet = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(sheet, index=False)
    corpus = tmp_path / "corpus.csv"
    pd.DataFrame({"report": [f"finding {i}" for i in range(6)]}).to_csv(corpus, index=False)
    cfg = load_config(overrides={"distill": {"epochs": 2, "test_fraction": 0.5}})
    run_pair_reports(paths, corpus, tmp_path / "pairs", cfg, k=2)
    m = run_distill(tmp_path / "pairs", tmp_path / "d", cfg, labels_sheet=sheet)
    assert m["split_by"] == "patient (label sheet)" and m["n_groups"] == 8
    patient = {r["slide_id"]: r["patient_id"] for r in rows}
    test = set(m["test_items"])
    assert test and not {patient[s] for s in test} & {patient[s] for s in patient if s not in test}


# ---- train-reports: the probe sees test slides only -------------------------------------


def test_train_reports_probe_fits_and_scores_test_slides_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histoalign_wsi.config import load_config
    from histoalign_wsi.features.adapters import load_encoder
    from histoalign_wsi.features.registry import load_registry
    from histoalign_wsi.stages import run_train_reports

    demo = load_encoder(load_registry()["demo"])
    rng = np.random.default_rng(0)
    paths, rows = [], []
    splits = ["train"] * 12 + ["val"] * 4 + ["test"] * 8
    for i, split in enumerate(splits):
        sid = f"r{i:02d}"
        f = unit(rng.normal(size=(3, demo.entry.embed_dim)))
        paths.append(build_store(tmp_path / f"{sid}.zarr", {0.5: f}, slide_id=sid, sha=demo.weights_sha256))
        label = CLASSES[i % 2]
        rows.append({"slide_id": sid, "report": f"Diagnosis: {label} {i}", "split": split, "label": label})
    sheet = tmp_path / "reports.csv"
    pd.DataFrame(rows).to_csv(sheet, index=False)
    seen: list[int] = []
    real = evaluation.probe_cv

    def spy(x: np.ndarray, labels: list[str], *a: Any, **k: Any) -> Any:
        seen.append(len(x))
        return real(x, labels, *a, **k)

    monkeypatch.setattr(evaluation, "probe_cv", spy)
    cfg = load_config(overrides={"prompt_bag": "crc", "train_reports": {"epochs": 2, "batch_size": 4}})
    res = run_train_reports(paths, sheet, tmp_path / "out", cfg)
    assert seen == [8, 8]  # both variants: the 8 test slides, no training or validation slide
    for m in res["models"].values():
        assert m["linear_probe"]["n_slides"] == 8 and m["linear_probe"]["slides"] == "test split only"
    # too few labelled test slides: said in the output, training slides never borrowed
    for r in rows:
        if r["split"] == "test" and r["slide_id"] not in ("r16", "r17", "r18"):
            r["split"] = "train"
    pd.DataFrame(rows).to_csv(sheet, index=False)
    res = run_train_reports(paths, sheet, tmp_path / "out2", cfg)
    probe = res["models"]["scale_aware"]["linear_probe"]
    assert "never borrowed" in probe["skipped"] and probe["n_slides"] == 3
