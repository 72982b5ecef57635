"""The stages: one ``run_*`` per CLI subcommand. The CLI only parses arguments and calls
one of these; the workflow's rules only call the CLI. ``pipeline`` holds the zero-shot
chain (slides to scores), ``outputs`` what is made of the scores (cohort table, heatmaps,
GeoJSON, report), ``patches`` the patch-folder stages (zero-shot and few-shot),
``learning`` the heads trained on stored features, ``sites`` the site signature,
``reports`` and ``pairing`` what is learned from pathology reports."""

from __future__ import annotations

from .batch import pick_slides, run_batch
from .learning import run_fit, run_predict
from .outputs import run_evaluate_segmentation, run_export_geojson, run_heatmap, run_report, run_summarize
from .pairing import run_distill, run_pair_reports
from .patches import run_classify_patches, run_few_shot
from .pipeline import (
    open_for,
    run_calibrate,
    run_embed_prompts,
    run_encode,
    run_encoders,
    run_info,
    run_inspect,
    run_make_demo_slides,
    run_score,
    run_tile,
    run_tissue,
    run_unlock,
)
from .reports import run_train_reports
from .run_record import run_record
from .screening import run_screen_prompts
from .sites import run_site_signature

__all__ = [
    "open_for",
    "pick_slides",
    "run_batch",
    "run_calibrate",
    "run_classify_patches",
    "run_distill",
    "run_embed_prompts",
    "run_encode",
    "run_encoders",
    "run_evaluate_segmentation",
    "run_export_geojson",
    "run_few_shot",
    "run_fit",
    "run_heatmap",
    "run_info",
    "run_inspect",
    "run_make_demo_slides",
    "run_pair_reports",
    "run_predict",
    "run_record",
    "run_report",
    "run_score",
    "run_screen_prompts",
    "run_site_signature",
    "run_summarize",
    "run_tile",
    "run_tissue",
    "run_train_reports",
    "run_unlock",
]
