"""Atomic output: write under a temporary name next to the target, rename when complete."""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "pid_alive", "remove_stale", "remove_stale_in", "replace_path"]


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_if_dead(p: Path) -> None:
    """Delete the temporary ``p`` when the process that wrote it is gone."""
    try:
        pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
    except (IndexError, ValueError):
        return
    if pid != os.getpid() and not pid_alive(pid):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def remove_stale(target: Path) -> None:
    """Delete temporaries of ``target`` left by killed writers (their process is gone)."""
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        _remove_if_dead(p)


def remove_stale_in(folder: Path) -> None:
    """Delete every temporary in ``folder`` left by a killed writer (one listing)."""
    if not folder.is_dir():
        return
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.name.startswith(".") and ".tmp-" in e.name]
    for name in names:
        _remove_if_dead(folder / name)


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst``; an existing directory at ``dst`` is swapped out first."""
    if dst.is_dir() and not dst.is_symlink():
        trash = _tmp_name(dst)
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], *, keep_identical: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to ``target``, on error removed.
    With ``keep_identical``, a ``target`` whose bytes equal the new file's is left as it
    is (its modification time too, so a workflow sees nothing new)."""
    dst = Path(target)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dst)
    try:
        yield tmp
        if keep_identical and dst.is_file() and filecmp.cmp(tmp, dst, shallow=False):
            tmp.unlink()
            return
        replace_path(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Like :func:`atomic_file` for a directory (a zarr store, a folder of PNGs); on success
    it also removes large temporaries of the same target left by killed writers."""
    dst = Path(target)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dst)
    tmp.mkdir()
    try:
        yield tmp
        replace_path(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale(dst)
