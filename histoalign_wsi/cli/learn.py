"""Subcommands that learn from labels on stored features or patches: few-shot curves,
slide-level heads, predictions with a saved head."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import stages
from ..config import Config
from .common import Subparsers, at_least, existing, existing_dir, opts, print_json, says
from .common import add as _add

__all__ = ["group_options", "learn_commands"]


def _few_shot(a: argparse.Namespace, cfg: Config) -> int:
    kw = opts(
        a,
        "shots",
        "repeats",
        "seed",
        "mapping",
        "groups",
        "group_pattern",
        "tip_search",
        "cv",
        "site_pattern",
    )
    s = stages.run_few_shot(a.dir, a.out, cfg, text_path=a.text, **kw)
    curve = s["curves"]["balanced_accuracy"]
    print_json(
        {
            m: {r["shots"]: round(r["mean"], 3) for r in curve if r["method"] == m}
            for m in dict.fromkeys(r["method"] for r in curve)
        }
    )
    says(
        "few-shot",
        f"balanced accuracy on held-out patches per method and k, mean of {a.repeats} draws "
        "(summary.json: sd and the 2.5-97.5th percentile over the draws)",
        a.out / "summary.json",
    )
    return 0


def _fit(a: argparse.Namespace, cfg: Config) -> int:
    kw = opts(a, "heads", "folds", "seed", "epochs")
    report = stages.run_fit(a.stores, a.labels, a.out, cfg, attention_dir=a.attention, cv_kind=a.cv, **kw)
    keys = ("balanced_accuracy", "macro_f1", "auc_macro_ovr")
    print_json(
        {
            h: {m: v[m] for m in keys} | {"ci_95": {m: v["ci"][m] for m in keys}}
            for h, v in report["pooled"].items()
        }
    )
    says(
        "fit",
        f"each head's out-of-fold metrics with 95% bootstrap intervals ({report['split']['by']})",
        a.out / "cv_metrics.json",
    )
    return 0


def _site_signature(a: argparse.Namespace, cfg: Config) -> int:
    res = stages.run_site_signature(a.stores, a.out, cfg, labels_sheet=a.labels)
    print_json(
        {
            n: {
                "balanced_accuracy": v["balanced_accuracy"],
                "ci_95": v["ci"]["balanced_accuracy"],
                "chance": v["chance"],
                "permuted": v["permuted"],
            }
            for n, v in res["encoders"].items()
        }
    )
    says("site-signature", "the site predicted from each encoder's features, beside chance", a.out)
    return 0


def _predict(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_predict(a.stores, a.head, a.out, cfg)
    return 0


def group_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--groups",
        type=existing,
        help="patch folders: a sheet path,patient_id (path relative to the folder, or the file name); "
        "splits keep a patient on one side",
    )
    p.add_argument(
        "--group-pattern",
        default="auto",
        help="patch folders: 'auto' (BreakHis file names when every file fits, else none), 'none', "
        "'breakhis', or a regular expression with a (?P<patient>...) group on the file name",
    )


# --- the parser ----------------------------------------------------------------------


def learn_commands(sub: Subparsers) -> None:
    p = _add(sub, "few-shot", _few_shot, "k-shot curves: zero-shot vs linear probe vs Tip-Adapter on patches")
    p.add_argument("dir", type=existing_dir, help="patch folder (class = sub-folder), as classify-patches")
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (curves.csv, summary.json, curves.png)"
    )
    p.add_argument("--shots", type=at_least(1), nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=at_least(1), default=10, help="seeded draws per k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mapping", type=existing, help="folder -> class (YAML mapping or CSV folder,class)")
    p.add_argument("--text", type=Path)
    p.add_argument(
        "--tip-search",
        action="store_true",
        help="also Tip-Adapter with alpha and beta searched on a held-out half of the shots (k >= 2)",
    )
    group_options(p)
    p.add_argument(
        "--cv",
        choices=["draws", "site"],
        default="draws",
        help="draws = k shots drawn, the rest tested; site = each site held out in turn",
    )
    p.add_argument(
        "--site-pattern", help="with --cv site: 'tcga' or a regular expression with (?P<site>...) on the path"
    )

    p = _add(sub, "fit", _fit, "train slide-level heads on stored features (cross-validated)")
    p.add_argument("stores", type=existing, nargs="+", help="feature stores")
    p.add_argument("--labels", type=existing, help="label sheet slide_id,label (default: config labels)")
    p.add_argument(
        "--out", type=Path, required=True, help="models folder: {head}/model.safetensors + config.json"
    )
    p.add_argument("--heads", nargs="+", help="linear, abmil (its ablation abmil_noscale comes along)")
    p.add_argument("--folds", type=at_least(2), help="cross-validation folds (default: config)")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=at_least(1))
    p.add_argument(
        "--cv", choices=["kfold", "site"], help="kfold by patient, or site held out (default: config fit.cv)"
    )
    p.add_argument(
        "--attention", type=Path, help="folder for per-tile attention of the abmil head (.parquet)"
    )

    p = _add(
        sub, "site-signature", _site_signature, "how well the features tell the site (hospital) of a slide"
    )
    p.add_argument("stores", type=existing, nargs="+", help="feature stores")
    p.add_argument("--labels", type=existing, help="label sheet (patient_id, site columns; default: config)")
    p.add_argument("--out", type=Path, required=True, help="site_signature.json")

    p = _add(sub, "predict", _predict, "predict new slides' stores with a saved head")
    p.add_argument("stores", type=existing, nargs="+")
    p.add_argument("--head", type=existing_dir, required=True, help="a saved head folder (models/NAME)")
    p.add_argument("--out", type=Path, required=True, help="folder for predictions/ and predictions.csv")
