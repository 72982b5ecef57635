"""The per-slide zarr feature store (schema ``histoalign-features/1``, see DESIGN.md).

The tile stage writes the geometry (coords, tissue fractions, parent indices, per-scale
attrs); the encode stage copies it into the feature store and adds
``features/{encoder}``. Both are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray

from .. import __version__
from .._atomic import atomic_dir
from ..errors import StoreError
from ..slides.tiling import Tiling

__all__ = [
    "SCHEMA",
    "FeatureStore",
    "check_rows",
    "copy_features",
    "copy_geometry",
    "open_store",
    "write_tiling",
]

log = logging.getLogger(__name__)

SCHEMA = "histoalign-features/1"
ROW_CHUNK = 8192
#: how far a stored embedding's norm may be from 1 (float16 rounds to about 1e-3)
NORM_TOL = 2e-2


def _chunks(n: int, d: int | None = None) -> tuple[int, ...]:
    rows = max(1, min(n, ROW_CHUNK))
    return (rows,) if d is None else (rows, d)


def _integrity() -> dict[str, Any]:
    """Every chunk written (so a missing chunk means damage, never zeros) and each one
    checksummed (crc32c: a flipped bit fails the read)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {"compressors": [ZstdCodec(level=0), Crc32cCodec()], "config": {"write_empty_chunks": True}}


def _put(group: zarr.Group, name: str, data: NDArray[Any]) -> None:
    arr = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=_chunks(*data.shape), **_integrity()
    )
    if data.size:
        arr[...] = data


def write_tiling(
    path: str | Path,
    tiling: Tiling,
    *,
    slide_attrs: Mapping[str, Any],
    tissue_attrs: Mapping[str, Any],
    config_hash: str,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the tile geometry in the feature-store layout, atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        # attributes go in with each node's creation (one metadata write each): zarr's
        # ``attrs.update`` rewrites the node's metadata once per key
        root = zarr.open_group(
            tmp,
            mode="w",
            zarr_format=3,
            attributes={
                "schema": SCHEMA,
                "slide": dict(slide_attrs),
                "tissue": dict(tissue_attrs),
                "tiling": {
                    "scales_mpp": [g.mpp for g in tiling.scales],
                    "tile_px": tiling.tile_px,
                    "min_tissue_fraction": tiling.min_tissue_fraction,
                    "edge_policy": "whole tiles inside the slide only",
                },
                "package_version": __version__,
                "config_hash": config_hash,
                "provenance": dict(provenance) if provenance is not None else None,
            },
        )
        scales = root.create_group("scales")
        for g in tiling.scales:
            sg = scales.create_group(
                g.name,
                attributes={
                    "mpp": g.mpp,
                    "effective_mpp": tiling.effective_mpp(g),
                    "tile_px": tiling.tile_px,
                    "stride_px": tiling.tile_px,
                    "level0_tile_size": g.size0,
                    "n_tiles": len(g),
                },
            )
            _put(sg, "coords", g.coords.astype(np.int32))
            _put(sg, "tissue_fraction", g.tissue_fraction.astype(np.float16))
            pg = sg.create_group("parent")
            for name, par in g.parents.items():
                _put(pg, name, par.astype(np.int32))
            sg.create_group("features")
    return path


@dataclass(frozen=True)
class ScaleView:
    name: str
    mpp: float
    size0: int
    coords: NDArray[np.int32]
    tissue_fraction: NDArray[np.float16]
    parents: dict[str, NDArray[np.int32]]
    attrs: dict[str, Any]


class FeatureStore:
    """Read access to a tile or feature store (validated on open)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"feature store {str(self.path)!r} does not exist")
        try:
            self.root = zarr.open_group(self.path, mode="r")
        except Exception as exc:
            raise StoreError(f"{str(self.path)!r} is not a zarr store: {exc}") from exc
        self.attrs: dict[str, Any] = dict(self.root.attrs)
        if self.attrs.get("schema") != SCHEMA:
            raise StoreError(
                f"{str(self.path)!r}: schema is {self.attrs.get('schema')!r}, expected {SCHEMA!r}"
            )
        self.scale_names: list[str] = sorted(
            self.root["scales"].group_keys(),  # type: ignore[union-attr]
            key=lambda n: float(n.removesuffix("mpp")),
        )

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide"]["id"])

    def scale(self, name: str) -> ScaleView:
        if name not in self.scale_names:
            raise StoreError(
                f"{str(self.path)!r} has no scale {name!r} (it has {', '.join(self.scale_names)})"
            )
        g = self._group(f"scales/{name}")
        parents = {
            k: self._read(v, f"{name}/parent/{k}") for k, v in self._group(f"scales/{name}/parent").arrays()
        }
        a: dict[str, Any] = dict(g.attrs)
        sv = ScaleView(
            name=name,
            mpp=float(a["mpp"]),
            size0=int(a["level0_tile_size"]),
            coords=self._read(self._array(f"scales/{name}/coords"), f"{name}/coords"),
            tissue_fraction=self._read(
                self._array(f"scales/{name}/tissue_fraction"), f"{name}/tissue_fraction"
            ),
            parents=parents,
            attrs=a,
        )
        self._check_coords(sv)
        return sv

    def _read(self, arr: zarr.Array, key: str) -> NDArray[Any]:
        """A whole array; a chunk that fails its checksum or cannot be decoded is named."""
        try:
            return np.asarray(arr[...])
        except Exception as exc:  # zarr, numcodecs and crc32c each raise their own
            why = " ".join(str(exc).split())[:200]
            raise StoreError(
                f"{str(self.path)!r}: {key} is damaged ({type(exc).__name__}: {why}); {self.remedy}"
            ) from exc

    @property
    def remedy(self) -> str:
        """What remakes a damaged store (the stage's jobs keep the intact ones)."""
        stage = "encode" if any(self.encoders(s) for s in self.scale_names) else "prepare"
        return f"snakemake --forcerun {stage} remakes it (and keeps intact stores)"

    def _check_coords(self, sv: ScaleView) -> None:
        """Tiles lie inside the slide and no two share a place (a lost coordinate chunk
        reads as zeros: every tile at the corner)."""
        c = sv.coords
        if c.ndim != 2 or c.shape[1:] != (2,) or not len(c):
            return
        dims = (self.attrs.get("slide") or {}).get("level0_dims")
        inside = (c >= 0).all() and (
            dims is None or ((c[:, 0] + sv.size0 <= dims[0]) & (c[:, 1] + sv.size0 <= dims[1])).all()
        )
        where = f"{str(self.path)!r}: {sv.name}/coords"
        if not inside:
            raise StoreError(f"{where}: tiles lie outside the slide (damaged store); {self.remedy}")
        if len(np.unique(c, axis=0)) != len(c):
            raise StoreError(f"{where}: tiles repeat a position (damaged store); {self.remedy}")

    def _group(self, key: str) -> zarr.Group:
        g = self.root[key]
        if not isinstance(g, zarr.Group):
            raise StoreError(f"{str(self.path)!r}: {key} is not a group")
        return g

    def _array(self, key: str) -> zarr.Array:
        a = self.root[key]
        if not isinstance(a, zarr.Array):
            raise StoreError(f"{str(self.path)!r}: {key} is not an array")
        return a

    def encoders(self, scale: str) -> list[str]:
        return sorted(self._group(f"scales/{scale}/features").array_keys())

    def features_array(self, scale: str, encoder: str) -> zarr.Array:
        try:
            return self._array(f"scales/{scale}/features/{encoder}")
        except KeyError as exc:
            raise StoreError(
                f"{str(self.path)!r}: no features for encoder {encoder!r} at scale {scale}"
            ) from exc

    def features(self, scale: str, encoder: str) -> NDArray[np.float32]:
        """The features, checked: finite unit vectors (a missing chunk, zeros or a wild
        value is refused naming the store, never scored)."""
        key = f"{scale}/features/{encoder}"
        arr, n = self.features_array(scale, encoder), self._array(f"scales/{scale}/coords").shape[0]
        if arr.shape[0] != n:
            rows = arr.shape[0]
            raise StoreError(
                f"{str(self.path)!r}: {key} has {rows} rows for {n} tiles (damaged store); {self.remedy}"
            )
        x = np.asarray(self._read(arr, key), dtype=np.float32)
        try:
            return check_rows(x, f"{str(self.path)!r}: {key}")
        except StoreError as exc:
            raise StoreError(f"{exc}; {self.remedy}") from exc

    def encoder_attrs(self, encoder: str) -> dict[str, Any]:
        for s in self.scale_names:
            if encoder in self.encoders(s):
                return dict(self.features_array(s, encoder).attrs)
        raise StoreError(f"{str(self.path)!r}: no features for encoder {encoder!r}")

    def validate(self, *, check_norms: bool = True) -> list[str]:
        """Problems found against the schema (empty when the store is valid)."""
        problems: list[str] = []
        for key in ("slide", "tissue", "tiling", "package_version", "config_hash"):
            if key not in self.attrs:
                problems.append(f"missing root attribute {key!r}")
        names = self.scale_names
        for i, name in enumerate(names):
            g = self.root[f"scales/{name}"]
            for key in ("mpp", "tile_px", "stride_px", "level0_tile_size"):
                if key not in g.attrs:
                    problems.append(f"{name}: missing attribute {key!r}")
            try:
                sv = self.scale(name)
            except KeyError as exc:
                problems.append(f"{name}: missing array {exc}")
                continue
            except StoreError as exc:
                problems.append(str(exc).replace(f"{str(self.path)!r}: ", "", 1))
                continue
            n = sv.coords.shape[0]
            if sv.coords.ndim != 2 or sv.coords.shape[1] != 2 or sv.coords.dtype != np.int32:
                problems.append(f"{name}: coords must be int32 [N, 2]")
            if sv.tissue_fraction.shape != (n,):
                problems.append(f"{name}: tissue_fraction must have {n} rows")
            for coarser in names[i + 1 :]:
                par = sv.parents.get(coarser)
                if par is None or par.shape != (n,):
                    problems.append(f"{name}: parent/{coarser} missing or wrong length")
            for enc in self.encoders(name):
                arr = self.features_array(name, enc)
                if arr.ndim != 2 or arr.shape[0] != n or arr.dtype != np.float16:
                    problems.append(f"{name}/{enc}: features must be float16 [{n}, D]")
                if n and arr.chunks[0] < min(n, 256):
                    problems.append(f"{name}/{enc}: chunks of {arr.chunks[0]} rows are too small")
                for key in ("encoder", "weights_sha256", "embedding_dim", "normalized"):
                    if key not in arr.attrs:
                        problems.append(f"{name}/{enc}: missing attribute {key!r}")
                if check_norms and n:
                    try:
                        self.features(name, enc)
                    except StoreError as exc:
                        problems.append(str(exc).replace(f"{str(self.path)!r}: ", "", 1))
        return problems

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": str(self.path),
            "schema": self.attrs.get("schema"),
            "slide": self.attrs.get("slide"),
            "untrained": bool(self.attrs.get("untrained", False)),
            "scales": {},
        }
        for name in self.scale_names:
            sv = self.scale(name)
            out["scales"][name] = {
                "n_tiles": int(sv.coords.shape[0]),
                "level0_tile_size": sv.size0,
                "effective_mpp": sv.attrs.get("effective_mpp"),
                "encoders": {
                    e: {
                        "dim": int(self.features_array(name, e).shape[1]),
                        "weights_sha256": self.features_array(name, e).attrs.get("weights_sha256"),
                    }
                    for e in self.encoders(name)
                },
            }
        out["problems"] = self.validate()
        return out


def check_rows(x: NDArray[Any], where: str) -> NDArray[Any]:
    """Refuse feature rows that are not finite unit vectors (returns ``x``)."""
    if x.ndim != 2:
        raise StoreError(f"{where}: features must be 2-D, got shape {x.shape}")
    if not len(x):
        return x
    if not np.isfinite(x).all():
        raise StoreError(f"{where}: holds NaN or infinite values (damaged store)")
    norms = np.linalg.norm(x.astype(np.float32), axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOL)
    if len(bad):
        raise StoreError(
            f"{where}: {len(bad)} of {len(x)} rows are not unit vectors (row {int(bad[0])} has norm "
            f"{float(norms[bad[0]]):.3g}): a missing or damaged chunk, or features stored without their "
            "normalisation"
        )
    return x


def open_store(path: str | Path) -> FeatureStore:
    return FeatureStore(path)


@contextlib.contextmanager
def copy_geometry(src: FeatureStore, dst: str | Path) -> Iterator[zarr.Group]:
    """Open a new store at a temporary path holding ``src``'s geometry; yield its root so
    features can be added; rename to ``dst`` only when the block exits cleanly.

    The geometry is copied as files (every node but what a ``features`` group holds): a
    few small files, where re-creating each array through zarr costs about 10 ms apiece,
    a fixed cost per slide that a cohort pays thousands of times."""
    base = Path(src.path)
    if not (base / "zarr.json").is_file():
        raise StoreError(f"{str(base)!r} is not a zarr directory store")

    def features_content(d: str, names: list[str]) -> list[str]:
        parts = Path(d).relative_to(base).parts
        if len(parts) == 3 and parts[0] == "scales" and parts[2] == "features":
            return [n for n in names if n != "zarr.json"]
        return []

    with atomic_dir(dst) as tmp:
        shutil.copytree(base, tmp, ignore=features_content, dirs_exist_ok=True, copy_function=shutil.copyfile)
        yield zarr.open_group(tmp, mode="r+", zarr_format=3)


def copy_features(src: Path, root: zarr.Group, scales: Sequence[str], encoders: Sequence[str]) -> None:
    """Copy the ``encoders``' feature arrays of every scale from the store ``src`` into the
    store being written at ``root`` (as files: their chunks and attributes unchanged)."""
    dst = Path(str(root.store.root))  # type: ignore[attr-defined]
    for s in scales:
        for enc in encoders:
            rel = Path("scales") / s / "features" / enc
            if not (src / rel / "zarr.json").is_file():
                raise StoreError(f"{str(src)!r} has no features of {enc!r} at {s} to keep")
            shutil.copytree(src / rel, dst / rel, copy_function=shutil.copyfile)


def create_features(
    group: zarr.Group, encoder: str, n: int, dim: int, attrs: Mapping[str, Any]
) -> zarr.Array:
    """An empty float16 [n, dim] array under ``group`` (a scale's ``features`` group)."""
    return group.create_array(
        encoder,
        shape=(n, dim),
        dtype=np.float16,
        chunks=_chunks(n, dim),
        attributes=dict(attrs),
        **_integrity(),
    )
