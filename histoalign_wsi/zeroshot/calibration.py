"""Cohort calibration: the per-class mean tile logit per scale, subtracted before pooling,
and its file (``calibration.json``), written, read and checked here only.

Calibration is *transductive*: the offsets come from the cohort being scored, so one
slide's prediction depends on which other slides are in the run. With the default
``calibration_weighting: slide`` every slide counts once (the mean of per-slide mean
logits); ``tile`` weights by tile count, so large slides dominate. Logits are computed
out of core with dask over the zarr feature stores, by the same :func:`fused_logits` that
scoring uses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from numpy.typing import NDArray

from .._atomic import atomic_file
from ..config import Config
from ..errors import StoreError
from ..features.store import FeatureStore, check_rows, open_store
from ..slides.tiling import scale_name
from .alignment import AlignmentSpec, fused_logits
from .text import TextEmbeddings

__all__ = ["SCHEMA", "WEIGHTINGS", "CalibrationOffsets", "cohort_offsets"]

SCHEMA = "histoalign-calibration/1"
WEIGHTINGS = ("slide", "tile")


@dataclass(frozen=True)
class CalibrationOffsets:
    """Per-scale offsets [K] and what they were computed with."""

    bag_hash: str
    classes: tuple[str, ...]
    rule: str
    encoders: Mapping[str, str]  # name -> weights sha256
    encoder_weights: Mapping[str, float]
    weighting: str
    n_slides: int
    offsets: Mapping[str, tuple[float, ...]]
    #: ``site``: one set of offsets per site (``by_site``), each slide's site in ``site_of``
    groups: str = "cohort"
    by_site: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)
    site_of: Mapping[str, str] = field(default_factory=dict)

    def check(self, text: TextEmbeddings, spec: AlignmentSpec, *, source: str = "calibration") -> None:
        """Refuse offsets made for another bag, class list, rule or encoder set."""
        now = {
            "bag_hash": text.bag_hash,
            "classes": tuple(text.classes),
            "rule": spec.rule,
            "encoders": {n: t.weights_sha256 for n, t in text.encoders.items()},
            "encoder_weights": {n: float(spec.encoder_weights.get(n, 1.0)) for n in text.encoders},
        }
        for key, want in now.items():
            have = getattr(self, key)
            if (dict(have) if isinstance(have, Mapping) else have) != want:
                raise StoreError(
                    f"{source}: made with {key} {have!r} but scoring uses {want!r}; "
                    "re-run 'calibrate' with the current configuration"
                )

    def offset(
        self, scale: str, *, slide_id: str | None = None, source: str = "calibration"
    ) -> NDArray[np.float32]:
        """The offsets of ``scale`` (per-site calibration: those of ``slide_id``'s site)."""
        if self.groups == "site":
            site = self.site_of.get(slide_id or "")
            if site is None:
                raise StoreError(
                    f"{source}: slide {slide_id!r} has no site in this per-site calibration; "
                    "re-run 'calibrate' with this slide in the cohort"
                )
            return np.asarray(self.by_site[site][scale], np.float32)
        if scale not in self.offsets:
            raise StoreError(
                f"{source}: has no offsets for scale {scale} (it has {', '.join(self.offsets) or 'none'}); "
                "re-run 'calibrate' with the current scales_mpp"
            )
        return np.asarray(self.offsets[scale], np.float32)

    def write(self, path: str | Path, *, provenance: Mapping[str, Any] | None = None) -> Path:
        every = [self.offsets, *self.by_site.values()]
        bad = sorted(
            {s for o in every for s, v in o.items() if not np.isfinite(np.asarray(v, np.float64)).all()}
        )
        if bad:
            raise StoreError(
                f"calibration offsets at scale(s) {', '.join(bad)} are not finite: a feature store holds "
                "NaN or infinity (score the stores one by one to find it)"
            )
        d = {
            "schema": SCHEMA,
            "bag_hash": self.bag_hash,
            "classes": list(self.classes),
            "rule": self.rule,
            "encoders": dict(self.encoders),
            "encoder_weights": dict(self.encoder_weights),
            "weighting": self.weighting,
            "n_slides": self.n_slides,
            "offsets": {s: list(v) for s, v in self.offsets.items()},
            "groups": self.groups,
            "by_site": {g: {s: list(v) for s, v in o.items()} for g, o in self.by_site.items()},
            "site_of": dict(self.site_of),
            "provenance": dict(provenance) if provenance is not None else None,
        }
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(d, indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> CalibrationOffsets:
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise StoreError(f"calibration {str(p)!r} does not exist") from exc
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise StoreError(f"calibration {str(p)!r} is not a {SCHEMA} file; re-run 'calibrate'")
        return cls(
            bag_hash=d["bag_hash"],
            classes=tuple(d["classes"]),
            rule=d["rule"],
            encoders=dict(d["encoders"]),
            encoder_weights={k: float(v) for k, v in d["encoder_weights"].items()},
            weighting=d["weighting"],
            n_slides=int(d["n_slides"]),
            offsets={s: tuple(float(x) for x in v) for s, v in d["offsets"].items()},
            groups=str(d.get("groups", "cohort")),
            by_site={
                g: {s: tuple(float(x) for x in v) for s, v in o.items()}
                for g, o in d.get("by_site", {}).items()
            },
            site_of=dict(d.get("site_of", {})),
        )


def _slide_logit_sum(
    store: FeatureStore, scale: str, text: TextEmbeddings, spec: AlignmentSpec
) -> tuple[NDArray[np.float64], int]:
    """Sum of the fused logits of one slide's tiles at one scale, and their count."""
    k = len(text.classes)
    names = list(text.encoders)
    arrays = [da.from_zarr(store.features_array(scale, n)) for n in names]
    n = int(arrays[0].shape[0])
    if n == 0:
        return np.zeros(k), 0
    rows = arrays[0].chunks[0]
    arrays = [a.rechunk({0: rows, 1: -1}) for a in arrays]

    def block(*xs: NDArray[np.floating]) -> NDArray[np.float32]:
        for name, x in zip(names, xs, strict=True):  # a damaged store is refused, not averaged in
            check_rows(np.asarray(x), f"{str(store.path)!r}: {scale}/features/{name}")
        return fused_logits(dict(zip(names, xs, strict=True)), text, spec)

    lg = da.map_blocks(block, *arrays, dtype=np.float32, chunks=(rows, (k,)))
    try:
        return np.asarray(lg.astype(np.float64).sum(axis=0).compute()), n
    except StoreError as exc:
        raise StoreError(f"{exc}; {store.remedy}") from exc
    except (ValueError, RuntimeError, OSError) as exc:  # a chunk that fails its checksum or decoding
        why = " ".join(str(exc).split())[:200]
        raise StoreError(
            f"{str(store.path)!r}: {scale}/features is damaged ({type(exc).__name__}: {why}); {store.remedy}"
        ) from exc


def cohort_offsets(
    stores: Sequence[str | Path],
    text: TextEmbeddings,
    cfg: Config,
    *,
    sites: Mapping[str, str] | None = None,
) -> CalibrationOffsets:
    """The cohort's mean fused logit per class and scale; stores are streamed chunk by
    chunk, never loaded whole. Every configured scale gets offsets (zeros where no slide
    has tiles at that scale, so a later score never runs uncalibrated by omission). With
    ``sites`` (slide id -> site: ``calibration_groups: site``) each site gets its own
    offsets, from its own slides only (transductive within the site)."""
    spec = AlignmentSpec.from_config(cfg)
    weighting = cfg.calibration_weighting
    k = len(text.classes)
    scales = [scale_name(m) for m in cfg.tiling.scales_mpp]
    # running sums per group, one store open at a time: memory does not grow with the cohort
    total: dict[str, dict[str, NDArray[np.float64]]] = {}  # of slide means, or of tile logits
    count: dict[str, dict[str, int]] = {}  # slides with tiles, or tiles
    site_of: dict[str, str] = {}
    n_slides = 0
    for path in stores:
        st = open_store(path)
        n_slides += 1
        group = "cohort"
        if sites is not None:
            if st.slide_id not in sites:
                raise StoreError(
                    f"{str(st.path)!r}: slide {st.slide_id!r} has no site (calibration_groups: site)"
                )
            group = site_of[st.slide_id] = sites[st.slide_id]
        tot = total.setdefault(group, {s: np.zeros(k, np.float64) for s in scales})
        cnt = count.setdefault(group, dict.fromkeys(scales, 0))
        for s in scales:
            v, n = _slide_logit_sum(st, s, text, spec)
            if n == 0:
                continue
            tot[s] += v / n if weighting == "slide" else v
            cnt[s] += 1 if weighting == "slide" else n
        del st

    def means(g: str) -> dict[str, tuple[float, ...]]:
        return {
            s: tuple(float(x) for x in (total[g][s] / count[g][s] if count[g][s] else np.zeros(k)))
            for s in scales
        }

    by_site = {g: means(g) for g in sorted(total)} if sites is not None else {}
    cohort = means("cohort") if sites is None else {s: tuple(0.0 for _ in range(k)) for s in scales}
    return CalibrationOffsets(
        bag_hash=text.bag_hash,
        classes=tuple(text.classes),
        rule=spec.rule,
        encoders={n: t.weights_sha256 for n, t in text.encoders.items()},
        encoder_weights={n: float(spec.encoder_weights.get(n, 1.0)) for n in text.encoders},
        weighting=weighting,
        n_slides=n_slides,
        offsets=cohort,
        groups="site" if sites is not None else "cohort",
        by_site=by_site,
        site_of=site_of,
    )
