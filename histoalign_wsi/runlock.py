"""The results-folder lock: one workflow run per results folder, whichever checkout or
working directory it starts from (Snakemake's own lock covers only its working
directory). A second run is refused naming the other run's host and pid. A lock left by
a killed run on this host (its process is gone) is stale: it is cleared with a warning.
One from another host cannot be checked and is cleared with ``histoalign-wsi unlock
RESULTS`` once that run is known to have ended."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._atomic import pid_alive as _alive
from .errors import ConfigError

__all__ = ["LOCK_NAME", "acquire", "forced_stages", "holder", "release", "unlock"]

LOCK_NAME = ".histoalign-run.lock"

log = logging.getLogger(__name__)


def holder(results: str | Path) -> dict[str, Any] | None:
    """The lock's contents (host, pid, started, cwd), or None when unlocked."""
    p = Path(results) / LOCK_NAME
    try:
        info: dict[str, Any] = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": -1, "started": "?", "cwd": "?"}
    return info


def _describe(info: dict[str, Any]) -> str:
    return (
        f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')} in {info.get('cwd')}"
    )


def acquire(results: str | Path, *, recompute: Iterable[str] = ()) -> Path:
    """Take the lock for this process; ``recompute`` names the stages this run forces
    (the batch jobs read them from the lock, see :func:`forced_stages`).

    Raises
    ------
    ConfigError
        Another live run holds it, or a killed run left it (stale): the message names the
        run and how to clear the lock.
    """
    res = Path(results)
    res.mkdir(parents=True, exist_ok=True)
    p = res / LOCK_NAME
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cwd": os.getcwd(),
        "recompute": sorted(recompute),
    }
    try:
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        info = holder(res) or {}
        if info.get("host") == me["host"] and info.get("pid") == me["pid"]:
            return p  # already ours
        same_host = info.get("host") == me["host"]
        if same_host and not _alive(int(info.get("pid", -1))):
            log.warning("cleared a stale lock on %s left by a killed run (%s)", res, _describe(info))
            p.unlink(missing_ok=True)
            return acquire(res, recompute=recompute)
        where = "another run is using it" if same_host else "a run on another host holds it"
        raise ConfigError(
            f"results folder {str(res)!r} is locked: {where} ({_describe(info)}); "
            f"when that run has ended, clear it with: histoalign-wsi unlock {str(res)!r}"
        ) from None
    with os.fdopen(fd, "w") as fh:
        json.dump(me, fh)
    return p


def forced_stages(results: str | Path) -> frozenset[str]:
    """The stages the run holding the lock was asked to recompute (``--forceall``,
    ``--forcerun RULE``): their jobs redo every slide, current or not."""
    info = holder(results) or {}
    stages = info.get("recompute")
    return frozenset(str(s) for s in stages) if isinstance(stages, list) else frozenset()


def release(results: str | Path) -> None:
    """Drop the lock if this process holds it."""
    info = holder(results)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        (Path(results) / LOCK_NAME).unlink(missing_ok=True)


def unlock(results: str | Path, *, force: bool = False) -> dict[str, Any] | None:
    """Remove the lock (the user's explicit decision); returns what it held.

    Raises
    ------
    ConfigError
        The holder is a live process on this host (``force`` removes it anyway, for a
        pid that has since been reused by another program).
    """
    info = holder(results)
    if info is None:
        return None
    if not force and info.get("host") == socket.gethostname() and _alive(int(info.get("pid", -1))):
        raise ConfigError(
            f"results folder {str(results)!r} is in use by a running process ({_describe(info)})"
        )
    (Path(results) / LOCK_NAME).unlink(missing_ok=True)
    return info
