"""Features: the encoder registry, weights, adapters, the encode pipeline and the
feature store.

Importing this package loads no model framework: it exposes the registry (a YAML file
and its dataclasses) and :func:`availability`. The adapters (``features.adapters``,
torch) and the encode pipeline (``features.encode``) are imported where they are used.
"""

from __future__ import annotations

from .registry import EncoderEntry, PreprocessSpec, availability, get_entry, load_registry

__all__ = ["EncoderEntry", "PreprocessSpec", "availability", "get_entry", "load_registry"]
