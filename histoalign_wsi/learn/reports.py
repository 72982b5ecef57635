"""Pathology reports as input: the report sheet (``slide_id,report``, optionally
``patient_id``, ``label`` and ``split``) as CSV, TSV or JSONL, and an unpaired report
corpus (a folder of text files, or a CSV/TSV/JSONL with a ``report`` column). Every
problem names the file and the row; reports are free text of any length."""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..textfiles import decode_text, read_rows

__all__ = [
    "SPLITS",
    "Corpus",
    "ReportSheet",
    "match_reports",
    "read_corpus",
    "read_reports",
    "split_slides",
    "text_key",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_TEXT_EXT = (".txt", ".md", ".text")


@dataclass(frozen=True)
class ReportSheet:
    """One report per slide, in sheet order; optional columns are empty dicts when absent."""

    path: Path
    reports: dict[str, str]
    patients: dict[str, str]
    labels: dict[str, str]
    splits: dict[str, str]

    @property
    def ids(self) -> list[str]:
        return list(self.reports)


def read_reports(path: str | Path) -> ReportSheet:
    """The report sheet.

    Raises
    ------
    ConfigError
        Missing columns, a non-UTF-8 file, an empty report or slide id, a duplicate slide
        id, or an unknown split name, each naming the file and the row.
    """
    p = Path(path)
    fields, rows = read_rows(p, "report sheet")
    if not rows:
        raise ConfigError(f"report sheet {str(p)!r} holds no reports")
    missing = {"slide_id", "report"} - set(fields)
    if missing:
        raise ConfigError(
            f"report sheet {str(p)!r} needs columns slide_id and report (missing {sorted(missing)})"
        )
    reports: dict[str, str] = {}
    first: dict[str, str] = {}
    patients, labels, splits = {}, {}, {}
    for where, r in rows:
        sid, text = r.get("slide_id", "").strip(), r.get("report", "").strip()
        if not sid:
            raise ConfigError(f"report sheet {str(p)!r}, {where}: empty slide_id")
        if not text:
            raise ConfigError(f"report sheet {str(p)!r}, {where}: the report of slide {sid!r} is empty")
        if sid in reports:
            raise ConfigError(
                f"report sheet {str(p)!r}, {where}: slide {sid!r} already has a report ({first[sid]}); "
                "give one report per slide (join several into one text)"
            )
        reports[sid], first[sid] = text, where
        if r.get("patient_id", "").strip():
            patients[sid] = r["patient_id"].strip()
        if r.get("label", "").strip():
            labels[sid] = r["label"].strip()
        split = r.get("split", "").strip().lower()
        if split:
            if split not in SPLITS:
                raise ConfigError(
                    f"report sheet {str(p)!r}, {where}: split {split!r} of slide {sid!r} "
                    f"is not one of {SPLITS}"
                )
            splits[sid] = split
    if splits and len(splits) != len(reports):
        raise ConfigError(f"report sheet {str(p)!r}: the split column must be filled for every slide or none")
    return ReportSheet(p, reports, patients, labels, splits)


def match_reports(sheet: ReportSheet, store_ids: Sequence[str]) -> list[str]:
    """The sheet's slide ids, all of which must have a feature store (sorted).

    Raises
    ------
    ConfigError
        Listing the report sheet's slide ids that have no store.
    """
    have = set(store_ids)
    unmatched = [s for s in sheet.ids if s not in have]
    if unmatched:
        shown = ", ".join(map(repr, unmatched[:20])) + (" ..." if len(unmatched) > 20 else "")
        raise ConfigError(
            f"report sheet {str(sheet.path)!r}: {len(unmatched)} slide id(s) have no feature store: {shown}"
        )
    return sorted(sheet.ids)


def split_slides(
    ids: Sequence[str],
    *,
    groups: Mapping[str, str] | None = None,
    given: Mapping[str, str] | None = None,
    fractions: tuple[float, float] = (0.1, 0.2),
    seed: int = 0,
    where: str = "report sheet",
) -> dict[str, list[str]]:
    """train/val/test slide ids: the sheet's own ``split`` column when given, otherwise a
    seeded random split by group (patient when given, else slide) with ``fractions`` =
    (val, test) of the groups. Each split needs at least two slides."""
    if given:
        out = {s: sorted(i for i in ids if given[i] == s) for s in SPLITS}
    else:
        g = {i: (groups or {}).get(i, i) for i in ids}
        uniq = sorted(set(g.values()))
        order = np.random.default_rng(seed).permutation(len(uniq))
        n_val, n_test = (max(2, round(f * len(uniq))) for f in fractions)
        test = {uniq[k] for k in order[:n_test]}
        val = {uniq[k] for k in order[n_test : n_test + n_val]}
        out = {
            "train": sorted(i for i in ids if g[i] not in test | val),
            "val": sorted(i for i in ids if g[i] in val),
            "test": sorted(i for i in ids if g[i] in test),
        }
    small = {s: len(v) for s, v in out.items() if len(v) < 2}
    if small:
        raise ConfigError(
            f"{where}: every split needs at least 2 slides, but "
            + ", ".join(f"{s} has {n}" for s, n in small.items())
            + f" ({len(ids)} slides in all); add reports or change the split column"
        )
    if groups:
        seen: dict[str, str] = {}
        for s, members in out.items():
            for i in members:
                if seen.setdefault(groups.get(i, i), s) != s:
                    raise ConfigError(
                        f"{where}: patient {groups.get(i, i)!r} is in both {seen[groups[i]]} and {s}"
                    )
    return out


_NON_WORD = re.compile(r"[\W_]+")


def text_key(text: str) -> str:
    """A hash of a report's normalised text (Unicode NFKC, case-folded, every run of
    punctuation and white space one space), so that copies differing only in layout,
    case or punctuation share one key."""
    norm = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return hashlib.sha256(norm.encode()).hexdigest()


@dataclass(frozen=True)
class Corpus:
    """Unpaired report texts with ids (file names, or the ``report_id`` column)."""

    source: Path
    ids: tuple[str, ...]
    texts: tuple[str, ...]

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        for i, t in zip(self.ids, self.texts, strict=True):
            h.update(i.encode() + b"\0" + t.encode() + b"\0")
        return h.hexdigest()[:16]

    def without(self, texts: Sequence[str]) -> tuple[Corpus, list[str]]:
        """The corpus less every report whose :func:`text_key` equals one of ``texts``'
        (a cohort's own reports), and the ids left out."""
        keys = {text_key(t) for t in texts}
        drop = [i for i, t in zip(self.ids, self.texts, strict=True) if text_key(t) in keys]
        gone = set(drop)
        kept = [(i, t) for i, t in zip(self.ids, self.texts, strict=True) if i not in gone]
        return Corpus(self.source, tuple(i for i, _ in kept), tuple(t for _, t in kept)), drop


def read_corpus(path: str | Path) -> Corpus:
    """A folder of text files (one report each) or a CSV/TSV/JSONL with a ``report`` column
    (and ``report_id`` when it has one). Empty texts are skipped and counted.

    Raises
    ------
    ConfigError
        A missing path, a non-UTF-8 file, a table without a report column, or a corpus
        with no texts.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_EXT)
        pairs = [(str(f.relative_to(p)), decode_text(f, what="report").strip()) for f in files]
    elif p.is_file():
        fields, rows = read_rows(p, "report corpus")
        if rows and "report" not in fields:
            raise ConfigError(f"report corpus {str(p)!r} needs a column named report")
        pairs = [(r.get("report_id", "").strip() or where, r.get("report", "").strip()) for where, r in rows]
    else:
        raise ConfigError(f"report corpus {str(p)!r} does not exist")
    empty = sum(1 for _, t in pairs if not t)
    pairs = [(i, t) for i, t in pairs if t]
    if not pairs:
        raise ConfigError(
            f"report corpus {str(p)!r} holds no report texts"
            + (f" ({empty} empty)" if empty else f" (a folder needs {'/'.join(_TEXT_EXT)} files)")
        )
    if empty:
        log.warning("report corpus %s: %d empty texts skipped", p, empty)
    ids = [i for i, _ in pairs]
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise ConfigError(f"report corpus {str(p)!r}: duplicate report ids {dup[:10]}")
    return Corpus(p, tuple(ids), tuple(t for _, t in pairs))
