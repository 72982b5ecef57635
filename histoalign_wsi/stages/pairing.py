"""Report pairing and distillation stages (CLIP-IT): ``pair-reports`` ranks an unpaired
report corpus for every slide (from its feature store) or patch (from a folder) and
writes the pairs; ``distill`` trains a vision-only classifier from them and compares it
with the same classifier trained without the paired text."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._atomic import atomic_file
from ..config import Config
from ..csvcells import inert_table
from ..errors import ConfigError
from .learning import scorer
from .reports import encoder_columns, report_encoder

__all__ = ["UNLABELLED", "run_distill", "run_pair_reports"]

log = logging.getLogger(__name__)

#: a patch sub-folder with this name holds images without a class (paired and distilled,
#: never used for cross-entropy or evaluation)
UNLABELLED = "unlabelled"


def _slide_items(stores: Sequence[Path], cfg: Config) -> tuple[dict[str, Any], Any]:
    from ..learn.bags import BagSource

    source = BagSource(stores)
    enc = report_encoder(cfg, source.encoders)
    cols = encoder_columns(source, enc.name)
    ids, image, student = [], [], []
    for sid in source.ids:
        bag = source.bag(sid)
        if len(bag.features) == 0:
            log.warning("slide %s has no tiles: not paired", sid)
            continue
        m = bag.features[:, cols].mean(axis=0)
        ids.append(sid)
        image.append(m / max(float(np.linalg.norm(m)), 1e-12))
        student.append(bag.pooled())
    meta = {
        "kind": "slides",
        "scale_names": list(source.scale_names),
        "store_encoders": source.encoders,
        "untrained": source.untrained or enc.entry.untrained,
    }
    items = {"ids": ids, "labels": [""] * len(ids), "image": image, "student": student, "meta": meta}
    return items, enc


def _patch_items(
    folder: Path, cfg: Config, groups: Path | None, group_pattern: str
) -> tuple[dict[str, Any], Any]:
    from .._progress import Progress
    from ..learn.groups import patch_groups
    from ..zeroshot.patches import encode_patches, find_patches

    found = find_patches(folder)
    grouping = patch_groups([p for p, _ in found], folder, sheet=groups, pattern=group_pattern)
    enc = report_encoder(cfg)
    with Progress(len(found), desc="pair-reports: encode", unit="image") as bar:
        feats = encode_patches([p for p, _ in found], [enc], progress=bar.update)[enc.name]
    ids = [str(p.relative_to(folder)) for p, _ in found]
    labels = ["" if f == UNLABELLED else f for _, f in found]
    meta = {
        "kind": "patches",
        "scale_names": ["patch"],
        "store_encoders": {enc.name: {"weights_sha256": enc.weights_sha256, "embedding_dim": feats.shape[1]}},
        "untrained": enc.entry.untrained,
        "grouping": grouping.summary(),
    }
    items = {"ids": ids, "labels": labels, "image": list(feats), "student": list(feats), "meta": meta}
    return items | {"groups": list(grouping.keys) if grouping.keys else []}, enc


def _cohort_overlap(corpus: Any, sheet: Path | None) -> tuple[Any, list[str]]:
    """The corpus less the cohort's own reports (same normalised text): otherwise a
    "teacher with text" would read a held-out item's own report."""
    from ..learn.reports import read_reports

    if sheet is None:
        return corpus, []
    kept, dropped = corpus.without(list(read_reports(sheet).reports.values()))
    if dropped:
        log.warning(
            "report corpus %s: %d report(s) equal to the cohort's own (report sheet %s) left out",
            corpus.source,
            len(dropped),
            sheet,
        )
    if not kept.ids:
        raise ConfigError(
            f"report corpus {str(corpus.source)!r}: every report is one of the cohort's own "
            f"(report sheet {str(sheet)!r}); pairing needs an unpaired corpus"
        )
    return kept, dropped


def run_pair_reports(
    inputs: Sequence[Path],
    corpus_path: Path | None,
    out: Path,
    cfg: Config,
    *,
    k: int | None = None,
    cohort_reports: Path | None = None,
    groups: Path | None = None,
    group_pattern: str = "auto",
) -> dict[str, Any]:
    """Pair every slide (``inputs`` = feature stores) or patch (``inputs`` = one folder of
    class sub-folders) with its top-k corpus reports: ``out/pairs.csv`` (item, rank,
    report_id, report_index, score), ``out/items.npz`` (what ``distill`` reads) and
    ``out/summary.json``. The corpus embeddings are cached in ``out/../cache``.

    Corpus reports equal (after normalisation: :func:`~..learn.reports.text_key`) to one
    of the cohort's own reports (``cohort_reports``, else the configured ``reports``
    sheet) are left out and counted. Patches carry their patient key (``groups`` sheet or
    ``group_pattern``) to ``distill``'s split."""
    from ..learn.pairing import fuse_paired_text, pair_topk
    from ..learn.report_text import embed_texts
    from ..learn.reports import read_corpus
    from ..outputs.metrics import write_json

    path = corpus_path or (Path(cfg.report_corpus) if cfg.report_corpus else None)
    if path is None:
        raise ConfigError("pair-reports needs a report corpus: give --corpus or set report_corpus")
    own = cohort_reports or (Path(cfg.reports) if cfg.reports else None)
    corpus, excluded = _cohort_overlap(read_corpus(path), own)
    if (
        len(inputs) == 1
        and inputs[0].is_dir()
        and not (inputs[0] / "zarr.json").exists()
        and not (inputs[0] / ".zgroup").exists()
    ):
        items, enc = _patch_items(inputs[0], cfg, groups, group_pattern)
    else:
        items, enc = _slide_items(inputs, cfg)
    if not items["ids"]:
        raise ConfigError("nothing to pair: no slide has tiles")
    text = embed_texts(enc, corpus.texts, cache_dir=out.parent / "cache", what="corpus reports")
    k = k or cfg.pairing.k
    image = np.stack(items["image"]).astype(np.float32)
    pairs = pair_topk(image, text.emb, k)
    paired = fuse_paired_text(pairs, text.emb, cfg.pairing.temperature)
    table = pairs.table(items["ids"], corpus.ids)
    with atomic_file(out / "pairs.csv") as tmp:
        inert_table(table).to_csv(tmp, index=False)
    meta = items["meta"] | {"encoder": enc.name, "weights_sha256": enc.weights_sha256, "k": k}
    with atomic_file(out / "items.npz") as tmp, tmp.open("wb") as fh:
        np.savez(
            fh,
            ids=np.array(items["ids"]),
            labels=np.array(items["labels"]),
            student=np.stack(items["student"]).astype(np.float32),
            image=image,
            paired_text=paired,
            groups=np.array(items.get("groups") or [], dtype=str),
            meta=np.array(json.dumps(meta)),
        )
    summary = {
        "items": len(items["ids"]),
        "kind": meta["kind"],
        "corpus": str(path),
        "corpus_reports": len(corpus.ids),
        "corpus_excluded_as_cohort_reports": len(excluded),
        "cohort_report_sheet": str(own) if own else None,
        "corpus_text": text.summary(),
        "k": k,
        "mean_top1_score": float(pairs.score[:, 0].mean()),
        "encoder": enc.name,
        "untrained": meta["untrained"],
    }
    write_json(summary, out / "summary.json")
    log.info(
        "paired %d %s with %d corpus reports (top %d)", len(items["ids"]), meta["kind"], len(corpus.ids), k
    )
    return summary


def _test_groups(y: NDArray[np.int64], groups: NDArray[Any], fraction: float, seed: int) -> set[str]:
    """Seeded held-out groups: about ``fraction`` of each class's groups (at least one),
    among the labelled items ``y``/``groups``. Every item of a held-out group is held out."""
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for c in np.unique(y):
        g = np.unique(groups[y == c])
        held.update(rng.permutation(g)[: max(1, round(fraction * len(g)))].tolist())
    return held


def _read_items(path: Path) -> tuple[Any, dict[str, Any]]:
    """``items.npz`` as ``pair-reports`` wrote it, and its metadata; anything else is
    refused in one line naming the file (object arrays are never unpickled)."""
    import zipfile

    if not path.exists():
        raise ConfigError(f"{str(path.parent)!r} holds no items.npz: run pair-reports first")
    try:
        z = np.load(path, allow_pickle=False)
        need = {"ids", "labels", "student", "paired_text", "meta"}
        if not hasattr(z, "files") or not need <= set(z.files):
            raise ValueError(f"needs arrays {sorted(need)}")
        meta = json.loads(str(z["meta"]))
        if not isinstance(meta, dict) or "kind" not in meta:
            raise ValueError("its meta is not pair-reports' metadata")
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{str(path)!r} is not a pair-reports items file ({exc}); run pair-reports again"
        ) from exc
    return z, meta


def run_distill(
    pairs_dir: Path, out: Path, cfg: Config, *, labels_sheet: Path | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Train the distilled student, the no-pairing baseline and the teacher on the same
    split and seed; write ``out/student/`` and ``out/baseline/`` (heads that ``predict``
    applies to new stores, images only) and ``out/metrics.json`` (held-out metrics)."""
    from .._progress import Progress
    from ..learn.distill import DistillSettings, distill
    from ..learn.heads import Head
    from ..outputs.metrics import write_json
    from ..slides.cohort import read_labels, read_patients
    from ..zeroshot.prompts import load_bag

    z, meta = _read_items(pairs_dir / "items.npz")
    ids = [str(s) for s in z["ids"]]
    labels = {s: str(v) for s, v in zip(ids, z["labels"], strict=True) if str(v)}
    saved_groups = [str(g) for g in z["groups"]] if "groups" in z.files else []
    grp = np.array(saved_groups if len(saved_groups) == len(ids) else ids)
    split_by = meta.get("grouping", {}).get("by", "item") if saved_groups else "item"
    sheet = labels_sheet or (Path(cfg.labels) if cfg.labels else None)
    if meta["kind"] == "slides":
        if sheet is None:
            raise ConfigError("distill on slides needs a label sheet: give --labels or set labels")
        given = read_labels(sheet)
        unknown = sorted(set(given) - set(ids))
        if unknown:
            raise ConfigError(f"label sheet {str(sheet)!r} names slides that were not paired: {unknown[:10]}")
        labels = given
        patients = read_patients(sheet)
        if cfg.distill.split_by == "site":
            from .reports import _split_groups

            by_site = _split_groups(cfg, "site", ids, patients or {}, sheet)
            grp = np.array([by_site[s] for s in ids])
            split_by = "site"
        elif patients:
            grp = np.array([patients.get(s, s) for s in ids])
            split_by = "patient (label sheet)"
        else:
            split_by = "slide"
    bag_classes = list(load_bag(cfg.prompt_bag).decision_classes)
    present = set(labels.values())
    classes = [c for c in bag_classes if c in present] + sorted(present - set(bag_classes))
    if len(classes) < 2:
        raise ConfigError(f"distill needs labelled items of two classes; found {sorted(present)}")
    d = cfg.distill
    s = DistillSettings(d.epochs, d.lr, d.weight_decay, d.hidden, d.weight, d.seed if seed is None else seed)
    y = np.array([classes.index(labels[i]) if i in labels else -1 for i in ids], np.int64)
    lab = y >= 0
    held = _test_groups(y[lab], grp[lab], d.test_fraction, s.seed)
    in_held = np.isin(grp, list(held))
    test = lab & in_held
    if (lab & ~test).sum() < 2 or test.sum() < 2:
        raise ConfigError(f"distill: too few labelled items ({int(lab.sum())}) for a train and a test split")
    student_x, text = z["student"], z["paired_text"]
    # labelled training items and the unlabelled ones, less every item of a held-out group
    pool = ~in_held
    assert not set(grp[pool]) & set(grp[test])
    with Progress(3, desc="distill", unit="model") as bar:  # teacher, student, baseline
        res = distill(student_x[pool], text[pool], np.where(lab, y, -1)[pool], len(classes), s, bar.update)
    from ..outputs.intervals import Bootstrap

    score = scorer(classes, boot=Bootstrap(cfg.bootstrap.resamples, cfg.bootstrap.seed))
    truth = [classes[k] for k in y[test]]
    units = grp[test].tolist()  # intervals resample the held-out groups (patients, or sites)
    metrics = {
        "student": score(truth, res.student.probs(student_x[test]), units),
        "baseline": score(truth, res.baseline.probs(student_x[test]), units),
        "teacher_with_text": score(
            truth, res.teacher.probs(np.concatenate([student_x, text], 1)[test]), units
        ),
    }
    for name, model in (("student", res.student), ("baseline", res.baseline)):
        Head(
            f"distilled_{name}" if name == "student" else "no_pairing_baseline",
            "mlp",
            tuple(classes),
            tuple(meta["scale_names"]),
            meta["store_encoders"],
            {"seed": s.seed, "distill_weight": s.weight if name == "student" else 0.0},
            model=model,
        ).save(out / name)
    report = {
        "kind": meta["kind"],
        "classes": classes,
        "n_items": len(ids),
        "n_labelled_train": int((lab & ~test).sum()),
        "n_unlabelled": int((~lab).sum()),
        "n_test": int(test.sum()),
        "split_by": split_by,
        "n_groups": len(set(grp.tolist())),
        "test_items": [i for i, t in zip(ids, test, strict=True) if t],
        "settings": s.__dict__,
        "untrained": meta["untrained"],
        "metrics": metrics,
    }
    write_json(report, out / "metrics.json")
    log.info(
        "held-out balanced accuracy: distilled %.3f, without pairing %.3f (teacher with text %.3f)",
        metrics["student"]["balanced_accuracy"],
        metrics["baseline"]["balanced_accuracy"],
        metrics["teacher_with_text"]["balanced_accuracy"],
    )
    return report
