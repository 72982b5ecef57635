"""JSON without NaN: JSON has no NaN or infinity, and Python's ``json`` would write them
as bare ``NaN`` (invalid for every other reader)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["finite_json"]


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float made ``None`` (an undefined metric is
    ``null``); numpy scalars become Python numbers."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # a numpy scalar
        return finite_json(obj.item())
    if isinstance(obj, Mapping):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
