"""The data-driven encoder registry: entries from ``registry.yaml`` (shipped) plus the
user's own file; one dataclass per entry."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import EncoderError
from ..textfiles import read_yaml

__all__ = [
    "KINDS",
    "EncoderEntry",
    "PreprocessSpec",
    "availability",
    "conch_available",
    "get_entry",
    "load_registry",
]

KINDS = ("open_clip", "hf_clip", "conch", "keep", "demo")


@dataclass(frozen=True)
class PreprocessSpec:
    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    kind: str
    embed_dim: int
    preprocess: PreprocessSpec
    description: str = ""
    architecture: str | None = None
    weights: Mapping[str, str] = field(default_factory=dict)
    model_cfg: Mapping[str, Any] | None = None
    quick_gelu: bool = False
    text: Mapping[str, Any] = field(default_factory=dict)
    untrained: bool = False
    seed: int = 0

    @classmethod
    def parse(cls, name: str, raw: Mapping[str, Any]) -> EncoderEntry:
        if not isinstance(raw, Mapping):
            raise EncoderError(f"encoder registry entry {name!r} must be a mapping")
        kind = raw.get("kind")
        if kind not in KINDS:
            raise EncoderError(f"encoder {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if "embed_dim" not in raw:
            raise EncoderError(f"encoder {name!r}: missing 'embed_dim'")
        known = {f for f in cls.__dataclass_fields__} - {"name", "preprocess"}
        unknown = set(raw) - known - {"preprocess"}
        if unknown:
            raise EncoderError(f"encoder {name!r}: unknown keys {sorted(unknown)}")
        pre = dict(raw.get("preprocess") or {})
        for key in ("mean", "std"):
            if key in pre:
                pre[key] = tuple(float(v) for v in pre[key])
        weights = {k: str(v) for k, v in (raw.get("weights") or {}).items()}
        if kind in ("open_clip", "hf_clip", "conch") and not weights:
            raise EncoderError(f"encoder {name!r}: needs 'weights' (path, hf_hub or pretrained)")
        if kind == "open_clip" and not raw.get("architecture") and "pretrained" in weights:
            raise EncoderError(f"encoder {name!r}: 'pretrained' weights need an 'architecture'")
        return cls(
            name=name,
            kind=str(kind),
            embed_dim=int(raw["embed_dim"]),
            preprocess=PreprocessSpec(**pre),
            description=str(raw.get("description", "")),
            architecture=raw.get("architecture"),
            weights=weights,
            model_cfg=raw.get("model_cfg"),
            quick_gelu=bool(raw.get("quick_gelu", False)),
            text=dict(raw.get("text") or {}),
            untrained=bool(raw.get("untrained", False)),
            seed=int(raw.get("seed", 0)),
        )

    def as_attrs(self) -> dict[str, Any]:
        """What the feature store records about this encoder."""
        return {
            "encoder": self.name,
            "kind": self.kind,
            "architecture": self.architecture or "",
            "weights_source": dict(self.weights) or {"seed": self.seed},
            "embedding_dim": self.embed_dim,
            "preprocessing": {
                "size": self.preprocess.size,
                "mean": list(self.preprocess.mean),
                "std": list(self.preprocess.std),
                "interpolation": self.preprocess.interpolation,
            },
            "untrained": self.untrained,
        }


def _validate(raw: Any, source: str) -> dict[str, Any]:
    """Check a registry mapping against ``data/registry.schema.yaml``; one line on error."""
    from ..config import load_schema, schema_error_line

    if not isinstance(raw, Mapping):
        kind = type(raw).__name__ if raw is not None else "nothing"
        raise EncoderError(f"encoder registry {source}: must map encoder names to entries, got {kind}")
    import jsonschema

    err = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(load_schema("registry")).iter_errors(dict(raw))
    )
    if err is not None:
        raise EncoderError(f"encoder registry {source}: {schema_error_line(err)}")
    return dict(raw)


def _read_user_registry(p: Path) -> dict[str, Any]:
    # malformed, not UTF-8, a key written twice, or a !!python tag the safe loader refuses
    loaded = read_yaml(p, what="encoder registry file", error=EncoderError)
    add = _validate(loaded, repr(str(p)))
    # relative weight paths are relative to the registry file
    for entry in add.values():
        w = entry.get("weights")
        if w and "path" in w and not Path(w["path"]).is_absolute():
            w["path"] = str((p.parent / w["path"]).resolve())
    return add


def load_registry(extra: str | Path | Mapping[str, Any] | None = None) -> dict[str, EncoderEntry]:
    """The shipped registry, updated by ``extra`` (a YAML path or a mapping).

    Raises
    ------
    EncoderError
        One line naming the file and the problem: missing, not YAML, not a mapping, or
        an entry that breaks the registry schema.
    """
    text = resources.files("histoalign_wsi").joinpath("features", "registry.yaml").read_text()
    raw: dict[str, Any] = yaml.safe_load(text)
    if extra is not None:
        add = (
            _validate(extra, "(given mapping)")
            if isinstance(extra, Mapping)
            else _read_user_registry(Path(extra))
        )
        raw.update(add)
    return {name: EncoderEntry.parse(name, e) for name, e in raw.items()}


def get_entry(name: str, registry: Mapping[str, EncoderEntry]) -> EncoderEntry:
    try:
        return registry[name]
    except KeyError:
        raise EncoderError(
            f"unknown encoder {name!r}; known encoders: {', '.join(sorted(registry))}"
        ) from None


def conch_available() -> bool:
    """Whether the ``conch`` package (CONCH's own model code) is installed."""
    return importlib.util.find_spec("conch") is not None


def availability(entry: EncoderEntry, *, offline: bool = True) -> str:
    """``available (...)`` or why not, without loading the model."""
    from ..errors import HistoAlignError
    from .weights import WeightsNotFound, resolve_weights

    if entry.kind == "demo":
        return "available (built in, untrained)"
    if entry.kind == "conch" and not conch_available():
        return "unavailable: the 'conch' package is not installed (it also needs the gated weights)"
    try:
        w = resolve_weights(entry, offline=offline, hash_file=False)
    except WeightsNotFound as exc:
        return "not found; looked in: " + "; ".join(exc.looked)
    except HistoAlignError as exc:
        return f"unavailable: {exc}"
    return f"available ({w.source}: {w.path})"
