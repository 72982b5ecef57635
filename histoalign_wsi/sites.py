"""The site key: which hospital (tissue source site) each slide came from, from a ``site``
column of the slide sheet or the label sheet, or from ``site_pattern`` on the slide id
(``tcga``: the two characters after ``TCGA-``; or a regular expression with a
``(?P<site>...)`` group). Resolved and checked once, before any job; every stage that
groups by site asks :func:`resolve_sites`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .textfiles import read_rows

__all__ = [
    "SITE_PATTERNS",
    "SiteKey",
    "check_site_settings",
    "resolve_sites",
    "sheet_sites",
    "site_regex",
    "sites_for",
]

#: named site patterns; each has a ``site`` group. A TCGA barcode is
#: ``TCGA-{TSS}-{participant}-...``: the tissue source site is the two characters after
#: ``TCGA-`` (``TCGA-A7-A0CE-01Z-00-DX1`` is site ``A7``).
SITE_PATTERNS = {"tcga": r"(?:^|[^A-Za-z0-9])TCGA-(?P<site>[A-Za-z0-9]{2})-"}


@dataclass(frozen=True)
class SiteKey:
    """One site per slide and where it came from, as outputs record it."""

    sites: Mapping[str, str]
    by: str

    @property
    def names(self) -> list[str]:
        return sorted(set(self.sites.values()))

    def summary(self) -> dict[str, object]:
        return {"by": self.by, "n_sites": len(self.names)}


def sheet_sites(path: str | Path, what: str) -> dict[str, str] | None:
    """``slide_id -> site`` from a sheet's ``site`` column (None without one).

    Raises
    ------
    ConfigError
        A slide given two different sites, naming both rows.
    """
    p = Path(path)
    fields, rows = read_rows(p, what)
    if "site" not in fields:
        return None
    out: dict[str, str] = {}
    where: dict[str, str] = {}
    for w, r in rows:
        sid, site = (r.get("slide_id") or "").strip(), (r.get("site") or "").strip()
        if not sid or not site:
            continue
        if sid in out and out[sid] != site:
            raise ConfigError(
                f"{what} {str(p)!r}: slide {sid!r} has two sites, "
                f"{out[sid]!r} ({where[sid]}) and {site!r} ({w})"
            )
        out[sid], where[sid] = site, where.get(sid, w)
    return out


def site_regex(pattern: str) -> re.Pattern[str]:
    """``tcga`` or a regular expression, compiled; refused without a ``site`` group."""
    try:
        rx = re.compile(SITE_PATTERNS.get(pattern, pattern))
    except re.error as exc:
        raise ConfigError(f"site_pattern {pattern!r} is not a regular expression ({exc})") from exc
    if "site" not in rx.groupindex:
        raise ConfigError(f"site_pattern {pattern!r} has no (?P<site>...) group")
    return rx


def _merge(into: dict[str, str], extra: Mapping[str, str], src: str, origin: dict[str, str]) -> None:
    for sid, site in extra.items():
        if sid in into and into[sid] != site:
            raise ConfigError(
                f"slide {sid!r} has two sites: {into[sid]!r} from {origin[sid]} and {site!r} from {src}"
            )
        into[sid], origin[sid] = site, origin.get(sid, src)


def resolve_sites(
    slide_ids: Sequence[str],
    *,
    slide_sheet: str | Path | None = None,
    label_sheet: str | Path | None = None,
    pattern: str | None = None,
    names: Mapping[str, str] | None = None,
) -> SiteKey | None:
    """The site of every slide in ``slide_ids``, or None when no source gives one.

    Sources: the ``site`` column of ``slide_sheet`` (a CSV/TSV slide sheet), of
    ``label_sheet``, and ``pattern`` (``tcga`` or a regular expression with a ``site``
    group), searched in the slide id and then in ``names[slide_id]`` (the file name).
    Every source given must agree.

    Raises
    ------
    ConfigError
        A pattern that matches no slide, a slide given two sites, or slides left without
        a site (each named), before any job runs.
    """
    found: dict[str, str] = {}
    origin: dict[str, str] = {}
    by: list[str] = []
    for sheet, what in ((slide_sheet, "slide sheet"), (label_sheet, "label sheet")):
        if sheet is None or Path(sheet).suffix.lower() not in (".csv", ".tsv", ".tab"):
            continue
        got = sheet_sites(sheet, what)
        if got is not None:
            _merge(found, {s: v for s, v in got.items() if s in set(slide_ids)}, f"the {what}", origin)
            by.append(f"{what} column 'site'")
    if pattern:
        rx = site_regex(pattern)
        matched: dict[str, str] = {}
        for sid in slide_ids:
            m = rx.search(sid) or rx.search((names or {}).get(sid, ""))
            if m is not None and m.group("site"):
                matched[sid] = m.group("site")
        if not matched:
            raise ConfigError(
                f"site_pattern {pattern!r} matches none of the {len(slide_ids)} slides "
                f"(for example {slide_ids[0]!r})"
                if slide_ids
                else f"site_pattern {pattern!r}: the cohort has no slides"
            )
        _merge(found, matched, f"site_pattern {pattern!r}", origin)
        by.append(f"site_pattern {pattern!r}")
    if not by:
        return None
    missing = [s for s in slide_ids if s not in found]
    if missing:
        raise ConfigError(
            f"{len(missing)} of {len(slide_ids)} slides have no site ({' and '.join(by)}): "
            + ", ".join(map(repr, missing[:10]))
            + (" ..." if len(missing) > 10 else "")
            + "; give each a site (a 'site' column) or a site_pattern that matches every slide"
        )
    return SiteKey({s: found[s] for s in slide_ids}, " and ".join(by))


def sites_for(
    slide_ids: Sequence[str], *, slides: str | None, labels: str | Path | None, pattern: str | None
) -> SiteKey | None:
    """:func:`resolve_sites` from a configuration's ``slides`` (used when it is a sheet),
    label sheet and ``site_pattern``."""
    return resolve_sites(slide_ids, slide_sheet=slides, label_sheet=labels, pattern=pattern)


def check_site_settings(
    slide_ids: Sequence[str],
    *,
    slides: str | None,
    labels: str | Path | None,
    pattern: str | None,
    grouped: Sequence[str] = (),
) -> SiteKey | None:
    """The site key resolves to one site per slide, and every setting in ``grouped`` (the
    keys set to ``site``) has one, with two sites or more; checked before any job.

    Raises
    ------
    ConfigError
        Naming the setting that needs a site key, or the key's problem.
    """
    key = sites_for(slide_ids, slides=slides, labels=labels, pattern=pattern)
    for name in grouped:
        if key is None:
            raise ConfigError(
                f"{name}: site needs a site key: a 'site' column in the slide or label sheet, or site_pattern"
            )
        if len(key.names) < 2:
            raise ConfigError(f"{name}: site needs two sites or more; {key.by} gives one ({key.names[0]!r})")
    return key
