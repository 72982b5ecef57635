"""The Snakefile's helpers: check everything a run depends on before any job, hand each
rule the config keys its stage reads, name the optional inputs and flags, and write the
partial summary when jobs fail. Imports no model framework (parsing the Snakefile must
stay fast and work where torch is absent)."""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .config import STAGE_KEYS, Config, validate_config
from .errors import ConfigError, HistoAlignError
from .features import get_entry, load_registry
from .slides.cohort import SlideEntry, discover_slides, read_labels
from .zeroshot.prompts import load_bag

__all__ = ["Workflow", "bag_file", "folder_of", "load_workflow", "write_partial_summary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workflow:
    """The validated configuration and the cohort, as the rules need them."""

    config: Config
    cohort: Mapping[str, SlideEntry]
    labels_sheet: str | None

    @property
    def results(self) -> str:
        return self.config.results

    @property
    def slides(self) -> list[str]:
        return sorted(self.cohort)

    def settings(self, stage: str) -> str:
        """``--set`` options carrying only the config keys ``stage`` reads (see
        :data:`histoalign_wsi.config.STAGE_KEYS`), so that a change of, say, the prompt
        bag reruns only the stages that read it."""
        raw = self.config.raw
        return " ".join(
            shlex.quote(f"--set={k}={json.dumps(raw[k], sort_keys=True)}") for k in STAGE_KEYS[stage]
        )

    def slide_path(self, slide_id: str) -> str:
        return str(self.cohort[slide_id].path)

    def mpp_flag(self, slide_id: str) -> str:
        mpp = self.cohort[slide_id].mpp
        return f"--mpp {mpp}" if mpp else ""

    def labels_flags(self) -> str:
        if not self.labels_sheet:
            return ""
        r = self.results
        return (
            f"--labels {shlex.quote(self.labels_sheet)} --metrics {shlex.quote(r + '/metrics.json')} "
            f"--confusion {shlex.quote(r + '/confusion_matrix.png')}"
        )

    def calibration_flag(self, inputs: Mapping[str, Any]) -> str:
        return f"--calibration {shlex.quote(str(inputs['calibration']))}" if "calibration" in inputs else ""

    def score_inputs(self, slide_id: str) -> dict[str, str]:
        r = self.results
        d = {"features": f"{r}/features/{slide_id}.zarr", "text": f"{r}/text_embeddings.npz"}
        if self.config.calibration:
            d["calibration"] = f"{r}/calibration.json"
        return d

    def final_outputs(self) -> list[str]:
        r = self.results
        out = [f"{r}/predictions.csv", f"{r}/report.html"]
        out += [f"{r}/heatmaps/{s}" for s in self.slides]
        out += [f"{r}/geojson/{s}.geojson" for s in self.slides]
        if self.labels_sheet:
            out.append(f"{r}/metrics.json")
        return out


def load_workflow(config: Mapping[str, Any]) -> Workflow:
    """Validate everything a run depends on, before any job runs.

    Raises
    ------
    ConfigError
        Naming the offending key or value (scales, encoder, prompt bag, slides, sheet rows,
        the label sheet and its classes).
    """
    try:
        raw = validate_config(config)
        cfg = Config.from_validated(raw)
        registry = load_registry(cfg.encoder_registry)
        for name in cfg.encoders:
            get_entry(name, registry)
        unknown_w = set(cfg.encoder_weights) - set(cfg.encoders)
        if unknown_w:
            raise ConfigError(f"encoder_weights names encoders that are not configured: {sorted(unknown_w)}")
        bag = load_bag(cfg.prompt_bag)
        entries = discover_slides(cfg.slides)
        cohort = {e.slide_id: e for e in entries}
        sheet = cfg.labels or (cfg.slides if any(e.label for e in entries) else None)
        if sheet is not None:
            labels = read_labels(sheet) if cfg.labels else {e.slide_id: e.label for e in entries if e.label}
            _check_labels(labels, cohort, bag.class_names, sheet)
    except HistoAlignError as exc:
        raise ConfigError(f"configuration check failed: {exc}") from exc
    return Workflow(cfg, cohort, sheet)


def _check_labels(
    labels: Mapping[str, str | None], cohort: Mapping[str, SlideEntry], classes: list[str], sheet: str
) -> None:
    unknown_cls = sorted({v for v in labels.values() if v} - set(classes))
    if unknown_cls:
        raise ConfigError(
            f"label sheet {sheet!r} uses classes not in the prompt bag: {', '.join(unknown_cls)} "
            f"(bag classes: {', '.join(classes)})"
        )
    unknown_ids = sorted(set(labels) - set(cohort))
    if unknown_ids:
        raise ConfigError(f"label sheet {sheet!r} names slides not in the cohort: {', '.join(unknown_ids)}")


def folder_of(key: str) -> Callable[[Any, Any], str]:
    """A rule's params function: the folder holding input ``key`` (derived from the
    input, so it also holds where the filesystem is not shared)."""

    def folder(wildcards: Any, input: Any) -> str:
        return str(Path(str(input[key])).parent)

    return folder


def bag_file(name_or_path: str) -> str:
    """The YAML file behind a prompt bag name (a workflow input, so edits rerun scoring)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return str(p)
    return str(resources.files("histoalign_wsi").joinpath("zeroshot", "bags", f"{name_or_path}.yaml"))


def write_partial_summary(results: str | Path, slide_ids: list[str]) -> Path | None:
    """After a failed run: ``predictions.csv`` of the slides that completed, and
    ``failed_slides.tsv`` with the last error line of each failed slide's logs."""
    from ._atomic import atomic_file
    from .outputs.predictions import summarize
    from .zeroshot.prediction import load_predictions

    res = Path(results)
    jsons = [res / "predictions" / f"{s}.json" for s in slide_ids]
    failed = [s for s, p in zip(slide_ids, jsons, strict=True) if not p.is_file()]
    done = [p for p in jsons if p.is_file()]
    rows = []
    for s in failed:
        msgs = []
        for lg in sorted((res / "logs").glob(f"*/{s}.log")):
            lines = [ln for ln in lg.read_text(errors="replace").splitlines() if "error" in ln.lower()]
            if lines:
                msgs.append(f"{lg.parent.name}: {lines[-1]}")
        rows.append(f"{s}\t{' | '.join(msgs) or 'not completed'}")
    with atomic_file(res / "failed_slides.tsv") as tmp:
        tmp.write_text("slide_id\terror\n" + "".join(r + "\n" for r in rows))
    if not done:
        return None
    summarize(load_predictions(done), res / "predictions.csv")
    log.warning("partial predictions.csv: %d of %d slides completed", len(done), len(slide_ids))
    return res / "predictions.csv"
