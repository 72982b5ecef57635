"""The stages that learn from pathology reports: slide-report contrastive training with
its evaluations (``train-reports``), pairing images with an unpaired report corpus
(``pair-reports``) and distilling the paired text into a vision-only classifier
(``distill``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..config import Config
from ..errors import ConfigError, StoreError
from .learning import scorer

__all__ = ["report_encoder", "run_train_reports", "shuffled_pairs"]

log = logging.getLogger(__name__)

#: the two slide-report models trained side by side: name -> scale embeddings on?
VARIANTS = {"scale_aware": True, "no_scale": False}


def report_encoder(cfg: Config, store_encoders: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    """The encoder whose text tower embeds reports (``report_encoder``, else the first of
    ``encoders``), checked against the weights the stores were encoded with."""
    from ..features.adapters import load_encoder, resolve_device
    from ..features.registry import get_entry, load_registry

    name = cfg.report_encoder or cfg.encoders[0]
    if store_encoders is not None and name not in store_encoders:
        raise StoreError(
            f"report encoder {name!r} is not among the stores' encoders ({', '.join(store_encoders)}); "
            "set report_encoder to one of them"
        )
    enc = load_encoder(
        get_entry(name, load_registry(cfg.encoder_registry)),
        offline=cfg.offline,
        device=resolve_device(cfg.device),
    )
    if store_encoders is not None:
        want = store_encoders[name].get("weights_sha256")
        if want and want != enc.weights_sha256:
            raise StoreError(
                f"the stores were encoded with {name} weights {str(want)[:24]}..., but the configured "
                f"{name} weights are {enc.weights_sha256[:24]}...; text and images must share one model"
            )
    return enc


def encoder_columns(source: Any, name: str) -> slice:
    """Where encoder ``name``'s features sit in a bag's concatenated feature rows."""
    start = 0
    for n, d in source.dims.items():
        if n == name:
            return slice(start, start + d)
        start += d
    raise StoreError(f"the stores hold no features of encoder {name!r}")


def _labels(sheet_labels: Mapping[str, str], labels_sheet: Path | None) -> dict[str, str]:
    from ..slides.cohort import read_labels

    out = dict(sheet_labels)
    if labels_sheet is not None:
        out.update(read_labels(labels_sheet))
    return out


def _with_ci(r: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Retrieval with each Recall@K's bootstrap interval over the test slides (``ci``)."""
    from ..outputs.intervals import Bootstrap, proportion_ci

    boot = Bootstrap(cfg.bootstrap.resamples, cfg.bootstrap.seed)
    hits = r.pop("hits")
    r["ci"] = {d: {k: proportion_ci(v.tolist(), boot=boot) for k, v in h.items()} for d, h in hits.items()}
    return r


def _split_groups(
    cfg: Config, split_by: str, ids: Sequence[str], patients: Mapping[str, str], labels_sheet: Path | None
) -> dict[str, str]:
    """What a split keeps on one side: each slide's patient, or its site (``split_by: site``)."""
    if split_by != "site":
        return dict(patients)
    from ..learn.splits import site_groups
    from ..sites import sites_for

    key = sites_for(list(ids), slides=cfg.slides, labels=labels_sheet or cfg.labels, pattern=cfg.site_pattern)
    if key is None:
        raise ConfigError("split_by: site needs a site key (a 'site' column, or site_pattern)")
    return dict(zip(ids, site_groups(ids, key.sites, patients).tolist(), strict=True))


def _patients(sheet_patients: Mapping[str, str], labels_sheet: Path | None) -> dict[str, str]:
    """slide -> patient from the report sheet's ``patient_id``, and the label sheet's."""
    from ..slides.cohort import read_patients

    out = dict(sheet_patients)
    if labels_sheet is not None:
        out.update(read_patients(labels_sheet) or {})
    return out


def _classes(labels: Mapping[str, str], bag_classes: Sequence[str], where: str) -> list[str]:
    bad = sorted(set(labels.values()) - set(bag_classes))
    if bad:
        raise ConfigError(
            f"{where}: labels {bad} are not classes of the prompt bag ({', '.join(bag_classes)})"
        )
    return [c for c in bag_classes if c in set(labels.values())]


def shuffled_pairs(
    emb: Mapping[str, NDArray[np.float32]], train: Sequence[str], *, seed: int
) -> dict[str, NDArray[np.float32]]:
    """The control's pairs: each training slide gets another training slide's report, by
    a seeded derangement (a plain permutation leaves some slides with their own report, so
    the control would still learn from them); slides outside ``train`` keep theirs.

    Raises
    ------
    ConfigError
        Fewer than two training slides: no slide could get another's report.
    """
    n = len(train)
    if n < 2:
        raise ConfigError(f"the shuffled-pairs control needs at least two training slides, got {n}")
    rng = np.random.default_rng(seed)
    while True:  # a uniform derangement by rejection: about e tries on average
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            break
    return dict(emb) | {s: emb[train[j]] for s, j in zip(train, perm.tolist(), strict=True)}


def run_train_reports(
    stores: Sequence[Path],
    reports: Path | None,
    out: Path,
    cfg: Config,
    *,
    labels_sheet: Path | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    shuffle_pairs: bool = False,
) -> dict[str, Any]:
    """Train the scale-aware slide-report model and its ablation; evaluate both by
    retrieval, zero-shot diagnosis and a linear probe on held-out slides. Writes
    ``out/{variant}/`` (safetensors + JSON), ``out/metrics.json`` and
    ``out/embeddings.npz``. ``shuffle_pairs`` trains on shuffled slide-report pairs (the
    control: retrieval then stays at chance)."""
    from .._progress import Progress
    from ..learn.bags import BagSource
    from ..learn.contrastive import ContrastiveSettings, embed_slides, train_contrastive
    from ..learn.evaluation import class_centroids, retrieval, zero_shot_probs
    from ..learn.report_text import embed_texts
    from ..learn.reports import match_reports, read_reports, split_slides
    from ..outputs.metrics import write_json
    from ..zeroshot.prompts import load_bag
    from ..zeroshot.text import embed_bag

    path = reports or (Path(cfg.reports) if cfg.reports else None)
    if path is None:
        raise ConfigError(
            "train-reports needs a report sheet: give --reports or set reports in the configuration"
        )
    tr = cfg.train_reports
    settings = ContrastiveSettings(
        epochs=epochs or tr.epochs,
        batch_size=tr.batch_size,
        lr=tr.lr,
        weight_decay=tr.weight_decay,
        patience=tr.patience,
        hidden=tr.hidden,
        temperature=tr.temperature,
        seed=tr.seed if seed is None else seed,
    )
    sheet = read_reports(path)
    source = BagSource(stores)
    ids = match_reports(sheet, source.ids)
    empty = [s for s in ids if len(source.bag(s).features) == 0]
    if empty:
        log.warning("%d slides have no tiles and are left out: %s", len(empty), ", ".join(empty))
        ids = [s for s in ids if s not in set(empty)]
    where = f"report sheet {str(path)!r}"
    patients = _patients(sheet.patients, labels_sheet)
    split_groups = _split_groups(cfg, cfg.train_reports.split_by, ids, patients, labels_sheet)
    splits = split_slides(
        ids,
        groups=split_groups or None,
        given={s: sheet.splits[s] for s in ids} if sheet.splits else None,
        fractions=(tr.val_fraction, tr.test_fraction),
        seed=settings.seed,
        where=where,
    )
    enc = report_encoder(cfg, source.encoders)
    texts = embed_texts(enc, [sheet.reports[s] for s in ids], cache_dir=out.parent / "cache")
    emb = dict(zip(ids, texts.emb, strict=True))
    train_text = emb
    if shuffle_pairs:
        train_text = shuffled_pairs(emb, splits["train"], seed=settings.seed)
    labels = {s: v for s, v in _labels(sheet.labels, labels_sheet).items() if s in set(ids)}
    bag = load_bag(cfg.prompt_bag)
    bag_classes, every = list(bag.decision_classes), list(bag.class_names)
    classes = _classes(labels, bag_classes, where) if labels else []
    prompts = embed_bag(load_bag(cfg.prompt_bag), [enc], cache_dir=out.parent / "cache").encoders[enc.name]
    centroids = class_centroids(prompts.emb, prompts.cls, len(every))[[every.index(c) for c in classes]]
    test = splits["test"]
    result: dict[str, Any] = {
        "report_sheet": str(path),
        "encoder": {"name": enc.name, "weights_sha256": enc.weights_sha256, "untrained": enc.entry.untrained},
        "reports": texts.summary(),
        "splits": {k: len(v) for k, v in splits.items()},
        "split_by": "sheet"
        if sheet.splits
        else ("site" if cfg.train_reports.split_by == "site" else ("patient" if patients else "slide")),
        "no_tissue": empty,
        "shuffled_pairs": shuffle_pairs,
        "settings": {**settings.__dict__},
        "classes": classes,
        "models": {},
    }
    vectors: dict[str, NDArray[np.float32]] = {"slide_ids": np.array(ids)}
    bar = Progress(len(VARIANTS) * settings.epochs, desc="train-reports", unit="epoch")
    for name, scale_on in VARIANTS.items():
        model, hist = train_contrastive(
            source,
            splits["train"],
            splits["val"],
            train_text,
            settings,
            scale_embedding=scale_on,
            progress=bar.update,
        )
        bar.update(settings.epochs - int(hist["epochs"]))  # epochs early stopping left out
        z = embed_slides(model, source, ids)
        vectors[name] = z
        idx = {s: i for i, s in enumerate(ids)}
        zt = z[[idx[s] for s in test]]
        tt = texts.emb[[idx[s] for s in test]]
        res: dict[str, Any] = {
            "epochs": hist["epochs"],
            "best_val_loss": hist["best_val_loss"],
            "val_loss_chance": math.log(len(splits["val"])),
            "temperature": 1.0 / float(model.scale().detach()),
            "retrieval": _with_ci(retrieval(zt, tt), cfg),
        }
        lab_test = [s for s in test if s in labels]
        if len(classes) >= 2 and len(lab_test) >= 2:
            probs = zero_shot_probs(z[[idx[s] for s in lab_test]], centroids, float(model.scale().detach()))
            from ..outputs.intervals import Bootstrap

            boot = Bootstrap(cfg.bootstrap.resamples, cfg.bootstrap.seed)
            units = [patients.get(s, s) for s in lab_test]
            res["zero_shot"] = scorer(classes, boot=boot)([labels[s] for s in lab_test], probs, units)
        else:
            res["zero_shot"] = {"skipped": "needs labels of two classes among the test slides"}
        res["linear_probe"] = _held_out_probe(
            z, idx, lab_test, labels, classes, patients, folds=tr.probe_folds, seed=settings.seed
        )
        model.save(
            out / name,
            {
                "variant": name,
                "encoder": result["encoder"],
                "scale_names": list(source.scale_names),
                "store_encoders": source.encoders,
                "history": hist,
            },
        )
        result["models"][name] = res
    bar.close()
    _write_vectors(out / "embeddings.npz", vectors)
    write_json(result, out / "metrics.json")
    for name, res in result["models"].items():
        r = res["retrieval"]
        log.info(
            "%s: slide->report R@1 %.3f, R@5 %.3f (chance %.3f, %.3f) on %d held-out slides",
            name,
            r["slide_to_report"]["R@1"],
            r["slide_to_report"]["R@5"],
            r["chance"]["R@1"],
            r["chance"]["R@5"],
            r["n"],
        )
    return result


def _held_out_probe(
    z: NDArray[np.float32],
    idx: Mapping[str, int],
    test: Sequence[str],
    labels: Mapping[str, str],
    classes: Sequence[str],
    patients: Mapping[str, str],
    *,
    folds: int,
    seed: int,
) -> dict[str, Any]:
    """A linear probe of the learned embeddings, cross-validated *inside the test split*:
    no slide that trained (or early-stopped) the contrastive model is fitted or scored,
    since their reports name the diagnosis the probe predicts. Folds group by patient.
    Too few labelled test slides is said in the output, never made up with training
    slides."""
    from ..learn.evaluation import probe_cv

    if len(classes) < 2:
        return {"skipped": "needs labels of two classes"}
    lab = [s for s in test if s in labels]
    res = probe_cv(
        z[[idx[s] for s in lab]],
        [labels[s] for s in lab],
        classes,
        scorer(classes),
        folds=folds,
        seed=seed,
        groups={i: patients.get(s, s) for i, s in enumerate(lab)},
    )
    if "skipped" in res:
        res["skipped"] = (
            f"the test split holds {len(lab)} labelled slides; {res['skipped']} among them "
            "(training slides are never borrowed: add test slides or raise train_reports.test_fraction)"
        )
    return res | {"slides": "test split only", "n_slides": len(lab)}


def _write_vectors(path: Path, arrays: Mapping[str, NDArray[Any]]) -> None:
    from .._atomic import atomic_file

    with atomic_file(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
