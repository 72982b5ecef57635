"""The tile-score table (``tile_scores/{slide}.parquet``): its schema, its column names,
writing it, and reading it back (finest scale, NaN refused) for every later stage.

Columns: ``scale, mpp, x, y, size0, tissue_fraction``, then one ``prob_*`` and one
``logit_*`` column per class. Class names are free text; column names are derived from
them (:func:`class_columns`) and the class list itself is stored in the file's metadata,
so readers never re-derive either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from .._atomic import atomic_file
from ..errors import StoreError
from .names import safe_names

__all__ = ["BASE_COLUMNS", "SCHEMA", "TileScores", "class_columns", "read", "safe_names", "write"]

SCHEMA = "histoalign-tile-scores/1"
BASE_COLUMNS = ("scale", "mpp", "x", "y", "size0", "tissue_fraction")
_META_KEY = b"histoalign"


def class_columns(classes: Sequence[str], prefix: str) -> list[str]:
    """``prefix_<safe name>`` per class (see :func:`safe_names`)."""
    return [f"{prefix}_{s}" for s in safe_names(classes)]


@dataclass(frozen=True)
class TileScores:
    """One slide's tile scores: the table and the classes its columns stand for."""

    slide_id: str
    classes: tuple[str, ...]
    table: pd.DataFrame
    untrained: bool = False  # made with an untrained (demo) encoder: meaningless

    @property
    def prob_columns(self) -> list[str]:
        return class_columns(self.classes, "prob")

    @property
    def logit_columns(self) -> list[str]:
        return class_columns(self.classes, "logit")

    def probs(self) -> NDArray[np.float32]:
        """[N, K] probabilities in class order."""
        return self.table[self.prob_columns].to_numpy(np.float32)

    def finest(self) -> TileScores:
        """The rows of the finest scale (smallest mpp); NaN probabilities are refused."""
        t = self.table
        fine = t[t["mpp"] == t["mpp"].min()] if len(t) else t
        if fine[self.prob_columns].isna().to_numpy().any():
            raise StoreError(f"slide {self.slide_id!r}: tile probabilities contain NaN; refusing to use them")
        return TileScores(self.slide_id, self.classes, fine.reset_index(drop=True), self.untrained)


def write(scores: TileScores, path: str | Path) -> Path:
    """Write atomically, with the schema, slide id and class list in the file metadata."""
    missing = [
        c for c in (*BASE_COLUMNS, *scores.prob_columns, *scores.logit_columns) if c not in scores.table
    ]
    if missing:
        raise StoreError(f"slide {scores.slide_id!r}: tile-score table lacks columns {missing}")
    table = pa.Table.from_pandas(scores.table, preserve_index=False)
    meta = {
        "schema": SCHEMA,
        "slide_id": scores.slide_id,
        "classes": list(scores.classes),
        "untrained": scores.untrained,
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(meta)})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _meta(path: Path) -> dict[str, object]:
    try:
        md = pq.read_schema(path).metadata or {}
    except FileNotFoundError as exc:
        raise StoreError(f"tile scores {str(path)!r} do not exist") from exc
    except pa.ArrowInvalid as exc:
        raise StoreError(f"tile scores {str(path)!r} are not a parquet file: {exc}") from exc
    if _META_KEY not in md:
        raise StoreError(f"tile scores {str(path)!r} lack the {SCHEMA} metadata (written by another tool?)")
    meta: dict[str, object] = json.loads(md[_META_KEY])
    if meta.get("schema") != SCHEMA:
        raise StoreError(f"tile scores {str(path)!r}: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    return meta


def read(path: str | Path, *, finest: bool = True) -> TileScores:
    """Read a tile-score table (only the finest scale unless ``finest=False``)."""
    p = Path(path)
    meta = _meta(p)
    ts = TileScores(
        str(meta["slide_id"]),
        tuple(meta["classes"]),  # type: ignore[arg-type]
        pd.read_parquet(p),
        bool(meta.get("untrained", False)),
    )
    return ts.finest() if finest else ts
