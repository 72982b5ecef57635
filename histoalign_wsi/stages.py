"""Stage entry points shared by the CLI and the workflow: open inputs, call the
library, write outputs atomically. Each function is one pipeline stage."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zarr

from . import __version__
from .cohort import slide_id_for
from .config import Config, config_hash
from .errors import SlideError
from .slide import Slide, open_slide
from .store import write_tiling
from .tiling import tile_slide
from .tissue import detect_tissue, load_tissue, save_tissue

if TYPE_CHECKING:
    from .encoders import LoadedEncoder

__all__ = ["load_encoders", "open_for", "run_encode", "run_tile", "run_tissue", "slide_attrs"]

log = logging.getLogger(__name__)

TILE_KEYS = ("scales_mpp", "tile_px", "tiling", "tissue", "reader", "mpp_override")


def open_for(path: str | Path, cfg: Config, *, mpp: float | None = None) -> Slide:
    """Open a slide with the configured reader and MPP rules."""
    return open_slide(path, reader=cfg.reader, mpp_override=mpp, mpp_default=cfg.mpp_override)


def slide_attrs(slide: Slide, slide_id: str) -> dict[str, Any]:
    return {
        "id": slide_id,
        "path": str(slide.path),
        "size_bytes": slide.path.stat().st_size,
        "level0_dims": list(slide.dimensions),
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "vendor": slide.vendor,
        "reader": slide.reader,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": slide.level_downsamples,
    }


def run_tissue(slide_path: str | Path, out_png: str | Path, cfg: Config, *, mpp: float | None = None) -> Path:
    """Detect tissue and write ``out_png`` (+ ``.json`` with scale and polygons)."""
    with open_for(slide_path, cfg, mpp=mpp) as slide:
        result = detect_tissue(slide, cfg.tissue)
        log.info("%s: tissue covers %.1f%% of the slide", slide.path.name, 100 * result.area_fraction)
        return save_tissue(result, slide, out_png)


def run_tile(
    slide_path: str | Path,
    out: str | Path,
    cfg: Config,
    *,
    tissue_png: str | Path | None = None,
    slide_id: str | None = None,
    mpp: float | None = None,
) -> Path:
    """Lay the nested grids and write the tile store (the feature-store layout)."""
    sid = slide_id or slide_id_for(slide_path)
    with open_for(slide_path, cfg, mpp=mpp) as slide:
        if tissue_png is not None:
            mask, meta = load_tissue(tissue_png)
            scale = float(meta["level0_px_per_mask_px"])
            tissue_attrs = {k: meta[k] for k in ("threshold", "tissue_fraction", "params")}
        else:
            res = detect_tissue(slide, cfg.tissue)
            mask, scale = res.mask, res.scale
            tissue_attrs = {
                "threshold": res.threshold,
                "tissue_fraction": res.area_fraction,
                "params": cfg.raw["tissue"],
            }
        tissue_attrs["level0_px_per_mask_px"] = scale
        tiling = tile_slide(
            mask,
            mask_scale=scale,
            slide_mpp=slide.mpp,
            level0_dims=slide.dimensions,
            params=cfg.tiling,
        )
        for g in tiling.scales:
            log.info("%s: %s: %d tiles", sid, g.name, len(g))
        return write_tiling(
            out,
            tiling,
            slide_attrs=slide_attrs(slide, sid) | {"package_version": __version__},
            tissue_attrs=tissue_attrs,
            config_hash=config_hash(cfg, TILE_KEYS),
        )


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_encoders(
    cfg: Config, names: Sequence[str] | None = None, *, device: str = "cpu"
) -> list[LoadedEncoder]:
    """The configured encoders, loaded (unknown names and missing weights are errors)."""
    from .encoders import get_entry, load_encoder, load_registry

    registry = load_registry(cfg.encoder_registry)
    return [
        load_encoder(get_entry(n, registry), offline=cfg.offline, device=device)
        for n in (names or cfg.encoders)
    ]


def run_encode(tile_store: str | Path, slide_path: str | Path, out: str | Path, cfg: Config) -> Path:
    """Copy the tile geometry into a new feature store and add every encoder's features."""
    from .encoding import EncodeSettings, run_pipeline
    from .store import copy_geometry, create_features, open_store

    src = open_store(tile_store)
    device = resolve_device(cfg.device)
    encoders = load_encoders(cfg, device=device)
    meta = src.attrs["slide"]
    scales = [src.scale(n) for n in src.scale_names]
    settings = EncodeSettings(
        tile_px=int(src.attrs["tiling"]["tile_px"]),
        batch_size=cfg.encode.batch_size,
        readers=cfg.encode.readers,
        prefetch=cfg.encode.prefetch,
        device=device,
    )
    with open_slide(slide_path, reader=cfg.reader, mpp_override=float(meta["mpp"])) as slide:
        if list(slide.dimensions) != list(meta["level0_dims"]):
            raise SlideError(
                slide.path,
                f"dimensions {slide.dimensions} differ from the tile store's "
                f"{meta['level0_dims']}: wrong slide for {str(tile_store)!r}",
            )
        with copy_geometry(src, out) as root:
            arrays: dict[tuple[int, str], Any] = {}
            for s, sv in enumerate(scales):
                fg = root[f"scales/{sv.name}/features"]
                assert isinstance(fg, zarr.Group)
                for enc in encoders:
                    arrays[(s, enc.name)] = create_features(
                        fg,
                        enc.name,
                        len(sv.coords),
                        enc.entry.embed_dim,
                        enc.attrs(),
                    )
            n = run_pipeline(slide, scales, encoders, arrays, settings)
            root.attrs.update(
                {
                    "encoders": {e.name: e.attrs() for e in encoders},
                    "untrained": any(e.entry.untrained for e in encoders),
                    "encode_device": device,
                }
            )
            log.info(
                "%s: encoded %d tiles with %s on %s",
                meta["id"],
                n,
                ", ".join(e.name for e in encoders),
                device,
            )
    return Path(out)
