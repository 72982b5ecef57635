"""Learning from labels on stored features: scale-aware attention MIL against its
ablation, attention on the planted region, few-shot draws, saved heads, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histoalign_wsi.cli import main
from histoalign_wsi.errors import ConfigError, StoreError
from histoalign_wsi.learn.bags import BagSource, match_labels
from histoalign_wsi.learn.fewshot import FewShotData, draw, few_shot_curves, tip_adapter
from histoalign_wsi.learn.heads import Head, fit_head

from ..planting import D, build_store, unit

RNG = np.random.default_rng(0)


class Evil:
    """Unpickling this would run a command."""

    target = ""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.target}",))


P, Q = unit(RNG.normal(size=D)), unit(RNG.normal(size=D))


def _tiles(n: int, pattern: np.ndarray, seed: int, signal: float = 1.0) -> np.ndarray:
    r = np.random.default_rng(seed)
    return unit(signal * pattern + r.normal(size=(n, D)) / np.sqrt(D))


@pytest.fixture(scope="module")
def scale_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict[str, str]]:
    """Class TUM: pattern P at 0.5 µm/px, Q at 1.0; class STR: the reverse. The same
    pattern means opposite classes at the two scales, and each scale has as many tiles,
    so without knowing the scale the two classes' bags look alike."""
    d = tmp_path_factory.mktemp("scale")
    paths, labels = [], {}
    for i in range(36):
        a = i % 2 == 0
        feats = {
            0.5: _tiles(48, P if a else Q, 3 * i),
            1.0: _tiles(48, Q if a else P, 3 * i + 1),
            2.0: _tiles(12, np.zeros(D), 3 * i + 2, 0.0),
        }
        sid = f"s{i:02d}"
        paths.append(build_store(d / f"{sid}.zarr", feats, slide_id=sid))
        labels[sid] = "TUM" if a else "STR"
    return paths, labels


def _accuracy(head: Head, source: BagSource, ids: list[str], labels: dict[str, str]) -> float:
    pred = [head.classes[int(np.argmax(head.predict(source.bag(s))[0]))] for s in ids]
    return float(np.mean([p == labels[s] for p, s in zip(pred, ids, strict=True)]))


@pytest.mark.slow  # trains attention MIL models for a minute
def test_scale_embeddings_are_what_makes_it_work(scale_cohort: tuple[list[Path], dict[str, str]]) -> None:
    paths, labels = scale_cohort
    source = BagSource(paths)
    ids = sorted(labels)
    train, test = ids[:24], ids[24:]
    classes = ["TUM", "STR"]
    y = np.array([classes.index(labels[s]) for s in train])
    aware = fit_head("abmil", source, train, y, classes, seed=0, epochs=30)
    blind = fit_head("abmil_noscale", source, train, y, classes, seed=0, epochs=30)
    assert _accuracy(aware, source, test, labels) >= 0.9
    assert _accuracy(blind, source, test, labels) <= 0.7  # near chance: the bags look alike


@pytest.mark.slow  # trains attention MIL models for a minute
def test_attention_concentrates_on_the_planted_region(tmp_path: Path) -> None:
    """Only a region of 8 of 64 fine tiles decides the label; the trained model puts a
    multiple of the region's area share of its attention there."""
    paths, labels = [], {}
    for i in range(24):
        a = i % 2 == 0
        fine = _tiles(64, np.zeros(D), 10 * i, 0.0)
        fine[:8] = _tiles(8, P if a else Q, 10 * i + 1, 1.5)
        feats = {
            0.5: fine,
            1.0: _tiles(16, np.zeros(D), 10 * i + 2, 0.0),
            2.0: _tiles(4, np.zeros(D), 10 * i + 3, 0.0),
        }
        sid = f"a{i:02d}"
        paths.append(build_store(tmp_path / f"{sid}.zarr", feats, slide_id=sid))
        labels[sid] = "TUM" if a else "STR"
    source = BagSource(paths)
    ids = sorted(labels)
    y = np.array([["TUM", "STR"].index(labels[s]) for s in ids])
    head = fit_head("abmil", source, ids[:18], y[:18], ["TUM", "STR"], seed=1, epochs=30)
    ratios = []
    for sid in ids[18:]:
        bag = source.bag(sid)
        _, att = head.predict(bag)
        region = np.zeros(len(att), bool)
        region[:8] = True  # the first fine tiles, in store order
        ratios.append(att[region].sum() / region.mean())
    assert np.mean(ratios) >= 3.0, ratios


def test_saved_head_predicts_identically_and_pickles_are_refused(
    scale_cohort: tuple[list[Path], dict[str, str]], tmp_path: Path
) -> None:
    paths, labels = scale_cohort
    source = BagSource(paths[:12])
    ids = sorted(source.ids)
    y = np.array([["TUM", "STR"].index(labels[s]) for s in ids])
    for name in ("abmil", "linear"):
        head = fit_head(name, source, ids, y, ["TUM", "STR"], seed=0, epochs=3)
        head.save(tmp_path / name)
        again = Head.load(tmp_path / name)
        for s in ids[:4]:
            a, b = head.predict(source.bag(s)), again.predict(source.bag(s))
            np.testing.assert_array_equal(a[0], b[0])
    marker = tmp_path / "pwned"
    Evil.target = str(marker)
    evil = pickle.dumps({"w": Evil()})
    (tmp_path / "abmil" / "model.safetensors").write_bytes(evil)
    with pytest.raises(ConfigError, match="does not match its checksum"):
        Head.load(tmp_path / "abmil")
    cfg = json.loads((tmp_path / "abmil" / "config.json").read_text())
    cfg["weights_sha256"] = hashlib.sha256(evil).hexdigest()  # a checksum forged to match
    (tmp_path / "abmil" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not a valid safetensors file"):
        Head.load(tmp_path / "abmil")
    assert not marker.exists()  # nothing was unpickled


def test_bad_label_sheets_and_mismatched_stores(
    scale_cohort: tuple[list[Path], dict[str, str]], tmp_path: Path
) -> None:
    paths, labels = scale_cohort
    ids = [f"s{i:02d}" for i in range(36)]
    with pytest.raises(ConfigError, match="without a feature store: ghost"):
        match_labels({"s00": "TUM", "ghost": "STR"}, ids)
    with pytest.raises(ConfigError, match=r"labels \['Tumour'\] are not classes"):
        match_labels({"s00": "Tumour", "s01": "STR"}, ids, classes=["TUM", "STR"])
    with pytest.raises(ConfigError, match="at least two classes"):
        match_labels({"s00": "TUM", "s02": "TUM"}, ids)
    other = build_store(tmp_path / "other.zarr", {0.5: _tiles(4, P, 1), 1.0: _tiles(4, P, 2)}, slide_id="o")
    with pytest.raises(StoreError, match="scales"):
        BagSource([paths[0], other])
    sha = build_store(
        tmp_path / "sha.zarr", {m: _tiles(4, P, 3) for m in (0.5, 1.0, 2.0)}, slide_id="x", sha="a" * 64
    )
    with pytest.raises(StoreError, match="same encoders and weights"):
        BagSource([paths[0], sha])
    sheet = tmp_path / "labels.csv"
    sheet.write_text("slide_id,label\n" + "".join(f"{s},{labels[s]}\n" for s in ids[:6]))
    args = ["fit", *map(str, paths[:6]), "--labels", str(sheet), "--out", str(tmp_path / "m"), "--folds", "5"]
    assert main(args) == 2  # 3 slides per class cannot make 5 folds


@pytest.mark.slow  # trains attention MIL models for a minute
def test_fit_and_predict_cli(scale_cohort: tuple[list[Path], dict[str, str]], tmp_path: Path) -> None:
    paths, labels = scale_cohort
    sheet = tmp_path / "labels.csv"
    sheet.write_text("slide_id,label\n" + "".join(f"{s},{labels[s]}\n" for s in sorted(labels)[:24]))
    models = tmp_path / "models"
    args = [
        "fit",
        *map(str, paths[:24]),
        "--labels",
        str(sheet),
        "--out",
        str(models),
        "--heads",
        "linear",
        "abmil",
    ]
    assert main([*args, "--folds", "3", "--epochs", "20", "--attention", str(tmp_path / "att")]) == 0
    cv = json.loads((models / "cv_metrics.json").read_text())
    assert (
        set(cv["heads"]) == {"linear", "abmil", "abmil_noscale"} and len(cv["heads"]["abmil"]["folds"]) == 3
    )
    assert (
        cv["heads"]["abmil"]["mean"]["balanced_accuracy"]
        > cv["heads"]["abmil_noscale"]["mean"]["balanced_accuracy"]
    )
    for h in ("linear", "abmil", "abmil_noscale"):
        assert (models / h / "model.safetensors").is_file() and (models / h / "config.json").is_file()
    att = pd.read_parquet(tmp_path / "att" / "s00.parquet")
    assert att["attention"].sum() == pytest.approx(1.0, abs=1e-4) and set(att["scale"]) == {
        "0.50mpp",
        "1.00mpp",
        "2.00mpp",
    }
    out = tmp_path / "pred"
    assert main(["predict", *map(str, paths[24:]), "--head", str(models / "abmil"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv")
    acc = np.mean([p == labels[s] for p, s in zip(table["predicted_class"], table["slide_id"], strict=True)])
    assert len(table) == 12 and acc >= 0.9
    pred = json.loads((out / "predictions" / "s30.json").read_text())
    assert pred["method"] == "abmil" and pred["top_tiles"] and "attention" in pred["top_tiles"][0]


def test_few_shot_draws_are_disjoint_deterministic_and_checked() -> None:
    labels = np.array([0] * 10 + [1] * 6 + [2] * 3)
    names = ["a", "b", "c"]
    tr, te = draw(labels, 2, 7, names)
    assert not set(tr) & set(te) and len(tr) == 6 and len(tr) + len(te) == len(labels)
    assert np.array_equal(draw(labels, 2, 7, names)[0], tr)  # same seed, same draw
    assert not np.array_equal(draw(labels, 2, 8, names)[0], tr)
    with pytest.raises(ConfigError, match="3-shot needs more than 3 patches of class 'c'"):
        draw(labels, 3, 0, names)


def test_tip_adapter_and_probe_learn_what_zero_shot_misses() -> None:
    """Zero-shot logits point the wrong way; the cache and the probe recover the classes."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    x = unit(np.where(y[:, None] == 0, P, Q) * 1.5 + rng.normal(size=(80, D)) / np.sqrt(D))
    zs = np.stack([x @ Q, x @ P], axis=1).astype(np.float32) * 2  # swapped: zero-shot is wrong
    data = FewShotData(x, y.astype(np.int64), zs, ("a", "b"))
    tr, te = draw(data.labels, 4, 0, data.classes)
    tip = tip_adapter(data, tr, te, alpha=10.0)
    assert (tip.argmax(axis=1) == y[te]).mean() > (zs[te].argmax(axis=1) == y[te]).mean() + 0.5

    def score(y_true: list[str], probs: np.ndarray) -> dict[str, float]:
        return {
            "acc": float(
                np.mean([data.classes[k] == t for k, t in zip(probs.argmax(axis=1), y_true, strict=True)])
            )
        }

    rows = few_shot_curves(data, shots=[1, 4], repeats=2, seed=0, score=score)
    by = {(r["method"], r["shots"], r["repeat"]): r["acc"] for r in rows}
    assert len(rows) == 2 * 2 * 3
    assert by[("linear probe", 4, 0)] > 0.9 and by[("zero-shot", 4, 0)] < 0.1


def test_few_shot_cli_writes_curves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    for cls, colour in (("TUM", (200, 60, 90)), ("STR", (240, 170, 200))):
        (tmp_path / "p" / cls).mkdir(parents=True)
        for i in range(6):
            img = np.clip(np.array(colour) + rng.normal(scale=20, size=(64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "p" / cls / f"{i}.png")
    out = tmp_path / "fs"
    assert (
        main(["few-shot", str(tmp_path / "p"), "--out", str(out), "--shots", "1", "2", "--repeats", "2"]) == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["untrained"] is True and {r["method"] for r in s["curves"]["balanced_accuracy"]} == {
        "zero-shot",
        "linear probe",
        "Tip-Adapter",
    }
    rows = pd.read_csv(out / "curves.csv")
    assert len(rows) == 2 * 2 * 3 and (out / "curves.png").stat().st_size > 1000
    assert main(["few-shot", str(tmp_path / "p"), "--out", str(out), "--shots", "6"]) == 2
    assert "6-shot needs more than 6 patches" in capsys.readouterr().err


def test_folds_split_by_patient_when_given(scale_cohort: tuple[list[Path], dict[str, str]]) -> None:
    from histoalign_wsi.learn.heads import cross_validate

    paths, labels = scale_cohort
    source = BagSource(paths[:16])
    ids = sorted(source.ids)
    patients = {s: f"p{int(s[1:]) // 4}" for s in ids}  # 4 patients of 4 slides, both classes each

    def score(y: list[str], probs: np.ndarray) -> dict[str, float]:
        return {"accuracy": 0.0, "balanced_accuracy": 0.0, "macro_f1": 0.0, "auc_macro_ovr": None}

    cv = cross_validate(
        source,
        ids,
        labels,
        ["TUM", "STR"],
        heads=["linear"],
        folds=2,
        seed=0,
        epochs=1,
        score=score,
        groups=patients,
    )
    for fold in cv["linear"]["folds"]:
        held = {patients[s] for s in fold["slides"]}
        others = {patients[s] for s in ids if s not in fold["slides"]}
        assert held and not held & others


def test_tip_adapter_values_against_the_formula() -> None:
    """Tip-Adapter's probabilities, computed by hand from its formula on three patches:
    a flipped affinity sign, another beta or alpha, or a test patch in the cache changes
    them."""
    f = unit(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]))
    y = np.array([0, 1, 0, 1], np.int64)
    zs = np.array([[0.1, 0.3], [0.2, 0.0], [0.5, 0.4], [0.0, 0.1]], np.float32)
    data = FewShotData(f.astype(np.float32), y, zs, ("a", "b"))
    tr, te = np.array([0, 1], np.int64), np.array([2, 3], np.int64)
    got = tip_adapter(data, tr, te, alpha=2.0, beta=3.0)
    for row, i in enumerate(te):
        aff = [np.exp(-3.0 * (1.0 - float(f[i] @ f[j]))) for j in tr]  # to patch 0 (a), patch 1 (b)
        z = zs[i] + 2.0 * np.array([aff[0], aff[1]])
        np.testing.assert_allclose(got[row], np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rtol=1e-5)


def test_tip_adapter_learns_nothing_from_noise() -> None:
    """Labels that are pure noise: the cache holds only the drawn shots, so held-out
    accuracy stays near chance (a test patch leaking into the cache makes it 1.0)."""
    rng = np.random.default_rng(3)
    n = 300
    x = unit(rng.normal(size=(n, D)))
    y = rng.integers(0, 3, size=n).astype(np.int64)
    data = FewShotData(x.astype(np.float32), y, np.zeros((n, 3), np.float32), ("a", "b", "c"))
    tr, te = draw(data.labels, 8, 0, data.classes)
    acc = float((tip_adapter(data, tr, te).argmax(axis=1) == y[te]).mean())
    assert acc < 0.5, acc


def test_the_tip_adapter_search_reads_only_the_shots() -> None:
    """The search's alpha and beta come from the shots alone: changing every test patch's
    features and labels leaves them as they are; with one shot a class, no search."""
    from histoalign_wsi.learn.fewshot import TIP_ALPHAS, TIP_BETAS, tip_search

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 30)
    x = unit(np.where(y[:, None] == 0, P, Q) + rng.normal(size=(60, D)) / np.sqrt(D))
    zs = np.zeros((60, 2), np.float32)
    data = FewShotData(x.astype(np.float32), y.astype(np.int64), zs, ("a", "b"))
    tr, te = draw(data.labels, 4, 0, data.classes)
    hp = tip_search(data, tr, seed=0)
    assert hp is not None and hp[0] in TIP_ALPHAS and hp[1] in TIP_BETAS
    other = x.copy()
    other[te] = unit(rng.normal(size=(len(te), D)))
    yy = y.copy()
    yy[te] = 1 - yy[te]
    assert (
        tip_search(FewShotData(other.astype(np.float32), yy.astype(np.int64), zs, ("a", "b")), tr, seed=0)
        == hp
    )
    one, _ = draw(data.labels, 1, 0, data.classes)
    assert tip_search(data, one, seed=0) is None
    rows = few_shot_curves(
        data, shots=[1, 4], repeats=1, seed=0, score=lambda t, p: {"n": len(t)}, search=True
    )
    searched = [r for r in rows if r["method"] == "Tip-Adapter (searched)"]
    assert [r["searched"] for r in searched] == [False, True]
