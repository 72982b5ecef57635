"""Patient (or slide) keys of image patches, so that splits of a patch folder keep every
patch of one patient on one side: from a sheet (``path,patient_id``) or from a file-name
pattern (a regular expression with a ``patient`` group; ``breakhis`` is BreakHis's
``SOB_B_A-14-22549AB-40-001.png``, patient ``14-22549AB``). ``auto`` uses BreakHis's
pattern when every file name fits it, and otherwise treats each patch as its own group."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..textfiles import read_rows

__all__ = ["PATTERNS", "PatchGroups", "patch_groups", "patch_sites"]

#: named file-name patterns; each has a ``patient`` group
PATTERNS = {"breakhis": r"^SOB_[BM]_[A-Z]+-(?P<patient>[0-9]+-[0-9A-Za-z]+)-[0-9]+-[0-9]+"}


@dataclass(frozen=True)
class PatchGroups:
    """One group key per patch (``None``: every patch is its own group) and how they
    were found, as written to the outputs."""

    keys: tuple[str, ...] | None
    by: str

    @property
    def n_groups(self) -> int | None:
        return len(set(self.keys)) if self.keys is not None else None

    def summary(self) -> dict[str, object]:
        return {"by": self.by, "n_groups": self.n_groups}


def _from_sheet(paths: Sequence[Path], root: Path, sheet: Path) -> tuple[str, ...]:
    fields, table = read_rows(sheet, "patch group sheet")
    if not {"path", "patient_id"} <= set(fields):
        raise ConfigError(f"patch group sheet {str(sheet)!r} needs columns path,patient_id")
    rows = {r["path"]: r["patient_id"] for _, r in table if r.get("path")}
    keys, missing = [], []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        key = rows.get(rel) or rows.get(p.name)
        if not key:
            missing.append(rel)
        keys.append(key or "")
    if missing:
        raise ConfigError(
            f"patch group sheet {str(sheet)!r} gives no patient_id for {len(missing)} patch(es): "
            + ", ".join(missing[:5])
            + (" ..." if len(missing) > 5 else "")
        )
    return tuple(keys)


def _from_pattern(paths: Sequence[Path], pattern: str, name: str) -> tuple[str, ...] | None:
    try:
        rx = re.compile(PATTERNS.get(pattern, pattern))
    except re.error as exc:
        raise ConfigError(f"group pattern {pattern!r} is not a regular expression ({exc})") from exc
    keys = []
    for p in paths:
        m = rx.search(p.name)
        if m is None:
            if name == "auto":
                return None
            raise ConfigError(f"patch {p.name!r} does not match the group pattern {pattern!r}")
        keys.append(m.group("patient") if "patient" in rx.groupindex else m.group(m.lastindex or 0))
    return tuple(keys)


def patch_groups(
    paths: Sequence[Path], root: Path, *, sheet: Path | None = None, pattern: str = "auto"
) -> PatchGroups:
    """The group of every patch in ``paths`` (under ``root``).

    ``sheet`` wins over ``pattern``; ``pattern`` is ``auto``, ``none``, a name in
    :data:`PATTERNS` or a regular expression (its ``patient`` group, else its last group,
    else the whole match).

    Raises
    ------
    ConfigError
        A sheet without the columns or missing patches, a bad expression, or a file name
        that an explicit pattern does not match, each named.
    """
    if sheet is not None:
        return PatchGroups(_from_sheet(paths, root, sheet), f"patient (sheet {sheet.name})")
    if pattern == "none":
        return PatchGroups(None, "patch (no grouping)")
    if pattern == "auto":
        keys = _from_pattern(paths, "breakhis", "auto") if paths else None
        if keys is None:
            return PatchGroups(None, "patch (no patient key found: each patch is its own group)")
        return PatchGroups(keys, "patient (BreakHis file names)")
    keys = _from_pattern(paths, pattern, pattern)
    label = "BreakHis file names" if pattern == "breakhis" else f"file-name pattern {pattern!r}"
    return PatchGroups(keys, f"patient ({label})")


def patch_sites(
    paths: Sequence[Path], root: Path, *, sheet: Path | None = None, pattern: str | None = None
) -> tuple[str, ...]:
    """The site of every patch: the ``site`` column of the group sheet, else ``pattern``
    (``tcga`` or a regular expression with a ``site`` group) on the file name or the path.

    Raises
    ------
    ConfigError
        No source of sites, or a patch without one (named).
    """
    from ..sites import site_regex

    if sheet is not None:
        fields, table = read_rows(sheet, "patch group sheet")
        if "site" in fields:
            rows = {r["path"]: r["site"] for _, r in table if r.get("path") and r.get("site")}
            keys = [rows.get(p.relative_to(root).as_posix()) or rows.get(p.name) for p in paths]
            missing = [p.name for p, k in zip(paths, keys, strict=True) if not k]
            if missing:
                raise ConfigError(
                    f"patch group sheet {str(sheet)!r} gives no site for {', '.join(missing[:5])}"
                )
            return tuple(str(k) for k in keys)
    if not pattern:
        raise ConfigError("cv: site on patches needs a 'site' column in the --groups sheet or --site-pattern")
    rx = site_regex(pattern)
    out = []
    for p in paths:
        m = rx.search(p.relative_to(root).as_posix())
        if m is None:
            raise ConfigError(f"patch {p.name!r} does not match the site pattern {pattern!r}")
        out.append(m.group("site"))
    return tuple(out)
