"""KEEP's label-free prompt screening over the run's slides (``prompt_screening.json``),
the cohort step of ``protocol: keep`` (:mod:`histoalign_wsi.zeroshot.keep`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import ConfigError

__all__ = ["run_screen_prompts"]

log = logging.getLogger(__name__)


def run_screen_prompts(stores: Sequence[Path], text_path: Path, out: Path, cfg: Config) -> Path:
    """Score every prompt set of the bag on the stores' tiles at ``keep.scale_mpp`` and
    keep the ``keep.top_n`` best; one store is read at a time (memory does not grow with
    the cohort). Transductive and label-free, as KEEP's screening is."""
    from ..features.store import open_store
    from ..provenance import digest, make_record
    from ..slides.tiling import scale_name
    from ..zeroshot.keep import Screening, prompt_sets, screen
    from ..zeroshot.text import load_text

    if cfg.protocol != "keep":
        raise ConfigError(f"screen-prompts is KEEP's step: set protocol: keep (it is {cfg.protocol!r})")
    text = load_text(text_path)
    if text.protocol != "keep" or len(text.encoders) != 1:
        raise ConfigError(
            f"{str(text_path)!r} holds no keep-protocol embeddings of one encoder; re-run embed-prompts"
        )
    name, t = next(iter(text.encoders.items()))
    k = cfg.keep
    used = [i for i, c in enumerate(text.classes) if k.other_classes or c not in text.other]
    sets = prompt_sets(t.cls, used, max_sets=k.max_sets, seed=k.seed)
    s = scale_name(k.scale_mpp)

    def features() -> object:
        for p in stores:
            st = open_store(p)
            n = st.features_array(s, name).shape[0]
            yield st.features(s, name) if n else np.zeros((0, t.emb.shape[1]), np.float32)

    scores, selected = screen(features(), t.emb, sets, top_n=k.top_n)  # type: ignore[arg-type]
    made_from = sorted(digest(open_store(p).attrs.get("provenance")) for p in stores)
    record = make_record(
        "screen_prompts", cfg, {"features": digest(made_from), "text": digest(text.provenance)}
    )
    log.info("screened %d prompt sets on %d slides; kept %d", len(sets), len(stores), len(selected))
    return Screening(
        text.bag_hash,
        name,
        t.weights_sha256,
        tuple(text.classes[i] for i in used),
        sets,
        scores,
        selected,
        len(stores),
    ).write(out, provenance=record)
