"""The stages on folders of image patches (class = sub-folder): zero-shot classification
with metrics, and few-shot curves."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._atomic import atomic_file
from ..config import Config
from ..csvcells import inert_table
from ..errors import ConfigError
from .learning import scorer

__all__ = ["run_classify_patches", "run_few_shot"]


def run_classify_patches(
    root: Path, out: Path, cfg: Config, *, text_path: Path | None = None, mapping: Path | None = None
) -> dict[str, Any]:
    """Zero-shot on a folder of patches: predictions.csv, metrics.json and a confusion PNG.
    The folder names are checked against the bag before any model loads."""
    from ..zeroshot.patches import labelled_patches, read_mapping
    from ..zeroshot.prompts import load_bag
    from ..zeroshot.text import load_text

    given = load_text(text_path) if text_path else None  # read once: no model, no torch
    classes = list(given.classes if given else load_bag(cfg.prompt_bag).class_names)
    names = read_mapping(mapping) if mapping else None
    labelled_patches(root, classes, names)

    from ..features.adapters import load_encoders, resolve_device
    from ..outputs.metrics import classification_metrics, write_json
    from ..outputs.plots import plot_confusion
    from ..zeroshot.alignment import AlignmentSpec
    from ..zeroshot.patches import classify_patches
    from ..zeroshot.text import text_for

    text = given or text_for(cfg, None, out / "cache")
    encs = load_encoders(cfg, device=resolve_device(cfg.device))
    res = classify_patches(root, encs, text, AlignmentSpec.from_config(cfg), mapping=names)
    untrained = any(e.entry.untrained for e in encs)
    with atomic_file(out / "predictions.csv") as tmp:
        inert_table(res.table().assign(untrained=untrained)).to_csv(tmp, index=False)
    m = classification_metrics(res.labels, res.predicted, res.probs.astype("float64"), res.classes)
    from ..outputs.intervals import Bootstrap, with_intervals

    boot = Bootstrap(cfg.bootstrap.resamples, cfg.bootstrap.seed)
    m["ci"] = with_intervals(res.labels, res.predicted, res.probs.astype("float64"), res.classes, boot=boot)[
        "ci"
    ]
    m["bootstrap"] = boot.describe("patch", len(res.labels))
    m["untrained"] = untrained
    m["encoders"] = {e.name: e.weights_sha256 for e in encs}
    write_json(m, out / "metrics.json")
    plot_confusion(m["confusion_matrix"], out / "confusion_matrix.png")
    return m


def run_few_shot(
    patch_dir: Path,
    out: Path,
    cfg: Config,
    *,
    shots: Sequence[int],
    repeats: int,
    seed: int,
    mapping: Path | None = None,
    text_path: Path | None = None,
    groups: Path | None = None,
    group_pattern: str = "auto",
    tip_search: bool = False,
    cv: str = "draws",
    site_pattern: str | None = None,
) -> dict[str, Any]:
    """k-shot curves of zero-shot, linear probe and Tip-Adapter on a folder of patches
    (``tip_search``: also Tip-Adapter with alpha and beta searched on the shots):
    ``curves.csv`` (every draw), ``summary.json`` (mean and sd, and the grouping used) and
    ``curves.png``. Draws and tests keep a patient's patches together when the patches
    carry a patient key (``groups`` sheet, or ``group_pattern`` on file names). ``cv``
    ``site`` holds out each site in turn (sites from the sheet's ``site`` column or
    ``site_pattern`` on the path): shots from the other sites, tests on the held-out one."""
    from ..learn.groups import patch_groups, patch_sites
    from ..zeroshot.patches import labelled_patches, read_mapping
    from ..zeroshot.prompts import load_bag
    from ..zeroshot.text import load_text, text_for

    # every check on the arguments and the folder first: a refusal is quick and leaves nothing
    given = load_text(text_path) if text_path else None  # read once: no model, no torch
    classes = list(given.classes if given else load_bag(cfg.prompt_bag).class_names)
    items, labels = labelled_patches(patch_dir, classes, read_mapping(mapping) if mapping else None)
    _check_shots(patch_dir, labels, shots)
    grouping = patch_groups([p for p, _ in items], patch_dir, sheet=groups, pattern=group_pattern)
    sites = (
        patch_sites([p for p, _ in items], patch_dir, sheet=groups, pattern=site_pattern)
        if cv == "site"
        else None
    )
    if sites is not None and len(set(sites)) < 2:
        raise ConfigError(f"cv: site needs patches from two sites or more; {str(patch_dir)!r} has one")

    from .._progress import Progress
    from ..features.adapters import load_encoders, resolve_device
    from ..learn.fewshot import TIP_ALPHA, TIP_BETA, FewShotData, few_shot_curves, summarize_curves
    from ..outputs.metrics import write_json
    from ..outputs.plots import plot_curves
    from ..zeroshot.alignment import AlignmentSpec, fused_logits
    from ..zeroshot.patches import encode_patches

    text = given or text_for(cfg, None, out / "cache")
    encs = load_encoders(cfg, device=resolve_device(cfg.device))
    feats = encode_patches([p for p, _ in items], encs)
    zs = fused_logits(feats, text, AlignmentSpec.from_config(cfg))
    data = FewShotData.from_encoders(feats, labels, zs, classes)
    n_sites = len(set(sites)) if sites is not None else 1
    with Progress(len(shots) * repeats * n_sites, desc="few-shot", unit="draw") as bar:
        rows = few_shot_curves(
            data,
            shots=shots,
            repeats=repeats,
            seed=seed,
            score=scorer(classes),
            groups=grouping.keys,
            progress=bar.update,
            search=tip_search,
            sites=sites,
        )
    with atomic_file(out / "curves.csv") as tmp:
        import pandas as pd  # lazily: the CLI's start-up stays light

        inert_table(pd.DataFrame(rows)).to_csv(tmp, index=False)
    metrics = ("balanced_accuracy", "macro_f1", "auc_macro_ovr")
    curves = {m: summarize_curves(rows, m) for m in metrics}
    summary: dict[str, Any] = {
        "shots": list(shots),
        "repeats": repeats,
        "seed": seed,
        "tip_adapter": {
            "alpha": TIP_ALPHA,
            "beta": TIP_BETA,
            "defaults": "the official code's init_alpha and init_beta, used as they are",
            "searched": "alpha and beta per draw on a held-out half of the shots" if tip_search else None,
        },
        "n_patches": len(items),
        "grouping": grouping.summary(),
        "split": {"cv": "site", "by": f"site (leave-one-site-out, {n_sites} sites)"}
        if sites is not None
        else {"cv": "draws", "by": f"{grouping.by}: k shots per class drawn, the rest tested"},
        "untrained": any(e.entry.untrained for e in encs),
        "encoders": {e.name: e.weights_sha256 for e in encs},
        "curves": curves,
    }
    write_json(summary, out / "summary.json")
    title = "few-shot (UNTRAINED demo encoder: meaningless)" if summary["untrained"] else "few-shot"
    plot_curves(curves, out / "curves.png", title=title)
    return summary


def _check_shots(patch_dir: Path, labels: Sequence[str], shots: Sequence[int]) -> None:
    """Refuse, before anything is encoded, a folder with fewer than two classes or too few
    patches for the largest k (k patches to learn from and at least one to test on)."""
    counts = Counter(labels)
    if len(counts) < 2:
        raise ConfigError(
            f"few-shot needs patches of at least two classes; {str(patch_dir)!r} has "
            f"{len(counts)} ({', '.join(counts) or 'none'})"
        )
    if min(shots) < 1:
        raise ConfigError(f"--shots must be whole numbers >= 1 (got {list(shots)})")
    least = min(counts, key=lambda c: counts[c])
    if max(shots) >= counts[least]:
        raise ConfigError(
            f"{max(shots)}-shot needs more than {max(shots)} patches of class {least!r}, which has "
            f"{counts[least]} (lower --shots or add patches)"
        )
