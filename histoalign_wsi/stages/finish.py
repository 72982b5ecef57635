"""One slide's finish step in a batch: scores (prediction JSON and tile scores), heatmaps
and QuPath GeoJSON, each kept when its provenance record is current and redone when not.

The prediction JSON is the commit point: it is removed before the scores are redone,
written with the score's record once the scores are complete, and rewritten with the
heatmaps' and GeoJSON's records once those are; so a kill at any point leaves nothing that
looks finished, and the next run redoes only what is missing. Changing ``heatmap.format``
redraws the heatmaps and touches nothing else."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._atomic import remove_stale_in
from ..batches import BatchSlide
from ..config import Config
from ..errors import StoreError
from ..provenance import Expected, differs, digest

__all__ = ["finish_slide", "sweep_temporaries"]

log = logging.getLogger(__name__)

#: the per-slide folders the finish step writes into
_FOLDERS = ("prediction", "tile_scores", "geojson")


def sweep_temporaries(paths: Mapping[str, Path]) -> None:
    """Remove what killed writers left in the finish step's folders (once per batch)."""
    for key in _FOLDERS:
        remove_stale_in(paths[key].parent)
    remove_stale_in(paths["heatmaps"].parent)


def _shared(state: dict[str, Any], cfg: Config) -> tuple[Any, Any, Any]:
    """The text embeddings, calibration offsets and KEEP's screened prompt sets, read once
    per batch."""
    if "_text" not in state:
        from ..zeroshot.calibration import CalibrationOffsets
        from ..zeroshot.keep import Screening
        from ..zeroshot.text import load_text

        state["_text"] = load_text(state["text"])
        cal, scr = state.get("calibration"), state.get("screening")
        state["_calibration"] = CalibrationOffsets.read(cal) if cal else None
        state["_screening"] = Screening.read(scr) if scr else None
    return state["_text"], state["_calibration"], state["_screening"]


def _old(path: Path) -> Any:
    from ..zeroshot.prediction import Prediction

    try:
        return Prediction.read(path) if path.is_file() else None
    except StoreError:
        return None


def _current(
    what: str, sid: str, old: Mapping[str, Any], key: str, rec: dict[str, Any], forced: bool
) -> bool:
    why = "recompute asked (--forcerun/--forceall)" if forced else differs(old.get(key), rec)
    if why is None:
        log.info("%s: %s current, kept", sid, what)
        return True
    if old:
        log.info("%s: %s redone: %s", sid, what, why)
    return False


def finish_slide(
    s: BatchSlide,
    p: Mapping[str, Path],
    cfg: Config,
    expected: Expected,
    state: dict[str, Any],
    *,
    forced: bool,
) -> Path:
    """Score, draw and export one slide, keeping each part that is current."""
    from ..features.store import open_store
    from ..zeroshot import tile_scores
    from ..zeroshot.scoring import score_store
    from .outputs import run_export_geojson, run_heatmap

    text, calibration, screening = _shared(state, cfg)
    store = open_store(p["features"])
    made_from = store.attrs.get("provenance")
    if made_from is None:
        raise StoreError(f"feature store {str(p['features'])!r} records no provenance: rerun encode")
    if text.provenance is None:
        raise StoreError(f"text embeddings {str(state['text'])!r} record no provenance: rerun embed_prompts")
    attention = p["attention"] if state.get("attention") and p["attention"].is_file() else None
    att = expected.file(attention)
    rec_score = expected.score(
        digest(made_from),
        digest(text.provenance),
        expected.file(state.get("calibration")),
        expected.file(state.get("screening")),
    )
    rec_heat = expected.heatmap(rec_score, s.path, att)
    rec_geo = expected.geojson(rec_score, digest(open_store(p["tiles"]).attrs.get("provenance")), att)

    old = _old(p["prediction"])
    done: Mapping[str, Any] = old.provenance if old is not None else {}
    if _current("scores are", s.slide_id, done, "score", rec_score, forced) and p["tile_scores"].is_file():
        pred = old
    else:
        p["prediction"].unlink(missing_ok=True)  # nothing stale looks finished meanwhile
        done = {}
        scores = score_store(store, text, cfg, calibration=calibration, screening=screening)
        tile_scores.write(scores.tiles, p["tile_scores"])
        pred = dataclasses.replace(scores.prediction, slide_path=str(s.path), provenance={"score": rec_score})
        pred.write(p["prediction"])
    if not (
        _current("heatmaps are", s.slide_id, done, "heatmap", rec_heat, forced) and p["heatmaps"].is_dir()
    ):
        run_heatmap(p["tile_scores"], p["prediction"], Path(s.path), p["heatmaps"], cfg, attention=attention)
    if not (_current("GeoJSON is", s.slide_id, done, "geojson", rec_geo, forced) and p["geojson"].is_file()):
        run_export_geojson(
            p["tile_scores"],
            p["prediction"],
            p["geojson"],
            cfg,
            store=p["tiles"],
            tissue=p["tissue_meta"],
            attention=attention,
            provenance=rec_geo,
        )
    final = dataclasses.replace(
        pred, slide_path=str(s.path), provenance={"score": rec_score, "heatmap": rec_heat, "geojson": rec_geo}
    )
    if old is None or final.to_dict() != old.to_dict():
        final.write(p["prediction"])
    return p["prediction"]
