"""Configuration: load config.yaml, validate it against the schema (filling defaults),
and parse it once into frozen dataclasses."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._overrides import merge, parse_overrides
from ._schema import (
    check_bounded,
    check_cross_fields,
    check_finite,
    coerce_strings,
    default_filling_validator,
    load_schema,
    schema_error_line,
)
from .errors import ConfigError
from .stage_keys import STAGE_KEYS
from .textfiles import read_yaml

__all__ = [
    "STAGE_KEYS",
    "AlignmentParams",
    "BootstrapParams",
    "ClusterParams",
    "ConchParams",
    "Config",
    "DistillParams",
    "EncodeParams",
    "FitParams",
    "GeoJSONParams",
    "HeatmapParams",
    "KeepParams",
    "PairingParams",
    "PoolingParams",
    "StainParams",
    "TilingParams",
    "TissueParams",
    "TrainReportsParams",
    "config_hash",
    "load_config",
    "load_schema",
    "parse_overrides",
    "schema_error_line",
    "validate_config",
]


_NULLABLE = (
    "labels",
    "site_pattern",
    "encoder_registry",
    "mpp_override",
    "reports",
    "report_corpus",
    "report_encoder",
)


def validate_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``raw`` against the schema, fill defaults, and check cross-field rules.

    Raises
    ------
    ConfigError
        Naming the offending key and value.
    """
    check_bounded(raw)
    cfg = json.loads(json.dumps(dict(raw)))
    for key in _NULLABLE:
        # `--config labels=null` reaches us from snakemake as the string "null"; an empty
        # value (`labels=`) clears a key too
        if isinstance(cfg.get(key), str) and cfg[key].strip().lower() in ("", "null", "none", "~"):
            cfg[key] = None
    schema = load_schema("config")
    cfg = coerce_strings(cfg, schema)  # numbers and booleans from snakemake --config
    check_finite(cfg)  # before the schema, whose bounds would word infinity oddly
    validator = default_filling_validator()(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        raise ConfigError(f"invalid configuration: {schema_error_line(errors[0])}")
    check_cross_fields(cfg)
    return cfg


# The dataclasses carry no defaults: every default lives in the schema, which fills it in
# before :meth:`Config.from_validated` runs.


@dataclass(frozen=True)
class TissueParams:
    mask_mpp: float
    min_saturation: float
    max_value: float
    min_value: float
    closing_um: float
    min_area_um2: float
    max_hole_um2: float


@dataclass(frozen=True)
class TilingParams:
    scales_mpp: tuple[float, ...]
    tile_px: int
    min_tissue_fraction: float
    max_upsampling: float | None = 2.0


@dataclass(frozen=True)
class EncodeParams:
    batch_size: int
    readers: int
    prefetch: int
    native_jpeg: bool
    device_jpeg: str


@dataclass(frozen=True)
class AlignmentParams:
    rule: str
    temperature: float
    topk: float


@dataclass(frozen=True)
class PoolingParams:
    method: str
    topk: float
    soft_temperature: float
    scale_weights: tuple[float, ...] | None
    parent_context: float
    top_tiles: int


@dataclass(frozen=True)
class ConchParams:
    scale_mpp: float
    topj: int
    report_topj: tuple[int, ...]


@dataclass(frozen=True)
class KeepParams:
    scale_mpp: float
    screening: bool
    top_n: int
    max_sets: int
    seed: int
    other_classes: bool
    smoothing: bool
    vote: bool


@dataclass(frozen=True)
class FitParams:
    folds: int
    seed: int
    epochs: int
    cv: str = "kfold"


@dataclass(frozen=True)
class ClusterParams:
    partition: str | None
    gpu_partition: str | None
    account: str | None
    encode_gpus: int = 1


@dataclass(frozen=True)
class BootstrapParams:
    resamples: int
    seed: int


@dataclass(frozen=True)
class StainParams:
    method: str
    reference: str


@dataclass(frozen=True)
class TrainReportsParams:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    hidden: int
    temperature: float
    seed: int
    val_fraction: float
    test_fraction: float
    probe_folds: int
    split_by: str = "patient"


@dataclass(frozen=True)
class PairingParams:
    k: int
    temperature: float


@dataclass(frozen=True)
class DistillParams:
    epochs: int
    lr: float
    weight_decay: float
    hidden: int
    weight: float
    seed: int
    test_fraction: float
    split_by: str = "patient"


@dataclass(frozen=True)
class HeatmapParams:
    max_size: int
    alpha: float
    mpp: float | None = None
    format: str = "webp"


@dataclass(frozen=True)
class ReportParams:
    embed: bool
    page_size: int


@dataclass(frozen=True)
class GeoJSONParams:
    regions: str
    threshold: float
    simplify_px: float
    gzip: bool


@dataclass(frozen=True)
class Config:
    """The validated configuration; build it with :func:`load_config`."""

    slides: str
    results: str
    strict_slides: bool
    labels: str | None
    reader: str
    mpp_override: float | None
    max_read_megapixels: float
    encoders: tuple[str, ...]
    encoder_weights: Mapping[str, float]
    encoder_registry: str | None
    prompt_bag: str
    offline: bool
    device: str
    tissue: TissueParams
    tiling: TilingParams
    encode: EncodeParams
    alignment: AlignmentParams
    pooling: PoolingParams
    protocol: str
    conch: ConchParams
    keep: KeepParams
    calibration: bool
    calibration_weighting: str
    calibration_groups: str
    site_pattern: str | None
    cluster: ClusterParams
    bootstrap: BootstrapParams
    stain: StainParams
    heads: tuple[str, ...]
    fit: FitParams
    reports: str | None
    report_corpus: str | None
    report_encoder: str | None
    train_reports: TrainReportsParams
    pairing: PairingParams
    distill: DistillParams
    heatmap: HeatmapParams
    geojson: GeoJSONParams
    report: ReportParams
    slides_per_job: int
    prune: bool
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_validated(cls, cfg: Mapping[str, Any]) -> Config:
        pool = dict(cfg["pooling"])
        if pool["scale_weights"] is not None:
            pool["scale_weights"] = tuple(pool["scale_weights"])
        return cls(
            slides=cfg["slides"],
            results=cfg["results"],
            strict_slides=bool(cfg["strict_slides"]),
            labels=cfg["labels"],
            reader=cfg["reader"],
            mpp_override=cfg["mpp_override"],
            max_read_megapixels=float(cfg["max_read_megapixels"]),
            encoders=tuple(cfg["encoders"]),
            encoder_weights=dict(cfg["encoder_weights"]),
            encoder_registry=cfg["encoder_registry"],
            prompt_bag=cfg["prompt_bag"],
            offline=cfg["offline"],
            device=cfg["device"],
            tissue=TissueParams(**cfg["tissue"]),
            tiling=TilingParams(
                scales_mpp=tuple(float(s) for s in cfg["scales_mpp"]),
                tile_px=cfg["tile_px"],
                min_tissue_fraction=cfg["tiling"]["min_tissue_fraction"],
                max_upsampling=cfg["tiling"]["max_upsampling"],
            ),
            encode=EncodeParams(**cfg["encode"]),
            alignment=AlignmentParams(**cfg["alignment"]),
            pooling=PoolingParams(**pool),
            protocol=cfg["protocol"],
            conch=ConchParams(
                scale_mpp=float(cfg["conch"]["scale_mpp"]),
                topj=int(cfg["conch"]["topj"]),
                report_topj=tuple(int(j) for j in cfg["conch"]["report_topj"]),
            ),
            keep=KeepParams(**cfg["keep"]),
            calibration=cfg["calibration"],
            calibration_weighting=cfg["calibration_weighting"],
            calibration_groups=cfg["calibration_groups"],
            site_pattern=cfg["site_pattern"],
            cluster=ClusterParams(**cfg["cluster"]),
            bootstrap=BootstrapParams(**cfg["bootstrap"]),
            stain=StainParams(**cfg["stain"]),
            heads=tuple(cfg["heads"]),
            fit=FitParams(**cfg["fit"]),
            reports=cfg["reports"],
            report_corpus=cfg["report_corpus"],
            report_encoder=cfg["report_encoder"],
            train_reports=TrainReportsParams(**cfg["train_reports"]),
            pairing=PairingParams(**cfg["pairing"]),
            distill=DistillParams(**cfg["distill"]),
            heatmap=HeatmapParams(**cfg["heatmap"]),
            geojson=GeoJSONParams(**cfg["geojson"]),
            report=ReportParams(**cfg["report"]),
            slides_per_job=int(cfg["slides_per_job"]),
            prune=bool(cfg["prune"]),
            raw=cfg,
        )


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read ``path`` (optional), apply ``overrides``, validate and parse.

    Without a file the configuration is the schema's defaults (``slides`` set to ``"."``
    so stage subcommands, which take their inputs as arguments, can run stand-alone).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p, what="configuration file")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {str(p)!r} must hold a mapping")
        raw = loaded or {}
    if overrides:
        merge(raw, overrides)
    raw.setdefault("slides", ".")
    return Config.from_validated(validate_config(raw))


def config_hash(cfg: Config, stage: str) -> str:
    """Short hash of the keys ``stage`` reads: it ties an output to the settings that made it."""
    sub = {k: cfg.raw.get(k) for k in sorted(STAGE_KEYS[stage])}
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]
