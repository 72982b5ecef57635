"""The Snakefile's helpers: check everything a run depends on before any job, hand each
rule the config keys its stage reads, name the optional inputs and flags, and write the
partial summary when jobs fail. Imports no model framework (parsing the Snakefile must
stay fast and work where torch is absent)."""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from .batches import cut_batches, retry_token
from .config import STAGE_KEYS, Config, validate_config
from .errors import ConfigError, HistoAlignError
from .features import get_entry, load_registry
from .slides.cohort import SlideEntry, discover_slides, read_labels
from .workflow_keys import MadeFrom, forced_stages_of, run_only_keys
from .zeroshot.prompts import load_bag

__all__ = [
    "Workflow",
    "bag_file",
    "check_config_file",
    "folder_of",
    "forced_stages_of",
    "load_workflow",
    "results_of",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workflow(MadeFrom):
    """The validated configuration and the cohort, as the rules need them."""

    config: Config
    cohort: Mapping[str, SlideEntry]
    labels_sheet: str | None

    @property
    def results(self) -> str:
        return self.config.results

    @functools.cached_property
    def slides(self) -> list[str]:
        """The cohort's slide ids, sorted (computed once: rules ask for it per job)."""
        return sorted(self.cohort)

    # --- batches: each per-slide stage runs on `slides_per_job` slides per job ---------

    @functools.cached_property
    def batches(self) -> dict[str, list[str]]:
        """Batch id (``b00000``...) -> its slide ids: the sorted cohort in runs of
        ``slides_per_job``."""
        return cut_batches(self.slides, self.config.slides_per_job)

    @functools.cached_property
    def _batch_index(self) -> dict[str, str]:
        return {s: b for b, ids in self.batches.items() for s in ids}

    def batch_of(self, slide_id: str) -> str:
        return self._batch_index[slide_id]

    def batch_paths(self, batch: str) -> list[str]:
        """The batch's slide files (its jobs' inputs: a changed slide reruns them)."""
        return [str(self.cohort[s].path) for s in self.batches[batch]]

    def spec(self, batch: str) -> str:
        """The batch's slides for ``histoalign-wsi batch --spec``: [[id, path, mpp], ...]."""
        return json.dumps(
            [[s, str(self.cohort[s].path), self.cohort[s].mpp] for s in self.batches[batch]],
            ensure_ascii=False,
        )

    def spec_of(self, slide_id: str) -> str:
        """One slide as a batch spec (the ``slide`` target)."""
        e = self.cohort[slide_id]
        return json.dumps([[slide_id, str(e.path), e.mpp]], ensure_ascii=False)

    def manifest(self, stage: str, batch: str) -> str:
        return f"{self.results}/batches/{stage}/{batch}.tsv"

    def manifests(self, stage: str) -> list[str]:
        return [self.manifest(stage, b) for b in self.batches]

    def retry(self, stage: str, batch: str) -> str:
        """The batch rule's ``retry`` param: changes after a run with failed slides, so
        the next run tries them again (see :func:`histoalign_wsi.batches.retry_token`)."""
        return retry_token(self.manifest(stage, batch))

    def finish_inputs(self, batch: str) -> dict[str, str]:
        d = {"upstream": self.manifest("encode", batch), "text": f"{self.results}/text_embeddings.npz"}
        if self.config.calibration:
            d["calibration"] = f"{self.results}/calibration.json"
        if self.config.protocol == "keep" and self.config.keep.screening:
            d["screening"] = f"{self.results}/prompt_screening.json"
        if self.with_attention:
            d["attention"] = f"{self.results}/attention"
        return d

    def finish_flags(self, inputs: Any) -> str:
        names = _names(inputs)
        flags = []
        for key in ("calibration", "screening"):
            if key in names:
                flags.append(f"--{key} {shlex.quote(str(inputs[key]))}")
        if "attention" in names:
            flags.append("--attention")
        return " ".join(flags)

    def cluster(self, rule: str) -> dict[str, str]:
        """A rule's ``slurm_partition`` and ``slurm_account`` from ``cluster:`` (nothing
        when unset): on the rule, so the profile's runtime, memory and CPUs stay whole."""
        c = self.config.cluster
        part = (c.gpu_partition or c.partition) if rule == "encode" else c.partition
        return {k: v for k, v in (("slurm_partition", part), ("slurm_account", c.account)) if v}

    def settings(self, stage: str) -> str:
        """``--set`` options carrying only the config keys ``stage`` reads (see
        :data:`histoalign_wsi.config.STAGE_KEYS`), so that a change of, say, the prompt
        bag reruns only the stages that read it. Keys that change how a stage runs but not
        what it writes (``encode.batch_size``) are left out: :meth:`run_settings` hands
        them over as a resource, which Snakemake does not rerun a job for."""
        raw = self.config.raw
        run_only = run_only_keys(stage)
        out = []
        for k in STAGE_KEYS[stage]:
            v = raw[k]
            if k in run_only and isinstance(v, Mapping):
                v = {a: b for a, b in v.items() if a not in run_only[k]}
            out.append(shlex.quote(f"--set={k}={json.dumps(v, sort_keys=True)}"))
        return " ".join(out)

    def slide_path(self, slide_id: str) -> str:
        return str(self.cohort[slide_id].path)

    def mpp_flag(self, slide_id: str) -> str:
        mpp = self.cohort[slide_id].mpp
        return f"--mpp {mpp}" if mpp else ""

    def labels_flags(self) -> str:
        """The summarize flags: the metrics' paths always (without labels, files an earlier
        labelled run left there are removed), the label sheet when there is one."""
        r = self.results
        metrics, confusion = shlex.quote(f"{r}/metrics.json"), shlex.quote(f"{r}/confusion_matrix.png")
        paths = f"--metrics {metrics} --confusion {confusion}"
        return f"--labels {shlex.quote(self.labels_sheet)} {paths}" if self.labels_sheet else paths

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
            _refuse("the train_reports target needs a report sheet: --config reports=PATH")
        return [self.config.reports]

    def corpus_input(self, wildcards: Any = None) -> list[str]:
        """The report corpus as the input of ``pair_reports`` (and so of ``distill``)."""
        if not self.config.report_corpus:
            _refuse("the pair_reports and distill targets need a corpus: --config report_corpus=PATH")
        return [self.config.report_corpus]

    def distill_labels_input(self, wildcards: Any = None) -> list[str]:
        if not self.labels_sheet:
            _refuse("the distill target needs labels: --config labels=PATH")
        return [self.labels_sheet]

    def reports_flag(self) -> str:
        return f"--reports {shlex.quote(self.config.reports)}" if self.config.reports else ""

    def corpus_flag(self) -> str:
        return f"--corpus {shlex.quote(self.config.report_corpus)}" if self.config.report_corpus else ""

    def learned_from_reports(self) -> dict[str, str]:
        """The learning results the report page shows, when configured: the heads'
        cross-validated metrics and predictions (``heads`` with labels), the slide-report
        models' metrics (``reports``), the distilled classifier's (``report_corpus`` with
        labels)."""
        r = self.results
        out = {}
        if self.config.heads and self.labels_sheet:  # the heads' table and prediction columns
            out["models"] = f"{r}/models"  # fit's folder: cv_metrics.json, one folder per head
            out |= {f"head_{h}": f"{r}/heads/{h}/predictions.csv" for h in self.head_names}
        if self.config.reports:
            out["reports"] = f"{r}/reports/metrics.json"
        if self.config.report_corpus and self.labels_sheet:
            out["distill"] = f"{r}/distill/metrics.json"
        if self.site_key is not None:
            out["site_signature"] = f"{r}/site_signature.json"
        return out

    def final_outputs(self) -> list[str]:
        r = self.results
        out = [f"{r}/predictions.csv", f"{r}/report.html", *self.manifests("finish")]
        if self.labels_sheet:
            out.append(f"{r}/metrics.json")
        return out + list(self.learned_from_reports().values())

    @functools.cached_property
    def site_key(self) -> Any:
        """The cohort's site key (:class:`histoalign_wsi.sites.SiteKey`), or None."""
        from .sites import sites_for

        cfg = self.config
        return sites_for(self.slides, slides=cfg.slides, labels=self.labels_sheet, pattern=cfg.site_pattern)


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
        _check_places(cfg)
        bag = load_bag(cfg.prompt_bag)
        entries = discover_slides(cfg.slides, strict=cfg.strict_slides)
        cohort = {e.slide_id: e for e in entries}
        sheet = cfg.labels or (cfg.slides if any(e.label for e in entries) else None)
        if sheet is not None:
            # read as summarize will: an empty cell or a slide labelled twice is refused now
            _check_labels(read_labels(sheet), cohort, bag.decision_classes, sheet)
        _check_reports(cfg, cohort)
        from .sites import check_site_settings

        check_site_settings(
            sorted(cohort),
            slides=cfg.slides,
            labels=sheet,
            pattern=cfg.site_pattern,
            grouped=[
                n
                for n, on in (("calibration_groups", cfg.calibration_groups), ("fit.cv", cfg.fit.cv))
                if on == "site"
            ],
        )
    except HistoAlignError as exc:
        raise ConfigError(f"configuration check failed: {exc}") from exc
    return Workflow(cfg, cohort, sheet)


def check_config_file(path: str | Path) -> str | None:
    """The one line that refuses a config file before Snakemake reads it (aliases, nesting
    deeper than a config has), or None when it is fine or absent."""
    from .textfiles import read_yaml

    p = Path(path)
    if not p.is_file():
        return None
    try:
        read_yaml(p, what="configuration file")
    except ConfigError as exc:
        return f"histoalign-wsi: {exc}"
    return None


def _refuse(message: str) -> NoReturn:
    """End the run while Snakemake builds its DAG, with the message alone: an exception
    raised in an input function would come wrapped in Snakemake's traceback."""
    raise SystemExit(f"histoalign-wsi: {message}")


def _check_places(cfg: Config) -> None:
    """The results folder can be made and written; the device exists on this machine."""
    res = Path(cfg.results)
    if res.exists() and not res.is_dir():
        raise ConfigError(f"results {cfg.results!r} is a file, not a folder")
    parent = next((p for p in (res, *res.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"results {cfg.results!r} cannot be written ({str(parent)!r}: permission denied)")
    if cfg.device.startswith("cuda"):
        import torch  # only when a GPU is asked for

        index = int(cfg.device.partition(":")[2] or 0)
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= n:
            have = f"{n} CUDA device(s)" if n else "no CUDA device"
            raise ConfigError(f"device {cfg.device!r} is not available: this machine has {have}")


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


def results_of(key: str, up: int) -> Callable[[Any, Any], str]:
    """A rule's params function: the results folder, ``up`` folders above output
    ``key`` (derived from the output, so it also holds where the filesystem is not
    shared)."""

    def folder(wildcards: Any, output: Any) -> str:
        return str(Path(str(output[key])).parents[up - 1])

    return folder


def bag_file(name_or_path: str) -> str:
    """The YAML file behind a prompt bag name (a workflow input, so edits rerun scoring)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return str(p)
    return str(resources.files("histoalign_wsi").joinpath("zeroshot", "bags", f"{name_or_path}.yaml"))
