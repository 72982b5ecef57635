"""The subcommands that learn from labels and reports on stored features: their handlers
(one ``stages.run_*`` call each) and their parsers."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import stages
from ._cli_common import add as _add
from ._cli_common import opts as _opts
from ._cli_common import print_json as _print_json
from .config import Config

__all__ = ["learn_commands", "report_commands"]


def _few_shot(a: argparse.Namespace, cfg: Config) -> int:
    opts = _opts(a, "shots", "repeats", "seed", "mapping", "groups", "group_pattern")
    s = stages.run_few_shot(a.dir, a.out, cfg, text_path=a.text, **opts)
    curve = s["curves"]["balanced_accuracy"]
    _print_json(
        {
            m: {r["shots"]: round(r["mean"], 3) for r in curve if r["method"] == m}
            for m in dict.fromkeys(r["method"] for r in curve)
        }
    )
    return 0


def _fit(a: argparse.Namespace, cfg: Config) -> int:
    opts = _opts(a, "heads", "folds", "seed", "epochs")
    report = stages.run_fit(a.stores, a.labels, a.out, cfg, attention_dir=a.attention, **opts)
    _print_json({h: v["mean"] for h, v in report["heads"].items()})
    return 0


def _train_reports(a: argparse.Namespace, cfg: Config) -> int:
    opts = _opts(a, "epochs", "seed", "shuffle_pairs")
    r = stages.run_train_reports(a.stores, a.reports, a.out, cfg, labels_sheet=a.labels, **opts)
    _print_json(
        {
            name: {"retrieval": m["retrieval"]["slide_to_report"], "chance": m["retrieval"]["chance"]}
            for name, m in r["models"].items()
        }
    )
    return 0


def _pair_reports(a: argparse.Namespace, cfg: Config) -> int:
    s = stages.run_pair_reports(
        a.inputs,
        a.corpus,
        a.out,
        cfg,
        k=a.k,
        cohort_reports=a.reports,
        groups=a.groups,
        group_pattern=a.group_pattern,
    )
    _print_json({k: s[k] for k in ("items", "corpus_reports", "k", "mean_top1_score")})
    return 0


def _distill(a: argparse.Namespace, cfg: Config) -> int:
    r = stages.run_distill(a.pairs, a.out, cfg, labels_sheet=a.labels, seed=a.seed)
    _print_json({k: v["balanced_accuracy"] for k, v in r["metrics"].items()})
    return 0


def _predict(a: argparse.Namespace, cfg: Config) -> int:
    stages.run_predict(a.stores, a.head, a.out, cfg)
    return 0


def _group_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--groups",
        type=Path,
        help="patch folders: a sheet path,patient_id (path relative to the folder, or the file name); "
        "splits keep a patient on one side",
    )
    p.add_argument(
        "--group-pattern",
        default="auto",
        help="patch folders: 'auto' (BreakHis file names when every file fits, else none), 'none', "
        "'breakhis', or a regular expression with a (?P<patient>...) group on the file name",
    )


def learn_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(sub, "few-shot", _few_shot, "k-shot curves: zero-shot vs linear probe vs Tip-Adapter on patches")
    p.add_argument("dir", type=Path, help="patch folder (class = sub-folder), as classify-patches takes")
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (curves.csv, summary.json, curves.png)"
    )
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=10, help="seeded draws per k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mapping", type=Path, help="folder -> class (YAML mapping or CSV folder,class)")
    p.add_argument("--text", type=Path)
    _group_options(p)

    p = _add(sub, "fit", _fit, "train slide-level heads on stored features (cross-validated)")
    p.add_argument("stores", type=Path, nargs="+", help="feature stores")
    p.add_argument("--labels", type=Path, help="label sheet slide_id,label (default: config labels)")
    p.add_argument(
        "--out", type=Path, required=True, help="models folder: {head}/model.safetensors + config.json"
    )
    p.add_argument("--heads", nargs="+", help="linear, abmil (its ablation abmil_noscale comes along)")
    p.add_argument("--folds", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument(
        "--attention", type=Path, help="folder for per-tile attention of the abmil head (.parquet)"
    )

    p = _add(sub, "predict", _predict, "predict new slides' stores with a saved head")
    p.add_argument("stores", type=Path, nargs="+")
    p.add_argument("--head", type=Path, required=True, help="a saved head folder (models/NAME)")
    p.add_argument("--out", type=Path, required=True, help="folder for predictions/ and predictions.csv")


def report_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _add(sub, "train-reports", _train_reports, "slide-report contrastive training, retrieval and probes")
    p.add_argument("stores", type=Path, nargs="+", help="feature stores")
    p.add_argument(
        "--reports", type=Path, help="report sheet slide_id,report (CSV/TSV/JSONL; default: config reports)"
    )
    p.add_argument("--labels", type=Path, help="label sheet for zero-shot diagnosis and the probe")
    p.add_argument("--out", type=Path, required=True, help="folder: scale_aware/, no_scale/, metrics.json")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--shuffle-pairs", action="store_true", help="control: train on shuffled slide-report pairs"
    )

    p = _add(sub, "pair-reports", _pair_reports, "pair slides or patches with an unpaired report corpus")
    p.add_argument("inputs", type=Path, nargs="+", help="feature stores, or one patch folder")
    p.add_argument("--corpus", type=Path, help="report folder or table (default: config report_corpus)")
    p.add_argument("--out", type=Path, required=True, help="folder: pairs.csv, items.npz, summary.json")
    p.add_argument("-k", type=int, help="reports kept per image (default: config pairing.k)")
    p.add_argument(
        "--reports",
        type=Path,
        help="the cohort's own report sheet: corpus reports equal to one of them (normalised text) "
        "are left out (default: config reports)",
    )
    _group_options(p)

    p = _add(sub, "distill", _distill, "vision-only classifier distilled from paired reports")
    p.add_argument("pairs", type=Path, help="the pair-reports output folder")
    p.add_argument("--labels", type=Path, help="label sheet (slides; patches take their folder names)")
    p.add_argument("--out", type=Path, required=True, help="folder: student/, baseline/, metrics.json")
    p.add_argument("--seed", type=int)
