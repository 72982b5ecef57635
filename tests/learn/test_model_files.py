"""Saved models carry a checksum of their tensors, checked on load; damaged, diverged or
mismatched models and non-finite predictions are refused in one line; no JSON writer
emits NaN (#24 item 1)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from histoalign_wsi.config import load_config
from histoalign_wsi.errors import ConfigError, StoreError
from histoalign_wsi.features.store import open_store
from histoalign_wsi.learn.abmil import ABMILConfig
from histoalign_wsi.learn.bags import BagSource
from histoalign_wsi.learn.contrastive import SlideReportModel
from histoalign_wsi.learn.heads import Head, fit_head
from histoalign_wsi.outputs.metrics import write_json
from histoalign_wsi.zeroshot.prediction import Prediction
from histoalign_wsi.zeroshot.scoring import score_store

from ..planting import D, build_store, make_prediction, make_text, planted_features, unit

CLASSES = ["STR", "TUM"]


def _stores(d: Path, n: int = 8, nan_in: str | None = None) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sid = f"s{i}"
        f = {m: unit(rng.normal(size=(16, D)) + (i % 2)) for m in (0.5, 1.0)}
        out.append(build_store(d / f"{sid}.zarr", f, slide_id=sid))
        if sid == nan_in:
            _poison(out[-1])
    return out


def _poison(store: Path) -> None:
    """One NaN in the finest scale's features, as a damaged store would hold."""
    st = open_store(store)
    arr = zarr.open_array(store / "scales" / st.scale_names[0] / "features" / "demo", mode="r+")
    arr[3, 5] = np.nan


def _poison_path(store: Path) -> Path:
    _poison(store)
    return store


def _head(tmp_path: Path, kind: str = "linear") -> tuple[Head, BagSource, Path]:
    source = BagSource(_stores(tmp_path / "stores"))
    ids = sorted(source.ids)
    y = np.array([i % 2 for i in range(len(ids))], np.int64)
    head = fit_head(kind, source, ids, y, CLASSES, seed=0, epochs=2)
    return head, source, head.save(tmp_path / kind)


def _flip(path: Path, n: int = 64) -> None:
    """Flip ``n`` bytes at the end of the file: inside the tensor data, after the header."""
    blob = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(blob[:8], "little")
    assert len(blob) - n > header
    for i in range(len(blob) - n, len(blob)):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def _rewrite(folder: Path, arrays: dict[str, np.ndarray], **meta: object) -> None:
    """Replace the tensors and forge a matching checksum: only the content checks remain."""
    blob = st_save(arrays)
    (folder / "model.safetensors").write_bytes(blob)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(meta, weights_sha256=hashlib.sha256(blob).hexdigest())
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("kind", ["linear", "abmil"])
def test_damaged_weights_are_refused_by_their_checksum(tmp_path: Path, kind: str) -> None:
    head, source, folder = _head(tmp_path, kind)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    again = Head.load(folder)
    np.testing.assert_array_equal(again.predict(source.bag("s1"))[0], head.predict(source.bag("s1"))[0])
    _flip(folder / "model.safetensors")
    with pytest.raises(ConfigError) as e:
        Head.load(folder)
    assert (
        str(e.value)
        == f"head {str(folder)!r}: model.safetensors does not match its checksum (damaged or altered)"
    )


def test_a_checksum_missing_is_refused(tmp_path: Path) -> None:
    _, _, folder = _head(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="has no weights_sha256"):
        Head.load(folder)


def test_non_finite_weights_are_neither_saved_nor_loaded(tmp_path: Path) -> None:
    head, _, folder = _head(tmp_path)
    assert head.coef is not None
    head.coef[0, 0] = np.nan
    with pytest.raises(ConfigError) as e:
        head.save(tmp_path / "diverged")
    assert (
        str(e.value) == "head 'linear': tensor 'coef' holds non-finite values (training diverged); not saved"
    )
    assert not (tmp_path / "diverged").exists()  # nothing half-written
    arrays = dict(st_load((folder / "model.safetensors").read_bytes()))
    arrays["intercept"] = np.array([np.inf, 0.0])
    _rewrite(folder, arrays)
    with pytest.raises(ConfigError, match="'intercept' holds non-finite values"):
        Head.load(folder)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    _, _, folder = _head(tmp_path / "a")
    _, _, ab = _head(tmp_path / "b", "abmil")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"classes": ["STR", "TUM", "NORM"]}))
    with pytest.raises(ConfigError, match="do not fit 3 classes"):
        Head.load(folder)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        Head.load(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "classes"}))
    with pytest.raises(ConfigError, match=r"config.json is not a head's"):
        Head.load(folder)
    acfg = json.loads((ab / "config.json").read_text())
    acfg["abmil"]["hidden"] = 7  # the weights were trained with another width
    (ab / "config.json").write_text(json.dumps(acfg))
    with pytest.raises(ConfigError, match=r"weights do not fit its config.json .*size mismatch"):
        Head.load(ab)


def test_a_head_reading_another_width_is_refused_before_predicting(tmp_path: Path) -> None:
    head, source, folder = _head(tmp_path)
    assert head.coef is not None and head.intercept is not None
    _rewrite(folder, {"coef": head.coef[:, :-3], "intercept": head.intercept})
    narrow = Head.load(folder)
    with pytest.raises(StoreError, match=f"reads {2 * D - 3}-wide features, the stores give {2 * D}"):
        narrow.check(source)
    head.check(source)  # the right one passes


def test_non_finite_features_give_a_refusal_not_a_nan_prediction(tmp_path: Path) -> None:
    head, _, _ = _head(tmp_path)
    bad = BagSource(_stores(tmp_path / "bad", 2, nan_in="s1"))
    head.predict(bad.bag("s0"))
    # the store is refused as it is read, before any head sees it
    with pytest.raises(StoreError, match=r"s1\.zarr'?: .*holds NaN or infinite values \(damaged store\)"):
        head.predict(bad.bag("s1"))


def test_zero_shot_refuses_a_store_with_nan_features(tmp_path: Path) -> None:
    text = make_text()
    x = planted_features(text, 64, {0: (0.5, 2.0)}, seed=1)
    cfg = load_config(overrides={"scales_mpp": [0.5, 1.0]})
    good = open_store(build_store(tmp_path / "g.zarr", {0.5: x, 1.0: x[:16]}, slide_id="good"))
    assert score_store(good, text, cfg).prediction.status == "ok"
    bad = open_store(
        _poison_path(build_store(tmp_path / "b.zarr", {0.5: x, 1.0: x[:16]}, slide_id="bad one"))
    )
    with pytest.raises(StoreError, match=r"b\.zarr': 0\.50mpp/features/demo: holds NaN or infinite values"):
        score_store(bad, text, cfg)


def test_slide_report_model_is_checked_too(tmp_path: Path) -> None:
    model = SlideReportModel(ABMILConfig(in_dim=8, n_classes=4, n_scales=2))
    model.save(tmp_path / "m", {"note": "x"})
    again, meta = SlideReportModel.load(tmp_path / "m")
    assert meta["note"] == "x"
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), k
    _flip(tmp_path / "m" / "model.safetensors", 16)
    with pytest.raises(ConfigError, match=r"slide-report model .* does not match its checksum"):
        SlideReportModel.load(tmp_path / "m")


def test_json_writers_never_emit_nan(tmp_path: Path) -> None:
    write_json({"auc": float("nan"), "x": [1.0, float("inf")], "y": np.float32("nan")}, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "auc": None,
        "x": [1.0, None],
        "y": None,
    }
    p = make_prediction("s", ["A", "B"], {"A": (1, 2, 3), "B": (4, 5, 6)})
    bad = make_prediction(
        "s", ["A", "B"], {"A": (1, 2, 3), "B": (4, 5, 6)}, probabilities={"A": math.nan, "B": 1.0}
    )
    with pytest.raises(ValueError, match="not JSON compliant"):
        bad.write(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
    (tmp_path / "q.json").write_text(json.dumps(p.to_dict()).replace("0.5", "NaN", 1))
    with pytest.raises(StoreError, match="not valid JSON"):
        Prediction.read(tmp_path / "q.json")


def test_model_files_have_the_same_mode_as_the_other_outputs(tmp_path: Path) -> None:
    _, _, folder = _head(tmp_path)
    modes = {f.name: os.stat(f).st_mode & 0o777 for f in folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


@pytest.mark.parametrize("kind", ["linear", "mlp", "abmil"])
def test_every_kind_of_head_comes_back_as_it_was_saved(tmp_path: Path, kind: str) -> None:
    """Name, kind, classes, scales, encoders and fitted parameters survive the round trip,
    and the loaded head predicts exactly what the fitted one did."""
    if kind == "mlp":  # a distilled student: an MLP on the pooled features
        from histoalign_wsi.learn.distill import DistillSettings, train_mlp

        source = BagSource(_stores(tmp_path / "stores"))
        ids = sorted(source.ids)
        x = np.stack([source.bag(s).pooled() for s in ids])
        y = np.array([i % 2 for i in range(len(ids))], np.int64)
        model = train_mlp(
            x, y, 2, DistillSettings(epochs=3, lr=1e-2, weight_decay=0.0, hidden=8, weight=0.0, seed=0)
        )
        params = {"seed": 0, "distill_weight": 0.5}
        head = Head(
            "mlp", "mlp", tuple(CLASSES), source.scale_names, dict(source.encoders), params, model=model
        )
        folder = head.save(tmp_path / "mlp")
    else:
        head, source, folder = _head(tmp_path, kind)
    back = Head.load(folder)
    fields = ("name", "kind", "classes", "scale_names", "encoders", "params")
    assert {f: getattr(back, f) for f in fields} == {f: getattr(head, f) for f in fields}
    assert back.name == kind and back.classes == tuple(CLASSES) and back.params
    for s in sorted(source.ids)[:3]:
        np.testing.assert_array_equal(back.predict(source.bag(s))[0], head.predict(source.bag(s))[0])


def test_linear_coefficients_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    """One row too many, or an intercept of the wrong length, each alone is refused."""
    head, _, folder = _head(tmp_path)
    assert head.coef is not None and head.intercept is not None
    k = len(CLASSES)
    for coef, intercept in (
        (np.vstack([head.coef, head.coef[:1]]), head.intercept),
        (head.coef, np.append(head.intercept, 0.0)),
    ):
        _rewrite(folder, {"coef": coef, "intercept": intercept})
        with pytest.raises(ConfigError) as e:
            Head.load(folder)
        assert str(e.value) == (
            f"head {str(folder)!r}: its weights do not fit its config.json "
            f"(coefficients {coef.shape} do not fit {k} classes)"
        )
