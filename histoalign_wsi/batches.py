"""Slides in batches: the workflow runs each per-slide stage on a batch of slides in one
process (one model load, one start-up, and a DAG that grows by batches, not slides).
This module owns the batch manifest, the one file a batch job declares: a TSV with one
row per slide (``slide_id``, ``status``, ``output``, ``error``), written when the batch is
complete. A slide that fails is a row with its error line; the others go on, and their
per-slide files stay. The manifest's header carries the retry token the job ran with
(see :func:`retry_token`). No model framework is imported here."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._atomic import atomic_file
from .errors import ConfigError

__all__ = [
    "FAILED",
    "OK",
    "BatchSlide",
    "ManifestRow",
    "cut_batches",
    "expand_inputs",
    "parse_spec",
    "read_manifest",
    "retry_token",
    "write_manifest",
]

OK, FAILED = "ok", "failed"
_TOKEN = "# retry-token: "
_COLUMNS = ("slide_id", "status", "output", "error")


@dataclass(frozen=True)
class BatchSlide:
    """One slide of a batch, as the workflow hands it over."""

    slide_id: str
    path: str
    mpp: float | None = None


@dataclass(frozen=True)
class ManifestRow:
    slide_id: str
    status: str
    output: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


def cut_batches(slides: Sequence[str], per_job: int) -> dict[str, list[str]]:
    """Batch id (``b00000``, ``b00001``, ...) -> its slide ids: ``slides`` (sorted by the
    caller) in runs of ``per_job``."""
    return {f"b{i // per_job:05d}": list(slides[i : i + per_job]) for i in range(0, len(slides), per_job)}


def parse_spec(text: str) -> list[BatchSlide]:
    """The batch's slides from the workflow's JSON (``[[id, path, mpp], ...]``)."""
    try:
        raw = json.loads(text)
        return [BatchSlide(str(s), str(p), None if m is None else float(m)) for s, p, m in raw]
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"batch spec is not a list of [slide_id, path, mpp]: {text[:200]!r}") from exc


def write_manifest(path: str | Path, rows: Sequence[ManifestRow], *, token: str = "") -> Path:
    """Write the manifest atomically (it appears only when the whole batch is done)."""
    buf = io.StringIO()
    buf.write(f"{_TOKEN}{token}\n")
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(_COLUMNS)
    for r in rows:
        w.writerow([r.slide_id, r.status, r.output, " ".join(r.error.split())])
    with atomic_file(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return Path(path)


def read_manifest(path: str | Path) -> tuple[list[ManifestRow], str]:
    """(rows, the token the batch job ran with)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"batch manifest {str(p)!r} does not exist") from exc
    first, _, rest = text.partition("\n")
    if not first.startswith(_TOKEN):
        raise ConfigError(f"{str(p)!r} is not a batch manifest (no retry-token line)")
    rows = [
        ManifestRow(r["slide_id"], r["status"], r["output"], r.get("error") or "")
        for r in csv.DictReader(io.StringIO(rest), delimiter="\t")
    ]
    return rows, first[len(_TOKEN) :]


def retry_token(path: str | Path) -> str:
    """The ``retry`` param of a batch rule. A manifest with a failed slide gives a token
    the last run cannot have had (its own time stamp), so Snakemake reruns the batch and
    the failed slides are tried again (the done ones are skipped); a manifest without
    failures gives back the token it was made with, so nothing reruns. No manifest yet:
    the empty token."""
    p = Path(path)
    if not p.is_file():
        return ""
    try:
        rows, token = read_manifest(p)
    except ConfigError:
        return ""
    if any(r.status == FAILED for r in rows):  # this stage's own failures (not an earlier one's)
        return f"retry-{p.stat().st_mtime_ns}"
    return token


def failed_rows(paths: Iterable[Path]) -> list[ManifestRow]:
    """The rows of the batch manifests among ``paths`` whose slide failed (with its error
    line): what the cohort table and the report name as failed."""
    out: list[ManifestRow] = []
    for p in paths:
        if p.suffix == ".tsv" and p.is_file() and p.read_text(encoding="utf-8")[: len(_TOKEN)] == _TOKEN:
            out += [r for r in read_manifest(p)[0] if not r.ok]
    return out


def expand_inputs(paths: Iterable[Path]) -> list[Path]:
    """Paths as given, with each batch manifest (``.tsv`` with a retry-token line)
    replaced by the outputs of its slides that succeeded: so every command that takes
    feature stores or predictions also takes the manifests the workflow hands it."""
    out: list[Path] = []
    for p in paths:
        if p.suffix == ".tsv" and p.is_file() and p.read_text(encoding="utf-8")[: len(_TOKEN)] == _TOKEN:
            rows, _ = read_manifest(p)
            out += [Path(r.output) for r in rows if r.ok and r.output]
        else:
            out.append(p)
    return out
