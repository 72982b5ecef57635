"""The cohort: slides from a directory or a CSV/TSV sheet, wildcard-safe unique ids,
and optional labels."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jsonschema

from ..config import load_schema
from ..errors import ConfigError
from ..textfiles import Row, read_rows
from .reader import SLIDE_EXTENSIONS

__all__ = ["SlideEntry", "discover_slides", "read_labels", "read_patients", "slide_id_for"]

# Unicode letters and digits are kept (Snakemake wildcards and file systems take them), so
# `café.svs` is `café` and `中文.svs` is `中文`; every other run of characters becomes `_`.
_UNSAFE = re.compile(r"[^\w.-]+")
log = logging.getLogger(__name__)
SLIDE_ID_PATTERN = r"[^\W_][\w.-]*"
#: longest slide id in bytes (file names are limited to 255); a longer one is cut and
#: given a short hash of the whole name
_MAX_ID_BYTES = 120


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
    if len(sid.encode("utf-8")) > _MAX_ID_BYTES:  # outputs are named {id}.json, {id}_argmax.webp...
        digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:8]
        cut = sid.encode("utf-8")[: _MAX_ID_BYTES - 9].decode("utf-8", "ignore").rstrip("_.-")
        sid = f"{cut}_{digest}"
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
    _, rows = read_rows(sheet, "slide sheet")
    validator = jsonschema.Draft202012Validator(load_schema("sheet"))
    entries = []
    for i, row in rows:
        rec: dict[str, object] = {k: (v or None) for k, v in row.items()}
        if rec.get("mpp") is not None:
            try:
                rec["mpp"] = float(str(rec["mpp"]))
            except ValueError as exc:
                raise ConfigError(f"{sheet}: {i}: mpp {rec['mpp']!r} is not a number") from exc
            if not math.isfinite(float(str(rec["mpp"]))):
                raise ConfigError(f"{sheet}: {i}: mpp {rec['mpp']!r} is not a finite number")
        err = next(iter(validator.iter_errors(rec)), None)
        if err is not None:
            where = ".".join(str(p) for p in err.path) or "row"
            raise ConfigError(f"{sheet}: {i}: {where}: {err.message}")
        p = Path(str(rec["path"]))
        if not p.is_absolute():
            p = Path(os.path.abspath(sheet.parent / p))  # a link keeps its own name
        if not p.exists():
            raise ConfigError(f"{sheet}: {i}: slide {rec['slide_id']!r}: path {str(p)!r} does not exist")
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


def discover_slides(slides: str | Path, *, strict: bool = False) -> list[SlideEntry]:
    """Slides from a directory (files with known slide extensions) or a CSV/TSV sheet.
    A link in the folder that points to nothing is left out with a warning naming it
    (refused when ``strict``).

    Raises
    ------
    ConfigError
        Missing, unreadable or empty folder, bad sheet rows, duplicate ids.
    """
    src = Path(slides)
    if not src.exists():
        raise ConfigError(f"slides: {str(src)!r} does not exist")
    if src.is_dir():
        # absolute, links not followed: a slide reached through a link is named as written
        return _check_unique(
            SlideEntry(slide_id_for(p), Path(os.path.abspath(p))) for p in _folder(src, strict)
        )
    if src.suffix.lower() in (".csv", ".tsv", ".tab"):
        return _check_unique(_read_sheet(src))
    raise ConfigError(f"slides: {str(src)!r} is neither a folder nor a .csv/.tsv sheet")


def _folder(src: Path, strict: bool) -> list[Path]:
    try:
        listing = list(src.iterdir())
    except PermissionError as exc:
        raise ConfigError(f"slides: folder {str(src)!r} cannot be read (permission denied)") from exc
    names = sorted(p for p in listing if p.name.lower().endswith(SLIDE_EXTENSIONS) and p.name[0] != ".")
    broken = [p for p in names if p.is_symlink() and not p.exists()]  # dangling, or a loop
    if broken:
        msg = (
            f"slides: {len(broken)} link(s) in {str(src)!r} point to nothing: "
            + ", ".join(repr(p.name) for p in broken[:10])
            + (" ..." if len(broken) > 10 else "")
        )
        if strict:
            raise ConfigError(f"{msg} (strict_slides is on)")
        log.warning("%s; left out of the cohort (strict_slides: true refuses)", msg)
    odd = [p for p in names if p.exists() and not p.is_file()]  # a folder or a device named x.svs
    if odd:
        msg = (
            f"slides: {len(odd)} entr(ies) in {str(src)!r} with a slide's extension are not files "
            "(a folder, a device or a FIFO): " + ", ".join(repr(p.name) for p in odd[:10])
        )
        if strict:
            raise ConfigError(f"{msg} (strict_slides is on)")
        log.warning("%s; left out of the cohort (strict_slides: true refuses)", msg)
    files = [p for p in names if p.is_file()]
    if not files:
        raise ConfigError(
            f"slides: folder {str(src)!r} holds no slide files (looked for {', '.join(SLIDE_EXTENSIONS)})"
        )
    return files


def _label_rows(path: str | Path) -> tuple[Path, list[str], list[Row]]:
    p = Path(path)
    fields, rows = read_rows(p, "label sheet")
    if not {"slide_id", "label"} <= set(fields):
        raise ConfigError(f"label sheet {str(p)!r} needs columns slide_id,label (it has {', '.join(fields)})")
    return p, fields, [(w, r) for w, r in rows if any(r.values())]  # blank rows are no rows


def read_labels(path: str | Path) -> dict[str, str]:
    """``slide_id -> label`` from a CSV/TSV with those two columns.

    Raises
    ------
    ConfigError
        A row without a slide id or without a label, or a slide given two different
        labels, naming the rows.
    """
    p, _, rows = _label_rows(path)
    out: dict[str, str] = {}
    where: dict[str, str] = {}
    for w, r in rows:
        sid, label = r.get("slide_id", ""), r.get("label", "")
        if not sid:
            raise ConfigError(f"label sheet {str(p)!r}, {w}: empty slide_id")
        if not label:
            raise ConfigError(
                f"label sheet {str(p)!r}, {w}: slide {sid!r} has an empty label (give one, or drop the row)"
            )
        if sid in out and out[sid] != label:
            raise ConfigError(
                f"label sheet {str(p)!r}: slide {sid!r} has two labels, {out[sid]!r} ({where[sid]}) "
                f"and {label!r} ({w})"
            )
        out[sid], where[sid] = label, where.get(sid, w)
    return out


def read_patients(path: str | Path) -> dict[str, str] | None:
    """``slide_id -> patient_id`` when a label sheet has a ``patient_id`` column (splits
    then keep a patient on one side), else None. An empty cell is the slide's own group."""
    _, fields, rows = _label_rows(path)
    if "patient_id" not in fields:
        return None
    return {r["slide_id"]: r.get("patient_id") or r["slide_id"] for _, r in rows if r.get("slide_id")}
