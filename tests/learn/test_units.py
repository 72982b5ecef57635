"""Exact values of the small learning functions that the mutation run of ``learn/``
found untested: the few-shot feature table, the curve summary, and retrieval in both
directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histoalign_wsi.learn.evaluation import RECALL_AT, retrieval
from histoalign_wsi.learn.fewshot import FewShotData, summarize_curves


def test_few_shot_features_join_encoders_in_name_order_and_renormalise() -> None:
    a = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)  # encoder "b_enc"
    b = np.array([[0.0, 0.0, 2.0], [0.0, 1.0, 0.0]], np.float32)  # encoder "a_enc"
    zs = np.array([[0.1, 0.9], [0.7, 0.3]], np.float64)
    d = FewShotData.from_encoders({"b_enc": a, "a_enc": b}, ["TUM", "STR"], zs, ["STR", "TUM"])
    # a_enc's columns first (sorted names), then each row scaled to unit length
    want = np.array([[0, 0, 2, 3, 4], [0, 1, 0, 1, 0]], np.float64)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert d.features.dtype == np.float32 and d.features.shape == (2, 5)
    np.testing.assert_allclose(d.features, want, atol=1e-7)
    assert d.labels.tolist() == [1, 0] and d.labels.dtype == np.int64
    assert d.zero_shot_logits.dtype == np.float32 and d.classes == ("STR", "TUM")
    np.testing.assert_allclose(d.zero_shot_logits, zs, atol=1e-7)


def test_curve_summary_is_the_mean_and_sd_per_method_and_k_without_missing_values() -> None:
    rows = [
        {"method": "linear probe", "shots": 1, "bacc": 0.5},
        {"method": "linear probe", "shots": 1, "bacc": 0.7},
        {"method": "linear probe", "shots": 1, "bacc": None},  # a draw the metric skipped
        {"method": "linear probe", "shots": 2, "bacc": 0.9},
        {"method": "zero-shot", "shots": 1, "bacc": 0.2},
        {"method": "Tip-Adapter", "shots": 2, "bacc": None},  # no value at all: no row
    ]
    out = summarize_curves(rows, "bacc")
    by = {(r["method"], r["shots"]): r for r in out}
    assert set(by) == {("zero-shot", 1), ("linear probe", 1), ("linear probe", 2)}
    assert by[("linear probe", 1)]["mean"] == pytest.approx(0.6) and by[("linear probe", 1)]["n"] == 2
    assert by[("linear probe", 1)]["sd"] == pytest.approx(0.1)
    assert by[("linear probe", 2)] == {
        "method": "linear probe",
        "shots": 2,
        "mean": 0.9,
        "sd": 0.0,
        "ci_95": [0.9, 0.9],
        "n": 1,
    }
    assert by[("linear probe", 1)]["ci_95"] == pytest.approx([0.505, 0.695])  # the draws' percentiles
    assert by[("zero-shot", 1)]["mean"] == pytest.approx(0.2) and by[("zero-shot", 1)]["n"] == 1
    assert [r["method"] for r in out] == ["zero-shot", "linear probe", "linear probe"]  # METHODS order


def test_retrieval_counts_both_directions_and_chance() -> None:
    """Slide 0 and 1 find their reports; report 2 is closest to slide 0, so the two
    directions differ on it."""
    z = np.eye(3, dtype=np.float32)
    t = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.0, 0.1]], np.float32)
    r = retrieval(z, t, ks=(1, 2))
    # slide->report: row i's match is column i of z @ t.T
    #   slide 2's scores (0, 0, 0.1): its report ranks first
    assert r["slide_to_report"] == {"R@1": 1.0, "R@2": 1.0}
    # report->slide: report 2's scores over slides (0.9, 0, 0.1): its slide ranks second
    assert r["report_to_slide"] == {"R@1": pytest.approx(2 / 3), "R@2": 1.0}
    assert r["n"] == 3 and r["chance"] == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}
    default = retrieval(z, t)
    assert set(default["slide_to_report"]) == {f"R@{k}" for k in RECALL_AT}
    assert default["chance"]["R@5"] == 1.0  # k over n, at most 1


def test_zero_shot_softmax_normalises_each_row() -> None:
    from histoalign_wsi.learn.fewshot import _softmax

    z = np.array([[1.0, 2.0, 3.0], [10.0, 10.0, 10.0]])
    p = _softmax(z)
    want = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, want, atol=1e-7)
    np.testing.assert_allclose(_softmax(np.array([[1000.0, 0.0]])), [[1.0, 0.0]])  # no overflow


def test_few_shot_rows_name_their_draw_sizes_and_only_the_probe_has_c() -> None:
    from histoalign_wsi.learn.fewshot import few_shot_curves
    from histoalign_wsi.stages.learning import scorer

    rng = np.random.default_rng(2)
    y = np.repeat([0, 1, 2], 10).astype(np.int64)
    x = rng.normal(size=(30, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    data = FewShotData(x, y, rng.normal(size=(30, 3)).astype(np.float32), ("a", "b", "c"))
    calls: list[int] = []
    kw = {"shots": [2], "repeats": 3, "seed": 5, "score": scorer(["a", "b", "c"])}
    rows = few_shot_curves(data, **kw, progress=calls.append)  # type: ignore[arg-type]
    assert calls == [1, 1, 1]  # one step per draw
    assert len(rows) == 3 * 3
    for r in rows:
        assert r["n_train"] == 6 and r["n_test"] == 24 and r["shots"] == 2
        assert ("C" in r) == (r["method"] == "linear probe")
    assert rows == few_shot_curves(data, **kw)  # type: ignore[arg-type]  # seeded: the same again


def test_a_group_sheet_missing_patches_names_the_sheet_and_the_first_five(tmp_path: Path) -> None:
    """The refusal names the sheet and the first five patches without a patient, then
    '...' when there are more; five or fewer are listed whole, without '...'."""
    from histoalign_wsi.errors import ConfigError
    from histoalign_wsi.learn.groups import patch_groups

    root = tmp_path / "p"
    (root / "TUM").mkdir(parents=True)
    paths = [root / "TUM" / f"{i}.png" for i in range(7)]
    sheet = tmp_path / "groups.csv"
    sheet.write_text("path,patient_id\nTUM/0.png,P1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        patch_groups(paths, root, sheet=sheet)
    assert str(e.value) == (
        f"patch group sheet {str(sheet)!r} gives no patient_id for 6 patch(es): "
        "TUM/1.png, TUM/2.png, TUM/3.png, TUM/4.png, TUM/5.png ..."
    )
    with pytest.raises(ConfigError) as e:
        patch_groups(paths[:3], root, sheet=sheet)
    assert str(e.value).endswith("for 2 patch(es): TUM/1.png, TUM/2.png")
    bad = tmp_path / "bad.csv"
    bad.write_bytes("path,patient_id\nTUM/0.png,Pé\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^patch group sheet '.*bad\.csv' is not UTF-8"):
        patch_groups(paths[:1], root, sheet=bad)


def test_attention_mil_training_with_its_defaults_is_stable(tmp_path: Path) -> None:
    """The attention MIL with its default optimiser settings (the ones `fit` uses) on an
    easy planted task: the inner validation loss starts near log 2, never leaves the
    neighbourhood of chance, and falls. A learning rate a thousand times too large still
    separates this easy task, but its validation loss jumps to the hundreds."""
    import math

    from histoalign_wsi.learn.abmil import ABMILConfig, train_abmil
    from histoalign_wsi.learn.bags import BagSource

    from ..planting import D, build_store, unit

    rng = np.random.default_rng(0)
    v = unit(rng.normal(size=D))
    paths, y = [], []
    for i in range(16):
        f = rng.normal(size=(24, D))
        f[:6] += (3 if i % 2 else -3) * v  # a quarter of the tiles carry the class
        fine, coarse = unit(f), unit(rng.normal(size=(6, D)))
        paths.append(build_store(tmp_path / f"s{i}.zarr", {0.5: fine, 1.0: coarse}, slide_id=f"s{i}"))
        y.append(i % 2)
    source = BagSource(paths)
    _, hist = train_abmil(
        source,
        [f"s{i}" for i in range(12)],
        y[:12],
        ABMILConfig(in_dim=D, n_classes=2, n_scales=2),
        epochs=20,
    )
    losses = hist["val_losses"]
    assert abs(losses[0] - math.log(2)) < 0.15, losses[:3]
    assert max(losses) < 2 * math.log(2), max(losses)
    assert losses[-1] < losses[0] - 0.03, (losses[0], losses[-1])


def test_each_grouping_says_what_it_used(tmp_path: Path) -> None:
    """`summary.json` reports the grouping: each way of finding the patient says so in
    its own words, and a file name an explicit pattern misses is refused, naming both."""
    from histoalign_wsi.errors import ConfigError
    from histoalign_wsi.learn.groups import patch_groups

    root = tmp_path / "p"
    (root / "B").mkdir(parents=True)
    bh = [root / "B" / f"SOB_B_A-14-22549AB-40-00{i}.png" for i in (1, 2)]
    plain = [root / "B" / "P1_a.png", root / "B" / "P2_b.png"]
    sheet = tmp_path / "groups.csv"
    sheet.write_text("path,patient_id\nB/P1_a.png,x\nB/P2_b.png,y\n", encoding="utf-8")
    cases = [
        (patch_groups(plain, root, sheet=sheet), "patient (sheet groups.csv)", 2),
        (patch_groups(plain, root, pattern="none"), "patch (no grouping)", None),
        (patch_groups(bh, root), "patient (BreakHis file names)", 1),
        (patch_groups(plain, root), "patch (no patient key found: each patch is its own group)", None),
        (patch_groups([], root), "patch (no patient key found: each patch is its own group)", None),
        (patch_groups(bh, root, pattern="breakhis"), "patient (BreakHis file names)", 1),
        (patch_groups(plain, root, pattern=r"^(P\d)_"), "patient (file-name pattern '^(P\\\\d)_')", 2),
    ]
    for g, by, n in cases:
        assert g.summary() == {"by": by, "n_groups": n}
    with pytest.raises(ConfigError, match=r"^patch 'P1_a\.png' does not match the group pattern 'breakhis'$"):
        patch_groups(plain, root, pattern="breakhis")
    sheet.write_text("path,patient_id\n", encoding="utf-8")
    five = [root / "B" / f"{i}.png" for i in range(5)]
    with pytest.raises(ConfigError) as e:
        patch_groups(five, root, sheet=sheet)
    assert str(e.value).endswith("for 5 patch(es): B/0.png, B/1.png, B/2.png, B/3.png, B/4.png")


def test_the_report_model_starts_at_its_temperature_and_clamps_the_scale(tmp_path: Path) -> None:
    """CLIP's learnable temperature: the logit scale starts at 1 / temperature, is capped
    at 100, and the saved config records the scale reached."""
    import math

    import torch

    from histoalign_wsi.learn.abmil import ABMILConfig
    from histoalign_wsi.learn.contrastive import SlideReportModel

    cfg = ABMILConfig(in_dim=8, n_classes=4, n_scales=2)
    assert float(SlideReportModel(cfg, temperature=0.07).scale()) == pytest.approx(1 / 0.07, rel=1e-5)
    assert float(SlideReportModel(cfg, temperature=0.5).scale()) == pytest.approx(2.0, rel=1e-5)
    model = SlideReportModel(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert float(model.scale()) == pytest.approx(100.0)
    model.save(tmp_path / "m", {})
    _, meta = SlideReportModel.load(tmp_path / "m")
    assert meta["logit_scale"] == pytest.approx(100.0) and meta["abmil"]["in_dim"] == 8


class _MemorySource:
    """A BagSource in memory: slide ``s{i}``'s tiles at two scales."""

    def __init__(self, bags: dict[str, np.ndarray], dim: int) -> None:
        from histoalign_wsi.learn.bags import Bag

        self.dim, self.scale_names = dim, ("0.50mpp", "1.00mpp")
        self.bags = {
            s: Bag(s, f, np.arange(len(f)) % 2, np.zeros((len(f), 2), np.int32), self.scale_names)
            for s, f in bags.items()
        }

    def bag(self, slide_id: str):  # type: ignore[no-untyped-def]
        return self.bags[slide_id]


def _report_task(n: int, dim: int = 12, text_dim: int = 6) -> tuple[_MemorySource, dict[str, np.ndarray]]:
    """Slides whose report embedding is a fixed projection of their mean tile: learnable."""
    rng = np.random.default_rng(3)
    proj = rng.normal(size=(dim, text_dim))
    bags = {f"s{i}": rng.normal(size=(10, dim)).astype(np.float32) for i in range(n)}
    text = {}
    for s, f in bags.items():
        t = f.mean(axis=0) @ proj
        text[s] = (t / np.linalg.norm(t)).astype(np.float32)
    return _MemorySource(bags, dim), text


def test_contrastive_training_batches_records_and_keeps_its_best_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batches of ``batch_size`` slides (a lone last slide skipped: InfoNCE needs a
    negative), the history's train loss the mean of the epoch's batch losses, the model
    built with the settings' width and scale embedding, early stopping after
    ``patience`` epochs without improvement, and the best epoch's weights returned."""
    import math

    import torch

    from histoalign_wsi.learn import contrastive
    from histoalign_wsi.learn.contrastive import ContrastiveSettings, train_contrastive

    source, text = _report_task(8)
    calls: list[tuple[int, float]] = []
    real = contrastive.info_nce

    def spy(z: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        loss = real(z, t, scale)
        calls.append((len(z), float(loss.detach())))
        return loss

    monkeypatch.setattr(contrastive, "info_nce", spy)
    settings = ContrastiveSettings(
        epochs=60, batch_size=2, lr=3e-2, weight_decay=0.0, patience=2, hidden=16, temperature=0.1, seed=0
    )
    train, val = [f"s{i}" for i in range(5)], ["s5", "s6", "s7"]
    model, hist = train_contrastive(source, train, val, text, settings)  # type: ignore[arg-type]
    epochs = hist["epochs"]
    assert [n for n, _ in calls] == [2, 2, 3] * epochs  # two batches of two, then validation
    for e in range(epochs):
        assert hist["train_loss"][e] == pytest.approx(np.mean([calls[3 * e][1], calls[3 * e + 1][1]]))
        assert hist["val_loss"][e] == pytest.approx(calls[3 * e + 2][1])
    assert model.mil.cfg.hidden == 16 and model.mil.cfg.scale_embedding is True
    # it learned, stopped early, and kept the best epoch
    assert min(hist["val_loss"]) < hist["val_loss"][0] - 0.05 and epochs < settings.epochs
    assert hist["best_val_loss"] == min(hist["val_loss"])
    assert min(hist["val_loss"][-settings.patience :]) >= hist["best_val_loss"] - 1e-4
    calls.clear()
    assert contrastive._val_loss(model, source, val, torch.from_numpy(np.stack([text[s] for s in val]))) == (
        pytest.approx(hist["best_val_loss"], abs=1e-6)
    )
    ablation, _ = train_contrastive(source, train, val, text, settings, scale_embedding=False)  # type: ignore[arg-type]
    assert ablation.mil.cfg.scale_embedding is False and ablation.mil.cfg.hidden == 16
    # nothing to learn (learning rate 0): no improvement after the first epoch, so it
    # stops after exactly 1 + patience epochs
    import dataclasses

    _, flat = train_contrastive(source, train, val, text, dataclasses.replace(settings, lr=0.0))  # type: ignore[arg-type]
    assert flat["epochs"] == 1 + settings.patience
    # one training slide: every batch is a lone slide, so no step is taken and the train
    # loss is recorded as missing (NaN), not as an error
    _, lone = train_contrastive(source, ["s0"], val, text, settings)  # type: ignore[arg-type]
    assert all(math.isnan(v) for v in lone["train_loss"])


def test_a_slide_report_model_whose_config_is_broken_is_refused_naming_it(tmp_path: Path) -> None:
    """No 'abmil' in config.json, or weights of another width: one line naming the
    folder, with torch's explanation (whitespace folded, first 300 characters)."""
    import json

    import torch

    from histoalign_wsi.errors import ConfigError
    from histoalign_wsi.learn.abmil import ABMILConfig
    from histoalign_wsi.learn.contrastive import SlideReportModel

    folder = SlideReportModel(ABMILConfig(in_dim=8, n_classes=4, n_scales=2, hidden=8)).save(
        tmp_path / "m", {}
    )
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "abmil"}))
    with pytest.raises(ConfigError) as e:
        SlideReportModel.load(folder)
    assert str(e.value) == f"slide-report model {str(folder)!r}: config.json has no valid 'abmil' ('abmil')"
    wide = dict(cfg["abmil"], hidden=16)
    (folder / "config.json").write_text(json.dumps(cfg | {"abmil": wide}))
    with pytest.raises(RuntimeError) as torch_says:
        state = SlideReportModel(ABMILConfig(**cfg["abmil"])).state_dict()
        SlideReportModel(ABMILConfig(**wide)).load_state_dict(
            {k: torch.as_tensor(v) for k, v in state.items()}
        )
    detail = " ".join(str(torch_says.value).split())
    assert len(detail) > 300 and "size mismatch" in detail
    with pytest.raises(ConfigError) as e:
        SlideReportModel.load(folder)
    assert str(e.value) == (
        f"slide-report model {str(folder)!r}: weights do not fit config.json ({detail[:300]})"
    )


def _labelled_source(n_patients: int = 6) -> tuple[_MemorySource, list[str], dict[str, str], dict[str, str]]:
    """Two slides per patient, classes A and B by patient, a class signal in the tiles."""
    rng = np.random.default_rng(4)
    bags, labels, patients = {}, {}, {}
    for p in range(n_patients):
        for k in range(2):
            s = f"p{p}s{k}"
            bags[s] = (rng.normal(size=(8, 12)) + (1.5 if p % 2 else -1.5)).astype(np.float32)
            labels[s], patients[s] = ("B" if p % 2 else "A"), f"P{p}"
    source = _MemorySource(bags, 12)
    source.encoders = {"demo": {}}  # type: ignore[attr-defined]
    return source, list(bags), labels, patients


def test_cross_validation_folds_seeds_groups_and_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The folds are scikit-learn's StratifiedGroupKFold at the given seed; each fold's
    head is fitted with seed + fold, the given epochs and its training slides' patients
    (its inner early-stopping split groups by them too); the spread is the standard
    deviation over folds, each metric's mean and spread skip folds where it is undefined."""
    from sklearn.model_selection import StratifiedGroupKFold

    from histoalign_wsi.learn import heads

    source, ids, labels, patients = _labelled_source(10)  # uneven folds: the seed decides
    fits: list[dict[str, object]] = []
    real = heads.fit_head

    def spy(kind, src, train, y, classes, **kw):  # type: ignore[no-untyped-def]
        fits.append({"train": list(train), **kw})
        return real(kind, src, train, y, classes, **kw)

    monkeypatch.setattr(heads, "fit_head", spy)

    from histoalign_wsi.stages.learning import scorer

    args = (source, ids, labels, ["A", "B"])
    kw = {"heads": ["linear"], "folds": 3, "seed": 5, "epochs": 7, "score": scorer(["A", "B"])}
    out = heads.cross_validate(*args, **kw, groups=patients)  # type: ignore[arg-type]
    y = [0 if labels[s] == "A" else 1 for s in ids]
    expected = StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=5).split(
        np.zeros(len(ids)), y, [patients[s] for s in ids]
    )
    for f, ((tr, te), fit, fold) in enumerate(zip(expected, fits, out["linear"]["folds"], strict=True)):
        assert fold["slides"] == [ids[i] for i in te] and fit["train"] == [ids[i] for i in tr]
        assert fit["seed"] == 5 + f and fit["epochs"] == 7
        assert fit["groups"] == [patients[ids[i]] for i in tr]
    for k in ("accuracy", "balanced_accuracy", "macro_f1"):
        values = [m[k] for m in out["linear"]["folds"]]
        assert out["linear"]["mean"][k] == pytest.approx(np.mean(values))
        assert out["linear"]["sd"][k] == pytest.approx(np.std(values))
    assert heads._mean([None, None]) is None and heads._sd([None]) is None
    assert heads._mean([1.0, None, 3.0]) == 2.0 and heads._sd([1.0, None, 3.0]) == 1.0
    fits.clear()
    heads.cross_validate(*args, **kw)  # type: ignore[arg-type]
    assert all(fit["groups"] is None for fit in fits)  # no patients given: slides are the groups


def test_cross_validation_refuses_too_many_folds_in_its_own_units() -> None:
    """As many folds as the rarest class has patients (or slides) is allowed; one more,
    or fewer than two, is refused in one line that counts in the unit that was grouped."""
    from histoalign_wsi.errors import ConfigError
    from histoalign_wsi.learn.heads import cross_validate
    from histoalign_wsi.stages.learning import scorer

    source, ids, labels, patients = _labelled_source()

    def run(folds: int, groups: dict[str, str] | None) -> None:
        cross_validate(
            source,
            ids,
            labels,
            ["A", "B"],
            heads=["linear"],
            folds=folds,
            seed=0,
            epochs=3,
            score=scorer(["A", "B"]),
            groups=groups,
        )

    run(3, patients)  # three patients of each class: three folds fit
    with pytest.raises(ConfigError) as e:
        run(4, patients)
    assert str(e.value) == (
        "4-fold cross-validation needs at least 4 patients of every class (and folds >= 2); "
        "class 'A' has 3 (lower 'folds' or add patients)"
    )
    with pytest.raises(ConfigError) as e:
        run(7, None)
    assert str(e.value) == (
        "7-fold cross-validation needs at least 7 slides of every class (and folds >= 2); "
        "class 'A' has 6 (lower 'folds' or add slides)"
    )
    with pytest.raises(ConfigError, match=r"^1-fold cross-validation needs at least 2 slides of every class"):
        run(1, None)


def test_a_broken_head_folder_is_refused_naming_the_head(tmp_path: Path) -> None:
    """Every refusal of a saved head names it as a head, with its folder."""
    import json

    from histoalign_wsi.errors import ConfigError
    from histoalign_wsi.learn.heads import Head, fit_head

    source, ids, labels, _ = _labelled_source()
    y = np.array([0 if labels[s] == "A" else 1 for s in ids])
    folder = fit_head("linear", source, ids, y, ["A", "B"], seed=0, epochs=3).save(tmp_path / "h")  # type: ignore[arg-type]
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text("[]")
    with pytest.raises(ConfigError) as e:
        Head.load(folder)
    assert str(e.value) == f"head {str(folder)!r}: config.json is not a JSON object"
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "classes"}))
    with pytest.raises(ConfigError) as e:
        Head.load(folder)
    assert str(e.value) == f"head {str(folder)!r}: config.json is not a head's (KeyError: 'classes')"
    # a config without parameters (written by hand, or by an older version) loads, with none
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "params"}))
    assert Head.load(folder).params == {}
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError) as e:
        Head.load(folder)
    assert str(e.value) == f"{str(folder)!r} is not a saved head (no config.json)"


def test_attention_mil_stops_after_patience_epochs_without_improvement() -> None:
    """With nothing to learn (learning rate 0) the inner loss never improves after the
    first epoch, so training stops after exactly 1 + ``patience`` epochs."""
    from histoalign_wsi.learn.abmil import ABMILConfig, train_abmil

    source, ids, labels, patients = _labelled_source()
    y = [0 if labels[s] == "A" else 1 for s in ids]
    cfg = ABMILConfig(in_dim=12, n_classes=2, n_scales=2, hidden=8)
    for patience in (1, 3):
        _, hist = train_abmil(
            source,  # type: ignore[arg-type]
            ids,
            y,
            cfg,
            epochs=20,
            lr=0.0,
            weight_decay=0.0,
            patience=patience,
            groups=[patients[s] for s in ids],
        )
        assert hist["epochs"] == 1 + patience
        assert len(set(hist["val_losses"])) == 1  # type: ignore[arg-type]


def test_fit_head_passes_its_seed_patients_and_ablation_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """``abmil`` has the scale embedding and ``abmil_noscale`` not; the attention MIL gets
    the seed and the patients (its early-stopping split keeps them together); the linear
    head's cross-validation gets the seed, and the chosen C is recorded."""
    from histoalign_wsi.learn import heads

    source, ids, labels, patients = _labelled_source()
    y = np.array([0 if labels[s] == "A" else 1 for s in ids])
    seen: list[dict[str, object]] = []
    real_abmil, real_linear = heads.train_abmil, heads.fit_linear_full

    def abmil_spy(src, slide_ids, yy, cfg, **kw):  # type: ignore[no-untyped-def]
        seen.append({"cfg": cfg, **kw})
        return real_abmil(src, slide_ids, yy, cfg, **kw)

    def linear_spy(x, yy, k, **kw):  # type: ignore[no-untyped-def]
        seen.append(kw)
        return real_linear(x, yy, k, **kw)

    monkeypatch.setattr(heads, "train_abmil", abmil_spy)
    monkeypatch.setattr(heads, "fit_linear_full", linear_spy)
    groups = [patients[s] for s in ids]
    for name, embedding in (("abmil", True), ("abmil_noscale", False)):
        seen.clear()
        head = heads.fit_head(name, source, ids, y, ["A", "B"], seed=11, epochs=2, groups=groups)  # type: ignore[arg-type]
        assert head.model is not None and head.model.cfg.scale_embedding is embedding
        assert seen[0]["seed"] == 11 and seen[0]["groups"] == groups and seen[0]["epochs"] == 2
        assert (head.name, head.kind, head.classes) == (name, "abmil", ("A", "B"))
        assert head.scale_names == source.scale_names and head.encoders == source.encoders
        assert set(head.params) == {"seed", "epochs", "best_val_loss", "n_val"} and head.params["seed"] == 11
    seen.clear()
    linear = heads.fit_head("linear", source, ids, y, ["A", "B"], seed=11, epochs=2)  # type: ignore[arg-type]
    assert seen == [{"seed": 11}]
    assert set(linear.params) == {"C"} and linear.params["C"] in heads._CS


def test_linear_probabilities_are_a_stable_row_softmax() -> None:
    """Each row's softmax of x coef^T + intercept, in float32, exact to float precision
    even for logits in the hundreds (shifted by each row's own maximum); sklearn's
    one-row binary form gives [1 - p, p]."""
    from histoalign_wsi.learn.heads import linear_probs

    x = np.array([[3.0, 1.0], [-2.0, -1.5]], np.float32)
    coef = np.array([[300.0, 0.0], [299.0, 1.0], [0.0, 0.0]])
    intercept = np.array([0.0, 0.5, -1.0])
    got = linear_probs(coef, intercept, x, 3)
    z = x.astype(np.float64) @ coef.T + intercept  # row 0 near +900, row 1 near -600
    want = np.exp(z - z.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    binary = linear_probs(np.array([[1.0, -2.0]]), np.array([0.5]), x, 2)
    p = 1 / (1 + np.exp(-(x.astype(np.float64) @ np.array([1.0, -2.0]) + 0.5)))
    np.testing.assert_allclose(binary, np.stack([1 - p, p], axis=1), rtol=1e-6)


def test_linear_regularisation_is_chosen_by_log_loss_cross_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """C comes from a grid search scored by log loss over stratified folds (at most five,
    at most the rarest class's count); with a single example of some class there is no
    search and C is 1, the coefficients those of a plain C = 1 fit."""
    import sklearn.model_selection as ms
    from sklearn.linear_model import LogisticRegression

    from histoalign_wsi.learn.heads import fit_linear

    searches: list[dict[str, object]] = []
    real = ms.GridSearchCV

    def spy(est, grid, **kw):  # type: ignore[no-untyped-def]
        searches.append({"folds": kw["cv"].get_n_splits(), "scoring": kw["scoring"], "C": grid["C"]})
        return real(est, grid, **kw)

    monkeypatch.setattr(ms, "GridSearchCV", spy)
    rng = np.random.default_rng(0)
    for per_class, folds in ((2, 2), (7, 5)):
        y = np.repeat([0, 1], per_class)
        x = (rng.normal(size=(len(y), 4)) + y[:, None]).astype(np.float32)
        searches.clear()
        _, _, c = fit_linear(x, y, seed=0)
        assert searches == [{"folds": folds, "scoring": "neg_log_loss", "C": [0.01, 0.1, 1.0, 10.0, 100.0]}]
        assert c in searches[0]["C"]  # type: ignore[operator]
    y = np.array([0, 0, 0, 1, 1, 1, 2])
    x = (rng.normal(size=(7, 4)) + y[:, None]).astype(np.float32)
    searches.clear()
    coef, intercept, c = fit_linear(x, y, seed=0)
    plain = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
    assert searches == [] and c == 1.0
    np.testing.assert_allclose(coef, plain.coef_)
    np.testing.assert_allclose(intercept, plain.intercept_)


def test_a_bags_pooled_feature_is_each_scales_mean_in_scale_order() -> None:
    """What the linear head reads, computed by hand: the mean (not the max, not the sum)
    of each scale's rows, scales in order, zeros for a scale without tiles."""
    from histoalign_wsi.learn.bags import Bag

    f = np.array([[1.0, 0.0], [3.0, 2.0], [-1.0, 4.0], [0.5, 0.5]], np.float32)
    bag = Bag("s", f, np.array([0, 0, 2, 0], np.int64), np.zeros((4, 2), np.int32), ("a", "b", "c"))
    np.testing.assert_allclose(bag.pooled(), [1.5, 2.5 / 3, 0.0, 0.0, -1.0, 4.0], rtol=1e-6)
