"""The zero-shot pipeline's stages (slides, features, zero-shot, outputs): one ``run_*``
per CLI subcommand. Each opens its inputs, calls the library and writes its outputs
through their owner modules (atomically).

Heavy modules (torch, the encode pipeline) are imported inside the stages that need
them, so that light subcommands start fast.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config, config_hash
from ..errors import ConfigError, SlideError
from ..slides.cohort import slide_id_for
from ..slides.reader import Slide, open_slide

__all__ = [
    "open_for",
    "run_calibrate",
    "run_embed_prompts",
    "run_encode",
    "run_encoders",
    "run_info",
    "run_inspect",
    "run_make_demo_slides",
    "run_score",
    "run_tile",
    "run_tissue",
    "run_unlock",
]

log = logging.getLogger(__name__)


# --- shared helpers -------------------------------------------------------------------


def open_for(path: str | Path, cfg: Config, *, mpp: float | None = None) -> Slide:
    """Open a slide with the configured reader and MPP rules."""
    return open_slide(
        path,
        reader=cfg.reader,
        mpp_override=mpp,
        mpp_default=cfg.mpp_override,
        max_megapixels=cfg.max_read_megapixels,
    )


# --- slides ---------------------------------------------------------------------------


def run_info(slide_path: Path, cfg: Config, *, mpp: float | None = None) -> dict[str, Any]:
    with open_for(slide_path, cfg, mpp=mpp) as s:
        return dataclasses.asdict(s.info())


def run_make_demo_slides(outdir: Path, *, truth: Path | None = None, **spec: Any) -> list[Path]:
    from ..slides.synthetic import make_demo_cohort

    return make_demo_cohort(outdir, masks_dir=truth, **spec)


def _prepare_record(
    slide_path: str | Path, cfg: Config, mpp: float | None, given: Mapping[str, Any] | None
) -> Mapping[str, Any]:
    """The record of tissue and tiles: the batch stage's, or one made now."""
    from ..provenance import Expected, HashCache

    return given if given is not None else Expected(cfg, HashCache()).prepare(slide_path, mpp)


def _check_upsampling(slide: Slide, cfg: Config) -> None:
    """Refuse a slide far coarser than the finest scale (``tiling.max_upsampling``)."""
    limit, finest = cfg.tiling.max_upsampling, cfg.tiling.scales_mpp[0]
    factor = slide.mpp / finest
    if limit is not None and factor > limit:
        px = max(1, round(cfg.tiling.tile_px / factor))
        raise SlideError(
            slide.path,
            f"its resolution, {slide.mpp:g} um/px, is {factor:.1f}x coarser than the finest scale "
            f"{finest:g} um/px: each tile would be made from about {px}x{px} of its pixels. Set "
            f"scales_mpp to scales at or above {slide.mpp / limit:g} um/px for such slides, check "
            "the MPP the slide reports (an 'mpp' column in the sheet overrides it), or set "
            "tiling.max_upsampling: null to encode upsampled tiles anyway",
        )


def run_tissue(
    slide_path: str | Path,
    out_png: str | Path,
    cfg: Config,
    *,
    mpp: float | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Detect tissue and write ``out_png`` (+ ``.json`` with scale, polygons and what it was
    made from)."""
    from ..slides.tissue import detect_tissue, save_tissue

    with open_for(slide_path, cfg, mpp=mpp) as slide:
        record = _prepare_record(slide_path, cfg, mpp, provenance)  # once the file is known good
        result = detect_tissue(slide, cfg.tissue, max_megapixels=cfg.max_read_megapixels)
        log.info("%s: tissue covers %.1f%% of the slide", slide.path.name, 100 * result.area_fraction)
        return save_tissue(result, slide, out_png, provenance=record)


def run_tile(
    slide_path: str | Path,
    out: str | Path,
    cfg: Config,
    *,
    tissue_png: str | Path | None = None,
    slide_id: str | None = None,
    mpp: float | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Lay the nested grids and write the tile store (the feature-store layout)."""
    from ..features.store import write_tiling
    from ..slides.tiling import tile_slide
    from ..slides.tissue import detect_tissue, load_tissue

    sid = slide_id or slide_id_for(slide_path)
    with open_for(slide_path, cfg, mpp=mpp) as slide:
        record = _prepare_record(slide_path, cfg, mpp, provenance)
        if tissue_png is not None:
            mask, meta = load_tissue(tissue_png)
            scale = float(meta["level0_px_per_mask_px"])
            tissue_attrs = {k: meta[k] for k in ("threshold", "tissue_fraction", "params")}
        else:
            res = detect_tissue(slide, cfg.tissue, max_megapixels=cfg.max_read_megapixels)
            mask, scale = res.mask, res.scale
            tissue_attrs = {"threshold": res.threshold, "tissue_fraction": res.area_fraction}
            tissue_attrs["params"] = cfg.raw["tissue"]
        tissue_attrs["level0_px_per_mask_px"] = scale
        _check_upsampling(slide, cfg)
        tiling = tile_slide(
            mask, mask_scale=scale, slide_mpp=slide.mpp, level0_dims=slide.dimensions, params=cfg.tiling
        )
        for g in tiling.scales:
            log.info("%s: %s: %d tiles", sid, g.name, len(g))
        return write_tiling(
            out,
            tiling,
            slide_attrs=slide.attrs(sid) | {"package_version": __version__},
            tissue_attrs=tissue_attrs,
            config_hash=config_hash(cfg, "tile"),
            provenance=record,
        )


# --- features -------------------------------------------------------------------------


def run_encode(
    tile_store: str | Path,
    slide_path: str | Path,
    out: str | Path,
    cfg: Config,
    *,
    threads: int | None = None,
    encoders: Sequence[Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    reuse: Sequence[str] = (),
) -> Path:
    """Copy the tile geometry into a new feature store and add every encoder's features,
    within a budget of ``threads`` CPU threads (readers + torch). ``encoders`` already
    loaded (a batch of slides loads them once) are used as they are. The store records
    ``provenance`` (made now when not given: the tile store's digest and the encoders'
    identities). The encoders named in ``reuse`` are not run: their arrays are copied
    from the store already at ``out`` (made from the same tiles with the same encoder)."""
    import torch
    import zarr

    from ..features.adapters import load_encoders, resolve_device
    from ..features.encode import EncodeSettings, run_pipeline, thread_budget
    from ..features.store import copy_features, copy_geometry, create_features, open_store
    from ..provenance import Expected, HashCache, digest

    src = open_store(tile_store)
    record = provenance
    if record is None:
        record = Expected(cfg, HashCache()).encode(digest(src.attrs.get("provenance")), offline=False)
    device = resolve_device(cfg.device)
    encoders = list(encoders) if encoders is not None else load_encoders(cfg, device=device)
    meta = src.attrs["slide"]
    scales = [src.scale(n) for n in src.scale_names]
    readers, torch_threads = thread_budget(threads, cfg.encode.readers, accelerator=device != "cpu")
    torch.set_num_threads(torch_threads)
    log.info("thread budget: %d reader thread(s), %d torch thread(s)", readers, torch_threads)
    settings = EncodeSettings(
        tile_px=int(src.attrs["tiling"]["tile_px"]),
        batch_size=cfg.encode.batch_size,
        readers=readers,
        prefetch=cfg.encode.prefetch,
        device=device,
        native_jpeg=cfg.encode.native_jpeg,
        device_jpeg={"auto": None, "always": True, "never": False}[cfg.encode.device_jpeg],
        stain=_stain(cfg),
    )
    with open_for(slide_path, cfg, mpp=float(meta["mpp"])) as slide:
        if list(slide.dimensions) != list(meta["level0_dims"]):
            raise SlideError(
                slide.path,
                f"dimensions {slide.dimensions} differ from the tile store's "
                f"{meta['level0_dims']}: wrong slide for {str(tile_store)!r}",
            )
        with copy_geometry(src, out) as root:
            arrays: dict[tuple[int, str], Any] = {}
            todo = [e for e in encoders if e.name not in reuse]
            for s, sv in enumerate(scales):
                fg = root[f"scales/{sv.name}/features"]
                assert isinstance(fg, zarr.Group)  # copy_geometry made it
                for enc in todo:
                    arrays[(s, enc.name)] = create_features(
                        fg, enc.name, len(sv.coords), enc.entry.embed_dim, enc.attrs()
                    )
            if reuse:
                copy_features(Path(out), root, [sv.name for sv in scales], reuse)
                log.info("%s: features of %s kept from the current store", meta["id"], ", ".join(reuse))
            n = run_pipeline(slide, scales, todo, arrays, settings) if todo else 0
            root.update_attributes(  # one metadata write (attrs.update writes once per key)
                {
                    "encoders": {e.name: e.attrs() for e in encoders},
                    "untrained": any(e.entry.untrained for e in encoders),
                    "encode_device": device,
                    "encode_config_hash": config_hash(cfg, "encode"),
                    "stain": settings.stain.describe() if settings.stain is not None else {"method": "none"},
                    "provenance": dict(record),
                }
            )
            names = ", ".join(e.name for e in encoders)
            log.info("%s: encoded %d tiles with %s on %s", meta["id"], n, names, device)
    return Path(out)


def _stain(cfg: Config) -> Any:
    """The stain normaliser of ``stain.method`` (None for ``none``)."""
    if cfg.stain.method == "none":
        return None
    from ..features.stain import StainNormalizer, StainReference

    return StainNormalizer(cfg.stain.method, StainReference.load(cfg.stain.reference))


def run_encoders(cfg: Config) -> list[dict[str, Any]]:
    """The registry: one row per encoder with where its weights are (or why not)."""
    from ..features import availability, load_registry

    return [
        {
            "name": e.name,
            "kind": e.kind,
            "source": dict(e.weights) or "built in",
            "embed_dim": e.embed_dim,
            "status": availability(e, offline=cfg.offline),
            "description": e.description,
        }
        for e in load_registry(cfg.encoder_registry).values()
    ]


def run_inspect(store: Path) -> dict[str, Any]:
    from ..features.store import open_store

    return open_store(store).summary()


# --- zero-shot ------------------------------------------------------------------------


def run_embed_prompts(out: Path, cfg: Config, *, cache: Path | None = None) -> Path:
    """Embed the bag with every configured encoder; the file records what it was made
    from. A run forced with ``--forcerun embed_prompts`` (or ``--forceall``) recomputes
    the cached entries too."""
    from ..features.adapters import load_encoders, resolve_device
    from ..provenance import Expected, HashCache
    from ..runlock import forced_stages
    from ..zeroshot.prompts import load_bag
    from ..zeroshot.text import embed_bag, save_text

    cache = cache or Path(cfg.results) / "cache" / "text"
    hashes = HashCache(cache.parent / "hashes.json")
    recompute = "embed_prompts" in forced_stages(cache.parent.parent)
    encs = load_encoders(cfg, device=resolve_device(cfg.device))
    te = embed_bag(
        load_bag(cfg.prompt_bag), encs, protocol=cfg.protocol, cache_dir=cache, recompute=recompute
    )
    te = dataclasses.replace(te, provenance=Expected(cfg, hashes).text(offline=False))
    hashes.save()
    return save_text(te, out)


def run_calibrate(stores: Sequence[Path], text_path: Path, out: Path, cfg: Config) -> Path:
    from ..features.store import open_store
    from ..provenance import digest, make_record
    from ..zeroshot.calibration import cohort_offsets
    from ..zeroshot.text import load_text

    text = load_text(text_path)
    made_from = sorted(digest(open_store(s).attrs.get("provenance")) for s in stores)
    record = make_record("calibrate", cfg, {"features": digest(made_from), "text": digest(text.provenance)})
    sites = None
    if cfg.calibration_groups == "site":
        from ..sites import sites_for

        ids = [open_store(s).slide_id for s in stores]
        key = sites_for(ids, slides=cfg.slides, labels=cfg.labels, pattern=cfg.site_pattern)
        if key is None:
            raise ConfigError(
                "calibration_groups: site needs a site key (a 'site' column in the slide or label sheet, "
                "or site_pattern)"
            )
        sites = dict(key.sites)
    return cohort_offsets(stores, text, cfg, sites=sites).write(out, provenance=record)


def run_score(
    stores: Sequence[Path],
    cfg: Config,
    *,
    text_path: Path | None = None,
    out: Path | None = None,
    prediction: Path | None = None,
    tile_scores: Path | None = None,
    calibration: Path | None = None,
    screening: Path | None = None,
    labels: Path | None = None,
) -> list[Path]:
    """Score stores into ``out`` (predictions/, tile_scores/, predictions.csv), or one
    store into the paths ``prediction`` and ``tile_scores``."""
    from ..features.store import open_store
    from ..zeroshot.calibration import CalibrationOffsets
    from ..zeroshot.scoring import score_store, write_scores
    from ..zeroshot.text import text_for

    if (prediction or tile_scores) and len(stores) != 1:
        raise ConfigError("--prediction/--tile-scores name one slide's outputs: give exactly one store")
    if not (prediction and tile_scores) and out is None:
        raise ConfigError("give --out DIR, or both --prediction and --tile-scores")
    text = text_for(cfg, text_path, Path(out or ".") / "cache" / "text")
    from ..zeroshot.keep import Screening

    calib = CalibrationOffsets.read(calibration) if calibration else None
    scr = Screening.read(screening) if screening else None
    written = []
    for sp in stores:
        store = open_store(sp)
        sid = store.slide_id
        pj = prediction or Path(str(out)) / "predictions" / f"{sid}.json"
        tp = tile_scores or Path(str(out)) / "tile_scores" / f"{sid}.parquet"
        write_scores(score_store(store, text, cfg, calibration=calib, screening=scr), pj, tp)
        written.append(pj)
    if out is not None and prediction is None:
        sheet = labels or (Path(cfg.labels) if cfg.labels else None)
        from .outputs import run_summarize

        run_summarize(
            written,
            out / "predictions.csv",
            labels=sheet,
            metrics=out / "metrics.json",
            confusion=out / "confusion_matrix.png",
        )
    return written


def run_unlock(results: Path, *, force: bool = False) -> dict[str, Any] | None:
    from ..runlock import unlock

    return unlock(results, force=force)
