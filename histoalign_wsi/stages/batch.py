"""The per-slide stages run over a batch of slides in one process, as the workflow calls
them (``histoalign-wsi batch prepare|encode|finish``): ``prepare`` is tissue and tiling,
``encode`` loads the encoders once for the whole batch, ``finish`` is scoring, heatmaps
and GeoJSON. Each slide's files are written where the per-slide commands write them
(``tissue/``, ``tiles/``, ``features/``, ``predictions/``, ...). A slide that fails is
recorded with its error line and the others go on; slides whose outputs are already
complete and current (a rerun after a failure or a kill) are not computed again. The
batch manifest (:mod:`histoalign_wsi.batches`) appears when the batch is done."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._atomic import atomic_file
from ..batches import FAILED, OK, BatchSlide, ManifestRow, read_manifest, write_manifest
from ..config import Config
from ..errors import ConfigError, HistoAlignError, SlideError, StoreError
from ..provenance import Expected, HashCache, differs, digest
from ..runlock import forced_stages

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


def _stored(p: Path, *, whole: bool = False) -> Any:
    """The provenance record an output holds (None: absent, half-written, damaged or not
    ours): a tissue JSON's, a store's root attribute. ``whole`` reads every feature (a
    damaged chunk is never kept)."""
    try:
        if p.suffix == ".json":
            return json.loads(p.read_text(encoding="utf-8")).get("provenance")
        from ..features.store import open_store

        st = open_store(p)
        return None if st.validate(check_norms=whole) else st.attrs.get("provenance")
    except Exception:  # a half-written or foreign file: not current
        return None


def _keep(what: str, s: BatchSlide, stored: Any, expected: dict[str, Any], ctx: _Context) -> bool:
    """Whether an output is current (and the stage not forced); logs why it is redone."""
    why = "recompute asked (--forcerun/--forceall)" if ctx.forced else differs(stored, expected)
    if why is None:
        log.info("%s: %s are current, kept", s.slide_id, what)
        return True
    if stored is not None:
        log.info("%s: %s redone: %s", s.slide_id, what, why)
    return False


def _relocate(p: Path, slide_path: str) -> None:
    """A kept output of a slide that moved (another folder, another mount) names where
    the slide is now, as a run from scratch would: its bytes are the same."""
    new = str(Path(slide_path))
    if p.suffix == ".json":
        meta = json.loads(p.read_text(encoding="utf-8"))
        if meta.get("slide") != new:
            with atomic_file(p) as tmp:
                tmp.write_text(json.dumps(meta | {"slide": new}), encoding="utf-8")
        return
    import zarr

    root = zarr.open_group(p, mode="r")
    raw = root.attrs.get("slide")
    slide = dict(raw) if isinstance(raw, Mapping) else {}
    if slide.get("path") != new:
        zarr.open_group(p, mode="r+").update_attributes({"slide": slide | {"path": new}})
        log.info("%s: recorded the slide's new place %s", p.name, new)


@dataclass
class _Context:
    """What a batch job shares across its slides."""

    expected: Expected
    forced: bool
    state: dict[str, Any]
    #: a feature store's record, read whole once (the load decision and the keep check)
    features: dict[Path, Any] = field(default_factory=dict)

    def features_record(self, path: Path) -> Any:
        if path not in self.features:
            self.features[path] = _stored(path, whole=True)
        return self.features[path]


def _prepare(s: BatchSlide, p: dict[str, Path], cfg: Config, ctx: _Context) -> Path:
    from .pipeline import run_tile, run_tissue

    try:
        rec = ctx.expected.prepare(s.path, s.mpp)
    except OSError:  # let the reader say what is wrong with the file, in one line
        from .pipeline import open_for

        with open_for(s.path, cfg, mpp=s.mpp):
            pass
        raise
    if not (p["tissue"].is_file() and _keep("tissue", s, _stored(p["tissue_meta"]), rec, ctx)):
        run_tissue(s.path, p["tissue"], cfg, mpp=s.mpp, provenance=rec)
    elif _keep("tiles", s, _stored(p["tiles"]), rec, ctx):
        _relocate(p["tissue_meta"], s.path)
        _relocate(p["tiles"], s.path)
        return p["tiles"]
    return run_tile(
        s.path, p["tiles"], cfg, tissue_png=p["tissue"], slide_id=s.slide_id, mpp=s.mpp, provenance=rec
    )


def _encode_record(p: dict[str, Path], ctx: _Context) -> dict[str, Any]:
    return ctx.expected.encode(digest(_stored(p["tiles"])), offline=False)


def _encode(s: BatchSlide, p: dict[str, Path], cfg: Config, ctx: _Context) -> Path:
    from .pipeline import run_encode

    if _stored(p["tiles"]) is None:
        raise StoreError(f"tile store {str(p['tiles'])!r} is missing or incomplete: rerun prepare")
    rec = _encode_record(p, ctx)
    old = ctx.features_record(p["features"])
    if _keep("features", s, old, rec, ctx):
        _relocate(p["features"], s.path)
        return p["features"]
    before = ctx.expected.cache.fingerprint(s.path)
    if before != (_stored(p["tiles"]) or {}).get("inputs", {}).get("slide"):
        raise SlideError(s.path, "changed since its tiles were made: run again (prepare redoes it)")
    out = run_encode(
        p["tiles"],
        s.path,
        p["features"],
        cfg,
        threads=ctx.state.get("threads"),
        encoders=ctx.state["encoders"],
        provenance=rec,
        reuse=() if ctx.forced else _reusable(old, rec),
    )
    if ctx.expected.cache.fingerprint(s.path) != before:  # replaced while its pixels were read
        shutil.rmtree(out, ignore_errors=True)
        raise SlideError(s.path, "changed while it was being encoded (mixed pixels): run again")
    return out


def _reusable(old: Any, new: Mapping[str, Any]) -> list[str]:
    """The encoders whose features in the current store are what this run would make:
    same tiles, settings and code, same encoder identity (an encoder added to the config
    does not re-encode the others)."""
    if not isinstance(old, Mapping) or differs({**old, "inputs": {}}, {**new, "inputs": {}}) is not None:
        return []
    before, now = old.get("inputs") or {}, new["inputs"]
    if before.get("tiles") != now["tiles"]:
        return []
    was = before.get("encoders") or {}
    return [n for n, ident in now["encoders"].items() if was.get(n) == ident]


def _finish(s: BatchSlide, p: dict[str, Path], cfg: Config, ctx: _Context) -> Path:
    from .finish import finish_slide

    return finish_slide(s, p, cfg, ctx.expected, ctx.state, forced=ctx.forced)


_STAGES: dict[str, Callable[[BatchSlide, dict[str, Path], Config, _Context], Path]] = {
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
    ctx = _Context(Expected(cfg, HashCache.for_results(results)), stage in forced_stages(results), state)
    if stage == "finish":
        from .finish import sweep_temporaries

        sweep_temporaries(paths_for(results, "-"))
    if stage == "encode" and any(_needs_encoding(paths_for(results, s.slide_id), ctx) for s in todo):
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
            output = step(s, p, cfg, ctx)
        except HistoAlignError as exc:
            log.error("%s %s: %s", stage, s.slide_id, exc)
            rows.append(ManifestRow(s.slide_id, FAILED, "", f"{stage}: {exc}"))
            continue
        except OSError as exc:  # a full disk, a lost mount: name the file
            where = exc.filename or f"the outputs of {s.slide_id!r} under {str(results)!r}"
            what = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            log.error("%s %s: %s while writing %s", stage, s.slide_id, what, where)
            rows.append(ManifestRow(s.slide_id, FAILED, "", f"{stage}: {what} while writing {where}"))
            continue
        except Exception as exc:  # one slide's unexpected failure must not lose the batch
            log.exception("%s %s: unexpected %s", stage, s.slide_id, type(exc).__name__)
            rows.append(
                ManifestRow(s.slide_id, FAILED, "", f"{stage}: unexpected {type(exc).__name__}: {exc}")
            )
            continue
        rows.append(ManifestRow(s.slide_id, OK, str(output)))
    ctx.expected.cache.save()
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


def _needs_encoding(p: dict[str, Path], ctx: _Context) -> bool:
    return ctx.forced or differs(ctx.features_record(p["features"]), _encode_record(p, ctx)) is not None


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
