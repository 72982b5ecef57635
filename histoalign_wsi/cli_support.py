"""Checks the workflow runs before any job: configuration semantics, encoder and prompt-bag
names, and the cohort (ids, duplicates, paths); plus the partial summary on failure."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cohort import SlideEntry, discover_slides
from .config import validate_config
from .encoders import get_entry, load_registry
from .errors import ConfigError, HistoAlignError
from .prompts import load_bag

__all__ = ["bag_file", "check_workflow_config", "write_partial_summary"]

log = logging.getLogger(__name__)


def check_workflow_config(config: Mapping[str, Any]) -> dict[str, SlideEntry]:
    """Validate everything a run depends on; ``slide_id -> entry``.

    Raises
    ------
    ConfigError
        Naming the offending key or value (scales, encoder, prompt bag, slides, sheet rows).
    """
    try:
        cfg = validate_config(config)
        registry = load_registry(cfg["encoder_registry"])
        for name in cfg["encoders"]:
            get_entry(name, registry)
        unknown_w = set(cfg["encoder_weights"]) - set(cfg["encoders"])
        if unknown_w:
            raise ConfigError(f"encoder_weights names encoders that are not configured: {sorted(unknown_w)}")
        load_bag(cfg["prompt_bag"])
        entries = discover_slides(cfg["slides"])
    except HistoAlignError as exc:
        raise ConfigError(f"configuration check failed: {exc}") from exc
    return {e.slide_id: e for e in entries}


def bag_file(name_or_path: str) -> str:
    """The YAML file behind a prompt bag name (a workflow input, so edits rerun scoring)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return str(p)
    from importlib import resources

    return str(resources.files("histoalign_wsi").joinpath("prompts", f"{name_or_path}.yaml"))


def write_partial_summary(results: str | Path, slide_ids: list[str]) -> Path | None:
    """After a failed run: ``predictions.csv`` of the slides that completed, and
    ``failed_slides.tsv`` with the last line of each failed slide's logs."""
    from ._atomic import atomic_file
    from .predictions import summarize

    res = Path(results)
    done = [
        res / "predictions" / f"{s}.json" for s in slide_ids if (res / "predictions" / f"{s}.json").is_file()
    ]
    failed = [s for s in slide_ids if not (res / "predictions" / f"{s}.json").is_file()]
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
    return_path = res / "predictions.csv"
    summarize(done, return_path)
    log.warning("partial predictions.csv: %d of %d slides completed", len(done), len(slide_ids))
    return return_path
