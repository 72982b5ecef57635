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

__all__ = [
    "Workflow",
    "bag_file",
    "finish_run",
    "folder_of",
    "load_workflow",
    "start_run",
    "write_failure_report",
    "write_partial_summary",
]

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

    def calibration_flag(self, inputs: Any) -> str:
        if "calibration" not in _names(inputs):
            return ""
        return f"--calibration {shlex.quote(str(inputs['calibration']))}"

    def score_inputs(self, slide_id: str) -> dict[str, str]:
        r = self.results
        d = {"features": f"{r}/features/{slide_id}.zarr", "text": f"{r}/text_embeddings.npz"}
        if self.config.calibration:
            d["calibration"] = f"{r}/calibration.json"
        return d

    @property
    def head_names(self) -> list[str]:
        """The heads ``fit`` trains (``abmil`` brings its ablation along)."""
        h = list(self.config.heads)
        return list(dict.fromkeys([*h, *(["abmil_noscale"] if "abmil" in h else [])]))

    @property
    def with_attention(self) -> bool:
        """Heatmaps and GeoJSON carry the abmil head's attention (heads set, labels given)."""
        return "abmil" in self.config.heads and bool(self.labels_sheet)

    def attention_input(self, slide_id: str) -> dict[str, str]:
        return {"attention": f"{self.results}/attention"} if self.with_attention else {}

    def attention_flag(self, inputs: Any, slide_id: str) -> str:
        if "attention" not in _names(inputs):
            return ""
        return f"--attention {shlex.quote(str(Path(str(inputs['attention'])) / f'{slide_id}.parquet'))}"

    def fit_labels_flag(self) -> str:
        return f"--labels {shlex.quote(self.labels_sheet)}" if self.labels_sheet else ""

    def reports_input(self, wildcards: Any = None) -> list[str]:
        """The report sheet as the input of ``train_reports`` (a changed sheet retrains);
        asked for without ``reports`` configured, the target is refused before any job."""
        if not self.config.reports:
            raise ConfigError("the train_reports target needs a report sheet: --config reports=PATH")
        return [self.config.reports]

    def corpus_input(self, wildcards: Any = None) -> list[str]:
        """The report corpus as the input of ``pair_reports`` (and so of ``distill``)."""
        if not self.config.report_corpus:
            raise ConfigError(
                "the pair_reports and distill targets need a corpus: --config report_corpus=PATH"
            )
        return [self.config.report_corpus]

    def distill_labels_input(self, wildcards: Any = None) -> list[str]:
        if not self.labels_sheet:
            raise ConfigError("the distill target needs labels: --config labels=PATH")
        return [self.labels_sheet]

    def reports_flag(self) -> str:
        return f"--reports {shlex.quote(self.config.reports)}" if self.config.reports else ""

    def corpus_flag(self) -> str:
        return f"--corpus {shlex.quote(self.config.report_corpus)}" if self.config.report_corpus else ""

    def learned_from_reports(self) -> dict[str, str]:
        """The report-learning results the report page shows, when configured: the
        slide-report models' metrics (``reports``), the distilled classifier's
        (``report_corpus`` with labels)."""
        r = self.results
        out = {}
        if self.config.reports:
            out["reports"] = f"{r}/reports/metrics.json"
        if self.config.report_corpus and self.labels_sheet:
            out["distill"] = f"{r}/distill/metrics.json"
        return out

    def final_outputs(self) -> list[str]:
        r = self.results
        out = [f"{r}/predictions.csv", f"{r}/report.html"]
        out += [f"{r}/heatmaps/{s}" for s in self.slides]
        out += [f"{r}/geojson/{s}.geojson" for s in self.slides]
        if self.labels_sheet:
            out.append(f"{r}/metrics.json")
        return out + list(self.learned_from_reports().values())


def _names(inputs: Any) -> set[str]:
    """The names of a rule's inputs (Snakemake's ``input`` is a list with names; ``in``
    on it looks at the file paths, not the names)."""
    return set(inputs.keys()) if hasattr(inputs, "keys") else set()


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
        _check_reports(cfg, cohort)
    except HistoAlignError as exc:
        raise ConfigError(f"configuration check failed: {exc}") from exc
    return Workflow(cfg, cohort, sheet)


def _check_reports(cfg: Config, cohort: Mapping[str, SlideEntry]) -> None:
    """A configured report sheet is read and matched to the cohort, and a configured
    corpus must exist, before any job runs."""
    from .learn.reports import read_reports

    if cfg.reports:
        sheet = read_reports(cfg.reports)
        unmatched = [s for s in sheet.ids if s not in cohort]
        if unmatched:
            raise ConfigError(
                f"report sheet {cfg.reports!r}: {len(unmatched)} slide id(s) are not in the cohort: "
                + ", ".join(map(repr, unmatched[:20]))
            )
    if cfg.report_corpus and not Path(cfg.report_corpus).exists():
        raise ConfigError(f"report_corpus {cfg.report_corpus!r} does not exist")


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


def _error_line(log: Path) -> str | None:
    """The error a stage reported: its ``histoalign-wsi ...: error:`` line, else the last
    line that mentions an error."""
    lines = log.read_text(errors="replace").splitlines()
    ours = [ln for ln in lines if ": error:" in ln]
    if ours:
        return ours[-1].strip()
    other = [ln for ln in lines if "error" in ln.lower()]
    return other[-1].strip() if other else None


def _slide_outputs(res: Path, slide_id: str) -> list[Path]:
    return [
        res / "predictions" / f"{slide_id}.json",
        res / "heatmaps" / slide_id,
        res / "geojson" / f"{slide_id}.geojson",
    ]


def write_failure_report(
    results: str | Path, slide_ids: list[str], *, recheck_only: bool = False
) -> list[str]:
    """``failed_slides.tsv``: every slide missing any of its final outputs, with the error
    line of each stage that failed; removed when no slide failed. ``recheck_only`` (after
    a successful run) only drops the listed slides that are now complete, so a run of a
    partial target does not list slides it was not asked to finish. Returns the failed ids."""
    from ._atomic import atomic_file

    res = Path(results)
    target = res / "failed_slides.tsv"
    if recheck_only:
        if not target.is_file():
            return []
        listed = {ln.split("\t", 1)[0] for ln in target.read_text(encoding="utf-8").splitlines()[1:]}
        slide_ids = [s for s in slide_ids if s in listed]
    failed = [s for s in slide_ids if not all(p.exists() for p in _slide_outputs(res, s))]
    if not failed:
        target.unlink(missing_ok=True)
        return []
    rows = []
    for s in failed:
        msgs = [
            f"{lg.parent.name}: {line}"
            for lg in sorted((res / "logs").glob(f"*/{s}.log"))
            if (line := _error_line(lg)) is not None
        ]
        rows.append(f"{s}\t{' | '.join(msgs) or 'not completed'}")
    with atomic_file(target) as tmp:
        tmp.write_text("slide_id\terror\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return failed


def start_run(results: str | Path) -> None:
    """Take the results-folder lock (see :mod:`histoalign_wsi.runlock`)."""
    from .runlock import acquire

    acquire(results)


def finish_run(results: str | Path, slide_ids: list[str], *, ok: bool) -> None:
    """After a run: bring ``failed_slides.tsv`` up to date (rewritten or removed); after a
    failed one also the partial ``predictions.csv`` of the slides that completed; then
    release the lock."""
    from .runlock import release

    try:
        write_failure_report(results, slide_ids, recheck_only=ok)
        if not ok:
            write_partial_summary(results, slide_ids)
    finally:
        release(results)


def write_partial_summary(results: str | Path, slide_ids: list[str]) -> Path | None:
    """After a failed run: ``predictions.csv`` of the slides that were scored."""
    from .outputs.predictions import summarize
    from .zeroshot.prediction import load_predictions

    res = Path(results)
    done = [p for s in slide_ids if (p := res / "predictions" / f"{s}.json").is_file()]
    if not done:
        return None
    summarize(load_predictions(done), res / "predictions.csv")
    log.warning("partial predictions.csv: %d of %d slides scored", len(done), len(slide_ids))
    return res / "predictions.csv"
