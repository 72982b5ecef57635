"""The cohort: slides from a directory or a CSV/TSV sheet, wildcard-safe unique ids,
and optional labels."""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jsonschema

from ..config import load_schema
from ..errors import ConfigError
from .reader import SLIDE_EXTENSIONS

__all__ = ["SlideEntry", "discover_slides", "read_labels", "read_patients", "slide_id_for"]

# Unicode letters and digits are kept (Snakemake wildcards and file systems take them), so
# `café.svs` is `café` and `中文.svs` is `中文`; every other run of characters becomes `_`.
_UNSAFE = re.compile(r"[^\w.-]+")
SLIDE_ID_PATTERN = r"[^\W_][\w.-]*"


@dataclass(frozen=True)
class SlideEntry:
    slide_id: str
    path: Path
    mpp: float | None = None
    label: str | None = None


def _strip_ext(name: str) -> str:
    low = name.lower()
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def slide_id_for(path: str | Path) -> str:
    """File name without extension (NFC), with runs of characters other than Unicode
    letters, digits, ``.``, ``-`` and ``_`` replaced by ``_``."""
    raw = unicodedata.normalize("NFC", _strip_ext(Path(path).name))
    sid = _UNSAFE.sub("_", raw).strip("_.-") or "slide"
    if not sid[0].isalnum():
        sid = "s" + sid
    return sid


def _check_unique(entries: Iterable[SlideEntry]) -> list[SlideEntry]:
    seen: dict[str, Path] = {}
    out = []
    for e in entries:
        if e.slide_id in seen:
            raise ConfigError(
                f"duplicate slide id {e.slide_id!r}: {str(seen[e.slide_id])!r} and {str(e.path)!r}"
            )
        seen[e.slide_id] = e.path
        out.append(e)
    return out


def _read_sheet(sheet: Path) -> list[SlideEntry]:
    delim = "\t" if sheet.suffix.lower() in (".tsv", ".tab") else ","
    with sheet.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter=delim))
    validator = jsonschema.Draft202012Validator(load_schema("sheet"))
    entries = []
    for i, row in enumerate(rows, start=2):
        rec: dict[str, object] = {k.strip(): (v.strip() if v else None) for k, v in row.items() if k}
        if rec.get("mpp") is not None:
            try:
                rec["mpp"] = float(str(rec["mpp"]))
            except ValueError as exc:
                raise ConfigError(f"{sheet}: line {i}: mpp {rec['mpp']!r} is not a number") from exc
        err = next(iter(validator.iter_errors(rec)), None)
        if err is not None:
            where = ".".join(str(p) for p in err.path) or "row"
            raise ConfigError(f"{sheet}: line {i}: {where}: {err.message}")
        p = Path(str(rec["path"]))
        if not p.is_absolute():
            p = (sheet.parent / p).resolve()
        if not p.exists():
            raise ConfigError(f"{sheet}: line {i}: slide {rec['slide_id']!r}: path {str(p)!r} does not exist")
        entries.append(
            SlideEntry(
                slide_id=str(rec["slide_id"]),
                path=p,
                mpp=rec.get("mpp"),  # type: ignore[arg-type]
                label=rec.get("label"),  # type: ignore[arg-type]
            )
        )
    if not entries:
        raise ConfigError(f"slide sheet {str(sheet)!r} has no rows")
    return entries


def discover_slides(slides: str | Path) -> list[SlideEntry]:
    """Slides from a directory (files with known slide extensions) or a CSV/TSV sheet.

    Raises
    ------
    ConfigError
        Missing or empty folder, bad sheet rows, duplicate ids.
    """
    src = Path(slides)
    if not src.exists():
        raise ConfigError(f"slides: {str(src)!r} does not exist")
    if src.is_dir():
        files = sorted(
            p
            for p in src.iterdir()
            if p.is_file() and p.name.lower().endswith(SLIDE_EXTENSIONS) and not p.name.startswith(".")
        )
        if not files:
            raise ConfigError(
                f"slides: folder {str(src)!r} holds no slide files (looked for {', '.join(SLIDE_EXTENSIONS)})"
            )
        return _check_unique(SlideEntry(slide_id_for(p), p.resolve()) for p in files)
    if src.suffix.lower() in (".csv", ".tsv", ".tab"):
        return _check_unique(_read_sheet(src))
    raise ConfigError(f"slides: {str(src)!r} is neither a folder nor a .csv/.tsv sheet")


def read_labels(path: str | Path) -> dict[str, str]:
    """``slide_id -> label`` from a CSV/TSV with those two columns."""
    p = Path(path)
    delim = "\t" if p.suffix.lower() in (".tsv", ".tab") else ","
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter=delim)
            if not reader.fieldnames or not {"slide_id", "label"} <= set(reader.fieldnames):
                raise ConfigError(f"label sheet {str(p)!r} needs columns slide_id,label")
            return {r["slide_id"].strip(): r["label"].strip() for r in reader if r.get("slide_id")}
    except FileNotFoundError as exc:
        raise ConfigError(f"label sheet {str(p)!r} does not exist") from exc


def read_patients(path: str | Path) -> dict[str, str] | None:
    """``slide_id -> patient_id`` when a label sheet has a ``patient_id`` column (splits
    then keep a patient on one side), else None. An empty cell is the slide's own group."""
    p = Path(path)
    delim = "\t" if p.suffix.lower() in (".tsv", ".tab") else ","
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delim)
            if "patient_id" not in (reader.fieldnames or []):
                return None
            return {
                r["slide_id"].strip(): (r.get("patient_id") or "").strip() or r["slide_id"].strip()
                for r in reader
                if r.get("slide_id")
            }
    except FileNotFoundError as exc:
        raise ConfigError(f"label sheet {str(p)!r} does not exist") from exc
