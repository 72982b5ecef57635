"""The per-slide prediction (``predictions/{slide}.json``): one dataclass, written and
read here only."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._atomic import atomic_file
from ..errors import StoreError

__all__ = ["NO_TILES", "NO_TISSUE", "Prediction", "load_predictions"]

NO_TISSUE = "no tissue"
NO_TILES = "no tiles (slide smaller than a tile)"


@dataclass(frozen=True)
class Prediction:
    """A slide's predicted class, probabilities and how they were made.

    ``status`` is ``ok``, ``no_tissue`` or ``no_tiles``; without tiles ``probabilities``
    is ``None`` and ``predicted_class`` says why.
    """

    slide_id: str
    slide_path: str
    classes: tuple[str, ...]
    colors: Mapping[str, tuple[int, int, int]]
    status: str
    predicted_class: str
    probabilities: Mapping[str, float] | None
    prompt_bag: Mapping[str, Any]
    encoders: Sequence[Mapping[str, Any]]
    untrained: bool
    alignment: Mapping[str, Any]
    pooling: Mapping[str, Any]
    calibrated: bool
    per_scale: Mapping[str, Mapping[str, Any]]
    top_tiles: Sequence[Mapping[str, Any]] = ()
    method: str = "zero-shot"
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: what it was made from, per output of the finish stage: ``score`` (this file and the
    #: tile scores), ``heatmap``, ``geojson`` (see :mod:`histoalign_wsi.provenance`)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def n_tiles(self) -> int:
        return sum(int(v.get("n_tiles", 0)) for v in self.per_scale.values())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        d["colors"] = {c: list(v) for c, v in self.colors.items()}
        d["top_tiles"] = list(self.top_tiles)
        d["encoders"] = list(self.encoders)
        return d

    def write(self, path: str | Path) -> Path:
        with atomic_file(path) as tmp:
            tmp.write_text(
                json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8"
            )
        return Path(path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "prediction") -> Prediction:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - {
            "extra",
            "provenance",
        }
        missing = sorted(required - set(d))
        if missing:
            raise StoreError(f"{source}: not a prediction file (missing {', '.join(missing)})")
        kw = {k: v for k, v in d.items() if k in names}
        kw["classes"] = tuple(d["classes"])
        kw["colors"] = {c: (int(v[0]), int(v[1]), int(v[2])) for c, v in d["colors"].items()}
        kw["top_tiles"] = tuple(d.get("top_tiles", ()))
        return cls(**kw)

    @classmethod
    def read(cls, path: str | Path) -> Prediction:
        p = Path(path)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"), parse_constant=_no_constant)
        except FileNotFoundError as exc:
            raise StoreError(f"prediction {str(p)!r} does not exist") from exc
        except json.JSONDecodeError as exc:
            raise StoreError(f"prediction {str(p)!r} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw, source=repr(str(p)))


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def load_predictions(paths: Sequence[str | Path]) -> list[Prediction]:
    return [Prediction.read(p) for p in paths]
