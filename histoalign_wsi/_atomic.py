"""Atomic output: write under a temporary name next to the target, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "replace_path"]


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


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
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to ``target``, on error removed."""
    dst = Path(target)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dst)
    try:
        yield tmp
        replace_path(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Like :func:`atomic_file` for a directory (a zarr store, a folder of PNGs)."""
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
