"""The per-slide stages run over a batch of slides in one process, as the workflow calls
them (``histoalign-wsi batch prepare|encode|finish``): ``prepare`` is tissue and tiling,
``encode`` loads the encoders once for the whole batch, ``finish`` is scoring, heatmaps
and GeoJSON. Each slide's files are written where the per-slide commands write them
(``tissue/``, ``tiles/``, ``features/``, ``predictions/``, ...). A slide that fails is
recorded with its error line and the others go on; slides whose outputs are already
complete and current (a rerun after a failure or a kill) are not computed again. The
batch manifest (:mod:`histoalign_wsi.batches`) appears when the batch is done."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..batches import FAILED, OK, BatchSlide, ManifestRow, read_manifest, write_manifest
from ..config import Config, config_hash
from ..errors import ConfigError, HistoAlignError, SlideError

__all__ = ["UPSTREAM", "paths_for", "pick_slides", "run_batch"]

log = logging.getLogger(__name__)

#: the status of a slide that failed at an earlier stage (only own failures are retried)
UPSTREAM = "upstream"


def paths_for(results: Path, sid: str) -> dict[str, Path]:
    """Where each per-slide file of slide ``sid`` lives under ``results``."""
    return {
        "tissue": results / "tissue" / f"{sid}.png",
        "tissue_meta": results / "tissue" / f"{sid}.json",
        "tiles": results / "tiles" / f"{sid}.zarr",
        "features": results / "features" / f"{sid}.zarr",
        "prediction": results / "predictions" / f"{sid}.json",
        "tile_scores": results / "tile_scores" / f"{sid}.parquet",
        "heatmaps": results / "heatmaps" / sid,
        "geojson": results / "geojson" / f"{sid}.geojson",
        "attention": results / "attention" / f"{sid}.parquet",
    }


def _mtime(p: Path) -> float:
    """A store's time is its root metadata's (the folder's own changes on every listing)."""
    f = p / "zarr.json" if p.is_dir() else p
    return f.stat().st_mtime if f.exists() else -1.0


def _store_hash(path: Path, key: str) -> str | None:
    """The config hash a complete store records under ``key`` (None: absent or broken)."""
    from ..features.store import open_store

    try:
        st = open_store(path)
        return None if st.validate(check_norms=False) else st.attrs.get(key)
    except Exception:  # a half-written or foreign folder: not complete
        return None


def _prepared(s: BatchSlide, p: dict[str, Path], cfg: Config) -> bool:
    """Tiles complete, made with these settings, newer than the slide file."""
    return (
        p["tissue"].is_file()
        and p["tissue_meta"].is_file()
        and _store_hash(p["tiles"], "config_hash") == config_hash(cfg, "tile")
        and _mtime(p["tiles"]) >= Path(s.path).stat().st_mtime
    )


def _encoded(p: dict[str, Path], cfg: Config) -> bool:
    """Features complete, made with these settings, newer than their tiles."""
    return _store_hash(p["features"], "encode_config_hash") == config_hash(cfg, "encode") and _mtime(
        p["features"]
    ) >= _mtime(p["tiles"])


def _prepare(s: BatchSlide, p: dict[str, Path], cfg: Config, state: dict[str, Any]) -> Path:
    from .pipeline import run_tile, run_tissue

    if _prepared(s, p, cfg):
        log.info("%s: tiles are current, kept", s.slide_id)
        return p["tiles"]
    run_tissue(s.path, p["tissue"], cfg, mpp=s.mpp)
    return run_tile(s.path, p["tiles"], cfg, tissue_png=p["tissue"], slide_id=s.slide_id, mpp=s.mpp)


def _encode(s: BatchSlide, p: dict[str, Path], cfg: Config, state: dict[str, Any]) -> Path:
    from .pipeline import run_encode

    if _encoded(p, cfg):
        log.info("%s: features are current, kept", s.slide_id)
        return p["features"]
    return run_encode(
        p["tiles"], s.path, p["features"], cfg, threads=state.get("threads"), encoders=state["encoders"]
    )


def _finish(s: BatchSlide, p: dict[str, Path], cfg: Config, state: dict[str, Any]) -> Path:
    from .outputs import run_export_geojson, run_heatmap
    from .pipeline import run_score

    attention = p["attention"] if state.get("attention") and p["attention"].is_file() else None
    run_score(
        [p["features"]],
        cfg,
        text_path=state["text"],
        prediction=p["prediction"],
        tile_scores=p["tile_scores"],
        calibration=state.get("calibration"),
    )
    run_heatmap(p["tile_scores"], p["prediction"], Path(s.path), p["heatmaps"], cfg, attention=attention)
    run_export_geojson(
        p["tile_scores"],
        p["prediction"],
        p["geojson"],
        cfg,
        store=p["tiles"],
        tissue=p["tissue_meta"],
        attention=attention,
    )
    return p["prediction"]


_STAGES: dict[str, Callable[[BatchSlide, dict[str, Path], Config, dict[str, Any]], Path]] = {
    "prepare": _prepare,
    "encode": _encode,
    "finish": _finish,
}


def run_batch(
    stage: str,
    slides: Sequence[BatchSlide],
    results: Path,
    out: Path,
    cfg: Config,
    *,
    upstream: Path | None = None,
    token: str = "",
    **state: Any,
) -> list[ManifestRow]:
    """Run ``stage`` for every slide of the batch and write the manifest ``out``.

    ``upstream`` is the previous stage's manifest of the same batch: its failed slides
    are carried over (status ``upstream``) and not run. ``state`` holds what the stage
    shares across slides (``text``, ``calibration``, ``attention``, ``threads``).
    Configuration problems that concern every slide (an encoder that cannot load) stop
    the batch without a manifest, so the job fails as a whole.
    """
    step = _STAGES[stage]
    before = {r.slide_id: r for r in read_manifest(upstream)[0]} if upstream is not None else {}
    todo = [s for s in slides if before.get(s.slide_id) is None or before[s.slide_id].ok]
    if stage == "encode" and any(not _encoded(paths_for(results, s.slide_id), cfg) for s in todo):
        # once per batch, and only when a slide needs it; an encoder that cannot load
        # fails the job as a whole (every slide would fail alike)
        from ..features.adapters import load_encoders, resolve_device

        state["encoders"] = load_encoders(cfg, device=resolve_device(cfg.device))
        log.info("loaded encoder(s) %s for this batch", ", ".join(e.name for e in state["encoders"]))
    rows: list[ManifestRow] = []
    for s in slides:
        prev = before.get(s.slide_id)
        if prev is not None and not prev.ok:
            rows.append(ManifestRow(s.slide_id, UPSTREAM, "", prev.error))
            continue
        p = paths_for(results, s.slide_id)
        try:
            output = step(s, p, cfg, state)
        except HistoAlignError as exc:
            log.error("%s %s: %s", stage, s.slide_id, exc)
            rows.append(ManifestRow(s.slide_id, FAILED, "", f"{stage}: {exc}"))
            continue
        except Exception as exc:  # one slide's unexpected failure must not lose the batch
            log.exception("%s %s: unexpected %s", stage, s.slide_id, type(exc).__name__)
            rows.append(
                ManifestRow(s.slide_id, FAILED, "", f"{stage}: unexpected {type(exc).__name__}: {exc}")
            )
            continue
        rows.append(ManifestRow(s.slide_id, OK, str(output)))
    write_manifest(out, rows, token=token)
    failed = [r for r in rows if r.status == FAILED]
    log.info(
        "%s: %d of %d slides done%s",
        stage,
        sum(r.ok for r in rows),
        len(rows),
        f"; failed: {', '.join(r.slide_id for r in failed)}" if failed else "",
    )
    return rows


def pick_slides(slides: Sequence[BatchSlide], manifest: Path, out: Path) -> list[ManifestRow]:
    """The rows of ``slides`` in a batch manifest, written to ``out`` (one slide's own
    target); a slide that failed, or is missing, is refused naming its error."""
    rows = {r.slide_id: r for r in read_manifest(manifest)[0]}
    picked = []
    for s in slides:
        r = rows.get(s.slide_id)
        if r is None:
            raise ConfigError(f"slide {s.slide_id!r} is not in batch manifest {str(manifest)!r}")
        if not r.ok:
            raise SlideError(s.path, r.error or r.status)
        picked.append(r)
    write_manifest(out, picked)
    return picked
