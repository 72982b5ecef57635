"""Encoders: the data-driven registry, weight resolution and safe loading, adapters."""

from __future__ import annotations

from .adapters import LoadedEncoder, conch_available, load_encoder
from .registry import EncoderEntry, PreprocessSpec, get_entry, load_registry
from .weights import resolve_weights

__all__ = [
    "EncoderEntry",
    "LoadedEncoder",
    "PreprocessSpec",
    "availability",
    "conch_available",
    "get_entry",
    "load_encoder",
    "load_registry",
    "resolve_weights",
]


def availability(entry: EncoderEntry, *, offline: bool = True) -> str:
    """``available (...)`` or why not, without loading the model."""
    from ..errors import HistoAlignError

    if entry.kind == "demo":
        return "available (built in, untrained)"
    if entry.kind == "conch" and not conch_available():
        return "unavailable: the 'conch' package is not installed"
    try:
        w = resolve_weights(entry, offline=offline)
    except HistoAlignError as exc:
        return f"unavailable: {str(exc).split(';')[0]}"
    return f"available ({w.source}: {w.path})"
