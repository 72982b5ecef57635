"""Which encoder an output was made with, without loading it: the registry entry's hash
(architecture, preprocessing, model config, seed; not its description) and the weights
file's sha256 (cached by the file's stat, see :class:`histoalign_wsi.provenance.HashCache`).
Editing the registry, or rewriting a weights file in place, changes the identity; the
provenance records of features and text embeddings hold it. Imports no model framework."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ..config import Config
from ..errors import HistoAlignError
from ..provenance import HashCache, digest
from .registry import EncoderEntry, get_entry, load_registry

__all__ = ["encoder_identities", "encoder_identity"]

#: the weights identity of an encoder whose weights are not found (yet)
MISSING = "not found"


def encoder_identity(entry: EncoderEntry, *, offline: bool, cache: HashCache) -> dict[str, str]:
    """``{"entry": hash of the registry entry, "weights": sha256 of the weights}``."""
    from .weights import CONFIG_FILES, resolve_weights

    fields = dataclasses.asdict(entry)
    fields.pop("description", None)
    fields.pop("name", None)
    ident = {"entry": digest(fields)}
    if entry.kind == "demo":  # built from its seed (part of the entry)
        return ident | {"weights": f"seed:{entry.seed}"}
    try:
        w = resolve_weights(entry, offline=offline, hash_file=False)
        parts = [cache.sha256(w.weight_file)]
        folder = w.path if w.path.is_dir() else None
        parts += [cache.sha256(folder / f) for f in CONFIG_FILES if folder and (folder / f).is_file()]
    except HistoAlignError:
        return ident | {"weights": MISSING}
    return ident | {"weights": parts[0] if len(parts) == 1 else digest(parts)}


def encoder_identities(
    cfg: Config, cache: HashCache, *, names: tuple[str, ...] | None = None, offline: bool = True
) -> Mapping[str, Mapping[str, str]]:
    """The identity of each configured encoder (or of ``names``). ``offline`` (the
    default) never downloads: the workflow asks before any job runs."""
    registry = load_registry(cfg.encoder_registry)
    return {
        n: encoder_identity(get_entry(n, registry), offline=offline or cfg.offline, cache=cache)
        for n in (names if names is not None else cfg.encoders)
    }
