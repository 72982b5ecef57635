"""Subcommands that learn from pathology reports: slide-report training, pairing with
an unpaired corpus, distillation."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import stages
from ..config import Config
from .common import Subparsers, at_least, existing, existing_dir, opts, print_json, says
from .common import add as _add
from .learn import group_options

__all__ = ["report_commands"]


def _train_reports(a: argparse.Namespace, cfg: Config) -> int:
    kw = opts(a, "epochs", "seed", "shuffle_pairs")
    r = stages.run_train_reports(a.stores, a.reports, a.out, cfg, labels_sheet=a.labels, **kw)
    print_json(
        {
            name: {
                "retrieval": m["retrieval"]["slide_to_report"],
                "ci_95": m["retrieval"]["ci"]["slide_to_report"],
                "chance": m["retrieval"]["chance"],
            }
            for name, m in r["models"].items()
        }
    )
    says(
        "train-reports",
        "slide-to-report retrieval Recall@k on held-out test slides with 95% bootstrap intervals, "
        "beside chance (k/n)",
        a.out / "metrics.json",
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
    print_json({k: s[k] for k in ("items", "corpus_reports", "k", "mean_top1_score")})
    says("pair-reports", "counts and the mean cosine of each item's best report", a.out / "summary.json")
    return 0


def _distill(a: argparse.Namespace, cfg: Config) -> int:
    r = stages.run_distill(a.pairs, a.out, cfg, labels_sheet=a.labels, seed=a.seed)
    print_json(
        {
            k: {"balanced_accuracy": v["balanced_accuracy"], "ci_95": v["ci"]["balanced_accuracy"]}
            for k, v in r["metrics"].items()
        }
    )
    says(
        "distill",
        "balanced accuracy on held-out items of each model, with 95% bootstrap intervals",
        a.out / "metrics.json",
    )
    return 0


# --- the parser ----------------------------------------------------------------------


def report_commands(sub: Subparsers) -> None:
    p = _add(sub, "train-reports", _train_reports, "slide-report contrastive training, retrieval and probes")
    p.add_argument("stores", type=existing, nargs="+", help="feature stores")
    p.add_argument(
        "--reports", type=existing, help="report sheet slide_id,report (CSV/TSV/JSONL; default: config)"
    )
    p.add_argument("--labels", type=existing, help="label sheet for zero-shot diagnosis and the probe")
    p.add_argument("--out", type=Path, required=True, help="folder: scale_aware/, no_scale/, metrics.json")
    p.add_argument("--epochs", type=at_least(1))
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--shuffle-pairs", action="store_true", help="control: train on shuffled slide-report pairs"
    )

    p = _add(sub, "pair-reports", _pair_reports, "pair slides or patches with an unpaired report corpus")
    p.add_argument("inputs", type=existing, nargs="+", help="feature stores, or one patch folder")
    p.add_argument("--corpus", type=existing, help="report folder or table (default: config report_corpus)")
    p.add_argument("--out", type=Path, required=True, help="folder: pairs.csv, items.npz, summary.json")
    p.add_argument("-k", type=at_least(1), help="reports kept per image (default: config pairing.k)")
    p.add_argument(
        "--reports",
        type=existing,
        help="the cohort's own report sheet: corpus reports equal to one of them (normalised text) "
        "are left out (default: config reports)",
    )
    group_options(p)

    p = _add(sub, "distill", _distill, "vision-only classifier distilled from paired reports")
    p.add_argument("pairs", type=existing_dir, help="the pair-reports output folder")
    p.add_argument("--labels", type=existing, help="label sheet (slides; patches take their folder names)")
    p.add_argument("--out", type=Path, required=True, help="folder: student/, baseline/, metrics.json")
    p.add_argument("--seed", type=int)
