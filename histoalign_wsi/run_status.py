"""The start and the end of a workflow run: the results-folder lock, and after the run
``failed_slides.tsv`` (from the batch manifests) and, after a failed run, the partial
cohort table. Called by the Snakefile's ``onstart``/``onsuccess``/``onerror``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .batches import cut_batches, read_manifest

if TYPE_CHECKING:
    from .workflow import Workflow

__all__ = ["finish_run", "start_run", "write_failure_report", "write_partial_summary"]

log = logging.getLogger(__name__)


def _error_line(log: Path) -> str | None:
    """The error a stage reported: its ``histoalign-wsi ...: error:`` line, else the last
    line that mentions an error."""
    lines = log.read_text(errors="replace").splitlines()
    ours = [ln for ln in lines if ": error:" in ln]
    if ours:
        return ours[-1].strip()
    other = [ln for ln in lines if "error" in ln.lower()]
    return other[-1].strip() if other else None


def _batch_state(res: Path, batch: str, slides: list[str], *, recorded_only: bool) -> dict[str, str]:
    """slide -> error line for every slide of the batch not finished: from the latest
    stage manifest the batch has; a slide of a batch whose job failed as a whole gets
    that job's error line. ``recorded_only``: only the failures a manifest records (a
    slide that a partial target did not take to the end is not a failure)."""
    for stage in ("finish", "encode", "prepare"):
        m = res / "batches" / stage / f"{batch}.tsv"
        if m.is_file():
            rows = {r.slide_id: r for r in read_manifest(m)[0]}
            out = {s: rows[s].error or f"{stage}: failed" for s in slides if s in rows and not rows[s].ok}
            if stage != "finish" and not recorded_only:  # the batch stopped after this stage
                nxt = {"prepare": "encode", "encode": "finish"}[stage]
                line = _error_line_of(res / "logs" / nxt / f"{batch}.log")
                out |= {s: f"{nxt}: {line or 'not completed'}" for s in slides if s not in out}
            return out
    if recorded_only:
        return {}
    line = _error_line_of(res / "logs" / "prepare" / f"{batch}.log")
    return dict.fromkeys(slides, f"prepare: {line or 'not completed'}")


def _error_line_of(log: Path) -> str | None:
    return _error_line(log) if log.is_file() else None


def write_failure_report(
    results: str | Path, slide_ids: list[str], *, recorded_only: bool = False, per_job: int = 20
) -> list[str]:
    """``failed_slides.tsv``: every slide that failed, with the error line of the stage
    that failed (from the batch manifests), and, after a failed run, every slide left
    unfinished; removed when no slide failed. ``recorded_only`` (after a run that ended
    well, perhaps of a partial target) lists only the failures the manifests record.
    Returns the failed ids."""
    from ._atomic import atomic_file

    res = Path(results)
    target = res / "failed_slides.tsv"
    errors: dict[str, str] = {}
    for batch, slides in cut_batches(sorted(slide_ids), per_job).items():
        errors |= _batch_state(res, batch, slides, recorded_only=recorded_only)
    failed = sorted(errors)
    if not failed:
        target.unlink(missing_ok=True)
        return []
    rows = [f"{s}\t{' '.join(errors[s].split())}" for s in failed]
    with atomic_file(target) as tmp:
        tmp.write_text("slide_id\terror\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return failed


def start_run(results: str | Path, *, recompute: Iterable[str] = ()) -> None:
    """Take the results-folder lock (see :mod:`histoalign_wsi.runlock`), recording the
    stages this run forces (``recompute``)."""
    from .runlock import acquire

    acquire(results, recompute=recompute)


def finish_run(
    results: str | Path,
    slide_ids: list[str],
    *,
    ok: bool,
    per_job: int = 20,
    workflow: Workflow | None = None,
) -> list[str]:
    """After a run: bring ``failed_slides.tsv`` up to date (rewritten or removed); after a
    failed one also the partial ``predictions.csv`` of the slides whose predictions are
    current (with ``workflow``: made from this run's inputs, the whole chain checked);
    name the files of slides no longer in the cohort (removed with ``prune: true``); then
    release the lock. Returns the slides that failed."""
    from .runlock import LOCK_NAME, release

    lock = Path(results) / LOCK_NAME
    started = lock.stat().st_mtime if lock.is_file() else None
    try:
        failed = write_failure_report(results, slide_ids, recorded_only=ok, per_job=per_job)
        if workflow is not None:
            _orphans(results, workflow)
        if not ok:
            interrupted = started is not None and not _errors_since(Path(results) / "logs", started)
            write_partial_summary(
                results, slide_ids, n_failed=len(failed), workflow=workflow, interrupted=interrupted
            )
    finally:
        release(results)
    return failed


def _errors_since(logs: Path, since: float) -> bool:
    """Whether a job log written during this run reports an error (none: the run was
    interrupted, by Ctrl-C or a signal, not failed)."""
    if not logs.is_dir():
        return False
    return any(
        f.stat().st_mtime >= since - 1 and _error_line(f) is not None
        for f in logs.rglob("*.log")
        if f.is_file()
    )


def _orphans(results: str | Path, wf: Workflow) -> None:
    from .current import orphans, prune

    left = orphans(results, set(wf.slides))
    if not left:
        return
    names = ", ".join(str(p) for p in left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
    if wf.config.prune:
        prune(left)
        log.warning(
            "removed %d file(s) of slides no longer in the cohort (prune: true): %s", len(left), names
        )
    else:
        log.warning(
            "%d file(s) of slides no longer in the cohort remain (%s); the cohort table leaves them out; "
            "remove them with --config prune=true",
            len(left),
            names,
        )


def write_partial_summary(
    results: str | Path,
    slide_ids: list[str],
    *,
    n_failed: int = 0,
    workflow: Workflow | None = None,
    interrupted: bool = False,
) -> Path | None:
    """After a failed (or ``interrupted``) run: ``predictions.csv`` of the slides whose
    predictions are current (every prediction file there is, without ``workflow``)."""
    ended = (
        "was STOPPED before it finished (interrupted; no step reported an error)" if interrupted else "FAILED"
    )
    from .outputs.predictions import summarize
    from .zeroshot.prediction import load_predictions

    res = Path(results)
    stale: dict[str, str] = {}
    if workflow is not None:
        from .current import current_predictions

        done, stale = current_predictions(
            res, workflow.cohort, workflow.expected, calibration=workflow.config.calibration
        )
    else:
        done = [p for s in slide_ids if (p := res / "predictions" / f"{s}.json").is_file()]
    if stale:
        log.error(
            "%d prediction file(s) were made from other inputs than this run's and are left out: %s",
            len(stale),
            "; ".join(f"{s} ({why})" for s, why in list(stale.items())[:5]),
        )
    if not done:
        (res / "predictions.csv").unlink(missing_ok=True)
        log.error(
            "the run %s: none of the %d slides is scored with the current inputs; %d failed "
            "(failed_slides.tsv names them)",
            ended,
            len(slide_ids),
            n_failed,
        )
        return None
    summarize(load_predictions(done), res / "predictions.csv")
    if len(done) == len(slide_ids) and interrupted:
        log.error(
            "the run %s; all %d slides are scored with the current inputs and %s lists them; "
            "run again to finish the rest",
            ended,
            len(done),
            res / "predictions.csv",
        )
    elif len(done) == len(slide_ids):
        log.error(
            "the run FAILED in a step after scoring (see the error above); all %d slides are scored "
            "with the current inputs and %s lists them, but the failed step's outputs are missing",
            len(done),
            res / "predictions.csv",
        )
    else:
        log.error(
            "the run %s: %d of %d slides are scored with the current inputs (%s lists those); "
            "%d failed (failed_slides.tsv names them)",
            ended,
            len(done),
            len(slide_ids),
            res / "predictions.csv",
            n_failed,
        )
    return res / "predictions.csv"
