"""Configuration overrides: ``key=value`` strings (``--set``, ``--config``) parsed into
nested mappings, and merged into a loaded configuration."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["merge", "parse_overrides"]


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings (dotted keys for nesting, YAML values)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` merged into ``base`` (nested mappings key by key), in place."""
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base
