"""The stages that learn from labels on stored features: few-shot curves on patches,
slide-level heads (fit, cross-validated), and predictions with a saved head."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._atomic import atomic_file
from ..config import Config
from ..errors import ConfigError
from ..outputs.intervals import format_ci
from ..sites import sites_for
from ..slides.cohort import read_labels, read_patients

__all__ = ["run_fit", "run_predict", "scorer"]

log = logging.getLogger(__name__)


def scorer(classes: Sequence[str], *, boot: Any = None) -> Any:
    """Metrics of held-out probabilities (given to the learning code, which must not
    import the outputs stage); with ``boot`` (a :class:`Bootstrap`) each carries its
    interval (``ci``), resampling ``groups`` (a patient per row) when given, else rows."""
    from ..outputs.intervals import with_intervals
    from ..outputs.metrics import classification_metrics

    keys = ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro_ovr")

    def score(
        y_true: Sequence[str], probs: NDArray[np.float32], groups: Sequence[str] | None = None
    ) -> dict[str, Any]:
        pred = [classes[k] for k in probs.argmax(axis=1)]
        p64 = probs.astype(np.float64)
        m = classification_metrics(list(y_true), pred, p64, classes)
        out = {k: m[k] for k in ("n", *keys)}
        if boot is not None:
            ci = with_intervals(list(y_true), pred, p64, classes, groups=groups, boot=boot, metrics=keys)
            out["ci"] = ci["ci"]
        return out

    return score


def run_fit(
    stores: Sequence[Path],
    labels_sheet: Path | None,
    out: Path,
    cfg: Config,
    *,
    heads: Sequence[str] | None = None,
    folds: int | None = None,
    seed: int | None = None,
    epochs: int | None = None,
    attention_dir: Path | None = None,
    cv_kind: str | None = None,
) -> dict[str, Any]:
    """Cross-validate the heads, then train each on every labelled slide and save it to
    ``out/{head}/`` (safetensors + JSON); ``out/cv_metrics.json`` holds per-fold and mean
    metrics; the attention of the ``abmil`` head per tile goes to ``attention_dir``.
    Options left ``None`` come from the configuration (``labels``, ``heads``, ``fit``).
    ``cv_kind`` ``site`` holds out whole sites (``fit.cv``); every head's pooled
    out-of-fold metrics carry bootstrap intervals, and a per-site table when sites are
    known."""
    sheet = labels_sheet or (Path(cfg.labels) if cfg.labels else None)
    if sheet is None:
        raise ConfigError("fit needs a label sheet: give --labels or set labels in the configuration")
    heads = list(heads or cfg.heads)
    if not heads:
        raise ConfigError(
            "no heads to fit: give --heads or set heads (e.g. [linear, abmil]) in the configuration"
        )
    folds = folds or cfg.fit.folds
    seed = cfg.fit.seed if seed is None else seed
    epochs = epochs or cfg.fit.epochs
    from .._progress import Progress
    from ..learn.bags import BagSource, match_labels
    from ..learn.heads import HEADS, cross_validate, fit_head
    from ..outputs.metrics import write_json
    from ..zeroshot.prompts import load_bag

    unknown = sorted(set(heads) - set(HEADS))
    if unknown:
        raise ConfigError(f"unknown heads {unknown} (choose {', '.join(HEADS)})")
    names = list(dict.fromkeys([*heads, *(["abmil_noscale"] if "abmil" in heads else [])]))
    source = BagSource(stores)
    labels = read_labels(sheet)
    groups = read_patients(sheet)
    bag_classes = load_bag(cfg.prompt_bag).decision_classes
    ids = match_labels(labels, source.ids, classes=bag_classes)
    classes = [c for c in bag_classes if c in {labels[s] for s in ids}]
    cv_kind = cv_kind or cfg.fit.cv
    key = sites_for(source.ids, slides=cfg.slides, labels=sheet, pattern=cfg.site_pattern)
    n_folds = folds
    if cv_kind == "site" and key is not None:
        n_sites = len({key.sites[s] for s in ids})
        n_folds = n_sites if n_sites <= folds else folds
    with Progress(n_folds * len(names) + len(names), desc="fit", unit="model") as bar:
        cv = cross_validate(
            source,
            ids,
            labels,
            classes,
            heads=names,
            folds=folds,
            seed=seed,
            epochs=epochs,
            score=scorer(classes),
            groups=groups,
            progress=bar.update,
            cv=cv_kind,
            sites=key.sites if key is not None else None,
        )
        split = cv.pop("split")
        pooled = _pooled(cv, ids, labels, classes, groups, key, cfg)
        y = np.array([classes.index(labels[s]) for s in ids], np.int64)
        for name in names:
            head = fit_head(
                name,
                source,
                ids,
                y,
                classes,
                seed=seed,
                epochs=epochs,
                groups=[groups.get(s, s) for s in ids] if groups else None,
            )
            head.save(out / name)
            if name == "abmil" and attention_dir is not None:
                _write_attention(head, source, attention_dir)
            bar.update()
    if attention_dir is not None:  # the workflow's output folder, empty without an abmil head
        attention_dir.mkdir(parents=True, exist_ok=True)
    from ..features.store import open_store
    from ..provenance import HashCache, digest, make_record

    opened = [open_store(p) for p in stores]
    made_from = sorted(digest(st.attrs.get("provenance")) for st in opened)
    inputs = {"features": digest(made_from), "labels": HashCache().sha256(sheet)}
    report = {
        "classes": classes,
        "n_slides": len(ids),
        "folds": folds,
        "seed": seed,
        "grouped": groups is not None,
        "split": split,
        "sites": key.summary() if key is not None else None,
        "heads": cv,
        "pooled": pooled,
        "untrained": any(bool(st.attrs.get("untrained")) for st in opened),
        "provenance": make_record(
            "fit",
            cfg,
            inputs | {"heads": names, "folds": folds, "seed": seed, "epochs": epochs, "cv": cv_kind},
        ),
    }
    write_json(report, out / "cv_metrics.json")
    for name in names:
        p = pooled[name]
        log.info(
            "%s: balanced accuracy %s (out-of-fold, %s; mean of folds %s)",
            name,
            format_ci(p["balanced_accuracy"], p["ci"]["balanced_accuracy"]),
            split["by"],
            cv[name]["mean"]["balanced_accuracy"],
        )
    return report


def _pooled(
    cv: dict[str, Any],
    ids: Sequence[str],
    labels: dict[str, str],
    classes: Sequence[str],
    patients: dict[str, str] | None,
    key: Any,
    cfg: Config,
) -> dict[str, Any]:
    """Each head's metrics over all out-of-fold predictions, with bootstrap intervals
    (patients resampled when known), and its per-site table when sites are known."""
    from ..outputs.intervals import Bootstrap, group_table, units_of, with_intervals

    boot = Bootstrap(cfg.bootstrap.resamples, cfg.bootstrap.seed)
    units, unit = units_of(ids, patients)
    yt = [labels[s] for s in ids]
    out: dict[str, Any] = {}
    for name, res in cv.items():
        probs = np.array([res["oof"][s] for s in ids], np.float64)
        yp = [classes[k] for k in probs.argmax(axis=1)]
        m = with_intervals(yt, yp, probs, classes, groups=units, boot=boot)
        m["bootstrap"] = boot.describe(unit, len(set(units)))
        if key is not None:
            by = [key.sites[s] for s in ids]
            m["per_site"] = group_table(yt, yp, probs, classes, by, groups=units, boot=boot)
        out[name] = m
    return out


def _write_attention(head: Any, source: Any, folder: Path) -> None:
    """Per tile (every scale) of every slide: the head's attention, as parquet."""
    import pandas as pd  # lazily: the CLI's start-up stays light

    for sid in source.ids:
        bag = source.bag(sid)
        _, att = head.predict(bag)
        scales = np.array(bag.scale_names)[bag.scale] if len(bag.scale) else np.array([], str)
        df = pd.DataFrame({"scale": scales, "x": bag.coords[:, 0], "y": bag.coords[:, 1], "attention": att})
        with atomic_file(folder / f"{sid}.parquet") as tmp:
            df.to_parquet(tmp, index=False)


def run_predict(stores: Sequence[Path], head_dir: Path, out: Path, cfg: Config) -> Path:
    """Predictions of a saved head for new slides' stores: ``out/predictions/{slide}.json``
    and ``out/predictions.csv``, in the zero-shot formats, the method named."""
    from ..learn.bags import BagSource
    from ..learn.heads import Head
    from ..outputs.predictions import summarize
    from ..zeroshot.prediction import Prediction
    from ..zeroshot.prompts import load_bag

    head = Head.load(head_dir)
    source = BagSource(stores)
    head.check(source)
    colors = load_bag(cfg.prompt_bag).colors()
    preds = []
    for sid in source.ids:
        bag = source.bag(sid)
        probs, att = head.predict(bag)
        ok = len(bag.features) > 0
        top = []
        if att is not None and len(att):
            for i in np.argsort(-att)[: cfg.pooling.top_tiles]:
                x, y = (int(v) for v in bag.coords[i])
                top.append(
                    {"scale": bag.scale_names[bag.scale[i]], "x": x, "y": y, "attention": float(att[i])}
                )
        p = Prediction(
            slide_id=sid,
            slide_path=str(source.path_of(sid)),
            classes=head.classes,
            colors={c: colors.get(c, (128, 128, 128)) for c in head.classes},
            status="ok" if ok else "no_tissue",
            predicted_class=head.classes[int(np.argmax(probs))] if ok else "no tissue",
            probabilities=dict(zip(head.classes, map(float, probs), strict=True)) if ok else None,
            prompt_bag={"name": cfg.prompt_bag, "hash": ""},
            encoders=[{"name": n, **v} for n, v in head.encoders.items()],
            untrained=source.untrained,
            alignment={"head": head.name},
            pooling={"method": head.kind},
            calibrated=False,
            per_scale={s: {"n_tiles": int((bag.scale == i).sum())} for i, s in enumerate(bag.scale_names)},
            top_tiles=top,
            method=head.name,
        )
        preds.append(p)
        p.write(out / "predictions" / f"{sid}.json")
    summarize(preds, out / "predictions.csv")
    return out / "predictions.csv"
