"""Which top-level config keys each stage reads (re-exported by :mod:`.config`)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["STAGE_KEYS"]

#: The top-level config keys each stage reads: the workflow hands a rule exactly these
#: (so that editing, say, the prompt bag reruns only the stages that read it), and a
#: stage's outputs record the hash of these.
STAGE_KEYS: Mapping[str, tuple[str, ...]] = {
    "tissue": ("reader", "mpp_override", "max_read_megapixels", "tissue"),
    "tile": ("reader", "mpp_override", "max_read_megapixels", "tissue", "scales_mpp", "tile_px", "tiling"),
    "encode": ("reader", "encoders", "encoder_registry", "offline", "device", "encode", "stain"),
    "embed_prompts": ("encoders", "encoder_registry", "offline", "device", "prompt_bag", "protocol"),
    "calibrate": (
        "scales_mpp",
        "alignment",
        "protocol",
        "encoder_weights",
        "calibration_weighting",
        "calibration_groups",
        "site_pattern",
        "slides",
        "labels",
    ),
    "score": ("scales_mpp", "alignment", "pooling", "protocol", "conch", "keep", "encoder_weights"),
    "screen_prompts": ("protocol", "keep"),
    "heatmap": ("reader", "mpp_override", "max_read_megapixels", "heatmap"),
    "export_geojson": ("geojson",),
    "report": ("report",),
    # the batched per-slide stages of the workflow (their rules' settings)
    "prepare": ("reader", "mpp_override", "max_read_megapixels", "tissue", "scales_mpp", "tile_px", "tiling"),
    "finish": (
        "scales_mpp",
        "alignment",
        "pooling",
        "protocol",
        "conch",
        "keep",
        "encoder_weights",
        "reader",
        "mpp_override",
        "max_read_megapixels",
        "heatmap",
        "geojson",
    ),
    "fit": ("prompt_bag", "heads", "fit", "site_pattern", "slides", "bootstrap"),
    "summarize": ("site_pattern", "slides", "bootstrap"),
    "run_record": (
        "slides",
        "strict_slides",
        "labels",
        "encoders",
        "encoder_registry",
        "prompt_bag",
        "protocol",
        "scales_mpp",
        "tile_px",
        "tiling",
        "stain",
        "alignment",
        "pooling",
        "conch",
        "keep",
        "encoder_weights",
        "calibration",
        "calibration_weighting",
        "calibration_groups",
        "site_pattern",
    ),
    "site_signature": ("site_pattern", "slides", "encoders", "fit"),
    "predict": ("prompt_bag", "pooling"),
    "train_reports": (
        "encoders",
        "encoder_registry",
        "offline",
        "prompt_bag",
        "report_encoder",
        "train_reports",
        "site_pattern",
        "slides",
    ),
    "pair_reports": ("encoders", "encoder_registry", "offline", "report_encoder", "pairing"),
    "distill": ("prompt_bag", "distill", "site_pattern", "slides"),
}
