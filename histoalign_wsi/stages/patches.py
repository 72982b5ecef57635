"""The stages on folders of image patches (class = sub-folder): zero-shot classification
with metrics, and few-shot curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._atomic import atomic_file
from ..config import Config
from ..errors import ConfigError
from .learning import scorer

__all__ = ["run_classify_patches", "run_few_shot"]


def run_classify_patches(
    root: Path, out: Path, cfg: Config, *, text_path: Path | None = None, mapping: Path | None = None
) -> dict[str, Any]:
    """Zero-shot on a folder of patches: predictions.csv, metrics.json and a confusion PNG."""
    from ..features.adapters import load_encoders, resolve_device
    from ..outputs.metrics import classification_metrics, write_json
    from ..outputs.plots import plot_confusion
    from ..zeroshot.alignment import AlignmentSpec
    from ..zeroshot.patches import classify_patches, read_mapping
    from ..zeroshot.text import text_for

    text = text_for(cfg, text_path, out / "cache")
    encs = load_encoders(cfg, device=resolve_device(cfg.device))
    res = classify_patches(
        root, encs, text, AlignmentSpec.from_config(cfg), mapping=read_mapping(mapping) if mapping else None
    )
    with atomic_file(out / "predictions.csv") as tmp:
        res.table().to_csv(tmp, index=False)
    m = classification_metrics(res.labels, res.predicted, res.probs.astype("float64"), res.classes)
    m["untrained"] = any(e.entry.untrained for e in encs)
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
) -> dict[str, Any]:
    """k-shot curves of zero-shot, linear probe and Tip-Adapter on a folder of patches:
    ``curves.csv`` (every draw), ``summary.json`` (mean and sd, and the grouping used) and
    ``curves.png``. Draws and tests keep a patient's patches together when the patches
    carry a patient key (``groups`` sheet, or ``group_pattern`` on file names)."""
    from .._progress import Progress
    from ..features.adapters import load_encoders, resolve_device
    from ..learn.fewshot import TIP_ALPHA, TIP_BETA, FewShotData, few_shot_curves, summarize_curves
    from ..learn.groups import patch_groups
    from ..outputs.metrics import write_json
    from ..outputs.plots import plot_curves
    from ..zeroshot.alignment import AlignmentSpec, fused_logits
    from ..zeroshot.patches import encode_patches, find_patches, read_mapping
    from ..zeroshot.text import text_for

    text = text_for(cfg, text_path, out / "cache")
    classes = list(text.classes)
    items = find_patches(patch_dir)
    names = dict(read_mapping(mapping)) if mapping else {}
    labels = [names.get(f, f) for _, f in items]
    bad = sorted(set(labels) - set(classes))
    if bad:
        raise ConfigError(
            f"patch folders {bad} are not classes of the bag ({', '.join(classes)}); give --mapping"
        )
    grouping = patch_groups([p for p, _ in items], patch_dir, sheet=groups, pattern=group_pattern)
    encs = load_encoders(cfg, device=resolve_device(cfg.device))
    feats = encode_patches([p for p, _ in items], encs)
    zs = fused_logits(feats, text, AlignmentSpec.from_config(cfg))
    data = FewShotData.from_encoders(feats, labels, zs, classes)
    with Progress(len(shots) * repeats, desc="few-shot", unit="draw") as bar:
        rows = few_shot_curves(
            data,
            shots=shots,
            repeats=repeats,
            seed=seed,
            score=scorer(classes),
            groups=grouping.keys,
            progress=bar.update,
        )
    with atomic_file(out / "curves.csv") as tmp:
        import pandas as pd  # lazily: the CLI's start-up stays light

        pd.DataFrame(rows).to_csv(tmp, index=False)
    metrics = ("balanced_accuracy", "macro_f1", "auc_macro_ovr")
    curves = {m: summarize_curves(rows, m) for m in metrics}
    summary: dict[str, Any] = {
        "shots": list(shots),
        "repeats": repeats,
        "seed": seed,
        "tip_adapter": {"alpha": TIP_ALPHA, "beta": TIP_BETA},
        "n_patches": len(items),
        "grouping": grouping.summary(),
        "untrained": any(e.entry.untrained for e in encs),
        "encoders": {e.name: e.weights_sha256 for e in encs},
        "curves": curves,
    }
    write_json(summary, out / "summary.json")
    title = "few-shot (UNTRAINED demo encoder: meaningless)" if summary["untrained"] else "few-shot"
    plot_curves(curves, out / "curves.png", title=title)
    return summary
