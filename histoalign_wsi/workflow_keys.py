"""What each rule's outputs are made from, as the workflow hands it to Snakemake: a
param per rule holding the digest of its inputs' provenance (slide fingerprints, encoder
identities, every expanded prompt, sheet contents, settings and code), so Snakemake reruns
a rule when one of them changes, whatever the files' times say; and the stages a run
forces. The jobs themselves keep every slide whose outputs are current
(:mod:`histoalign_wsi.provenance`). Imports no model framework."""

from __future__ import annotations

import functools
import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import STAGE_KEYS, Config
from .provenance import NOT_OUTPUT, STAGE_VERSIONS, Expected, HashCache, digest, make_record

if TYPE_CHECKING:
    from .slides.cohort import SlideEntry

__all__ = ["MadeFrom", "forced_stages_of", "run_only_keys"]


class MadeFrom:
    """The params of the rules (a mixin of :class:`histoalign_wsi.workflow.Workflow`)."""

    config: Config
    cohort: Mapping[str, SlideEntry]
    labels_sheet: str | None

    if TYPE_CHECKING:

        @property
        def results(self) -> str: ...

        @property
        def batches(self) -> dict[str, list[str]]: ...

    def run_settings(self, stage: str) -> str:
        """The keys :meth:`settings` leaves out, as ``--set`` options (a rule resource)."""
        raw = self.config.raw
        return " ".join(
            shlex.quote(f"--set={k}.{a}={json.dumps(raw[k][a])}")
            for k, subkeys in run_only_keys(stage).items()
            for a in subkeys
        )

    # --- what each rule's outputs are made from (params: a change reruns the rule) -----

    @functools.cached_property
    def hashes(self) -> HashCache:
        """File hashes by stat (``{results}/cache/hashes.json``); saved when the run starts."""
        return HashCache.for_results(self.results)

    @functools.cached_property
    def expected(self) -> Expected:
        return Expected(self.config, self.hashes)

    def prepare_key(self, batch: str) -> str:
        """The batch's slides' fingerprints and sheet MPPs, the settings and the code: a
        slide replaced with its old mtime reruns its batch (which redoes only that slide)."""
        recs = []
        for s in self.batches[batch]:
            e = self.cohort[s]
            try:
                recs.append([s, self.expected.prepare(e.path, e.mpp)])
            except OSError as exc:  # the job fails for this slide, naming the error
                recs.append([s, f"unreadable: {exc}"])
        return digest(recs)

    @functools.cached_property
    def encode_key(self) -> str:
        """Each encoder's identity (registry entry, weights file hash), settings, code."""
        return digest(self.expected.encode(""))

    @functools.cached_property
    def text_key(self) -> str:
        """Every expanded prompt and each encoder's identity, settings, code."""
        return digest(self.expected.text())

    @functools.cached_property
    def finish_key(self) -> str:
        """The scoring, heatmap and GeoJSON settings and code (their inputs are files)."""
        e, cfg = self.expected, self.config
        return digest([e.score("", "", None), make_record("heatmap", cfg, {}), e.geojson({}, "", None)])

    def file_key(self, path: str | None) -> str:
        """A sheet's content hash (empty without one): an edited sheet reruns its rule."""
        return self.hashes.sha256(path) if path and Path(path).is_file() else ""

    @functools.cached_property
    def summarize_key(self) -> str:
        """The label sheet's and slide sheet's contents (labels, patients, sites), code."""
        return digest(
            [self.file_key(self.labels_sheet), self.file_key(self.config.slides), STAGE_VERSIONS["summarize"]]
        )

    def report_show(self) -> str:
        """The report's sections this run makes (``--show``): nothing an earlier run left."""
        show = ["metrics"] if self.labels_sheet else []
        if self.config.heads and self.labels_sheet:
            show.append("heads")
        if self.config.reports:
            show.append("reports")
        if self.config.report_corpus and self.labels_sheet:
            show.append("distill")
        if getattr(self, "site_key", None) is not None:
            show.append("sites")
        return f"--show={','.join(show)}"

    def save_hashes(self) -> None:
        self.hashes.save()


def run_only_keys(stage: str) -> dict[str, tuple[str, ...]]:
    """Config key -> its sub-keys that change how ``stage`` runs, not what it writes."""
    out: dict[str, list[str]] = {}
    for d in NOT_OUTPUT.get(stage, ()):
        if "." in d and d.split(".", 1)[0] in STAGE_KEYS[stage]:
            k, a = d.split(".", 1)
            out.setdefault(k, []).append(a)
    return {k: tuple(v) for k, v in out.items()}


def forced_stages_of(dag_settings: Any) -> list[str]:
    """The stages a run forces (``--forceall``, ``--forcerun RULE``) whose jobs would
    otherwise keep current outputs: they redo every slide (see :mod:`.runlock`)."""
    keeping = ("prepare", "encode", "embed_prompts", "finish")
    if dag_settings is None:
        return []
    if getattr(dag_settings, "forceall", False):
        return list(keeping)
    named = {str(r) for r in getattr(dag_settings, "forcerun", ()) or ()}
    return [s for s in keeping if s in named]
