"""Safe identifiers for class names, which are free text: the names themselves stay as
written in every output; file and column names are derived here, short and unique."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

__all__ = ["MAX_NAME", "safe_base", "safe_names"]

_UNSAFE = re.compile(r"[^\w]+", re.UNICODE)
#: longest derived name; a longer one is cut and given a short hash of the full name, so
#: a heatmap file name stays far below the 255-byte limit of file systems
MAX_NAME = 48


def safe_base(name: str) -> str:
    """Unicode letters and digits kept, every other run of characters made ``_``; cut to
    :data:`MAX_NAME` with a hash of the whole name when longer."""
    base = _UNSAFE.sub("_", unicodedata.normalize("NFC", name)).strip("_") or "class"
    if len(base) > MAX_NAME:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
        base = f"{base[: MAX_NAME - 9].rstrip('_')}_{digest}"
    return base


def safe_names(classes: Sequence[str]) -> list[str]:
    """A safe, unique identifier per class name (see :func:`safe_base`); ``_2``, ``_3``...
    where two collide, compared without case (case-insensitive file systems). Used for
    column names and file names."""
    out: list[str] = []
    seen: set[str] = set()
    for c in classes:
        base = safe_base(c)
        name, n = base, 1
        while name.casefold() in seen:
            n += 1
            name = f"{base}_{n}"
        seen.add(name.casefold())
        out.append(name)
    return out
