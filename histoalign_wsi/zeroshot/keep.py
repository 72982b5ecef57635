"""KEEP's slide-level zero-shot protocol (Zhou et al., "A Knowledge-enhanced Pathology
Vision-language Foundation Model for Cancer Diagnosis", arXiv 2412.13126; its released
``WSI_evaluation`` code), part by part, each with a switch (``keep:`` in the config):

- **prompt sets and screening** (``screening``): a prompt set is one name per class (the
  bag's names with KEEP's template ``"{}."``); each set is a classifier (its unit text
  embeddings). Without labels, every set is scored on the run's slides by KEEP's rank
  score, the mean over tiles of ``(top1 - top2) - |top1 + top2 - 1|`` of the cosine
  logits, averaged over slides; the ``top_n`` best are summed and each class column
  renormalised. Off: every set is summed.
- **the normal class** (``other_classes``): the bag's "other tissue" classes take part in
  every tile's decision and never in the slide's. Off: they are left out of the tiles too.
- **neighbour smoothing** (``smoothing``): a tile's logits are the mean of its own and of
  the tiles one step up, left and up-left (KEEP's ``refine_seg``); its decision is their
  argmax.
- **the vote** (``vote``): the slide is the decision class with the largest share of tile
  decisions. Off: the mean tile probability decides.

The cohort step (screening) is written, read and checked here (``prompt_screening.json``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._atomic import atomic_file
from ..errors import StoreError

__all__ = ["SCHEMA", "Screening", "classifier", "prompt_sets", "rank_score", "screen", "smooth", "vote"]

SCHEMA = "histoalign-keep-screening/1"
#: KEEP's prompt template: the class name and a full stop
TEMPLATE = "{}."


def prompt_sets(
    cls: NDArray[np.int32], classes: Sequence[int], *, max_sets: int, seed: int
) -> list[list[int]]:
    """Every combination of one prompt per class (prompt indices, in ``classes`` order),
    or ``max_sets`` of them drawn without replacement with ``seed`` when there are more."""
    per = [np.flatnonzero(cls == k).tolist() for k in classes]
    total = int(np.prod([len(p) for p in per]))
    if total <= max_sets:
        return [list(c) for c in itertools.product(*per)]
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(total, size=max_sets, replace=False).tolist())
    out = []
    for flat in picked:  # the mixed-radix digits of a combination's index
        combo = []
        for p in reversed(per):
            flat, r = divmod(flat, len(p))
            combo.append(p[r])
        out.append(combo[::-1])
    return out


def rank_score(logits: NDArray[np.floating]) -> NDArray[np.float64]:
    """KEEP's label-free score of classifiers: ``logits`` [N tiles, J sets, K] -> [J]."""
    top = -np.sort(-np.asarray(logits, np.float64), axis=-1)[..., :2]
    return ((top[..., 0] - top[..., 1]) - np.abs(top[..., 0] + top[..., 1] - 1.0)).mean(axis=0)


def classifier(emb: NDArray[np.float32], sets: Sequence[Sequence[int]]) -> NDArray[np.float32]:
    """The sum of the sets' classifiers, each class column renormalised: [K, D]."""
    c = np.zeros((len(sets[0]), emb.shape[1]), np.float64)
    for s in sets:
        c += emb[list(s)]
    return (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)


def smooth(logits: NDArray[np.float32], coords: NDArray[np.int32], step: int) -> NDArray[np.float32]:
    """Each tile's logits averaged with those of the tiles at (x-step, y-step), (x, y-step)
    and (x-step, y) that exist (KEEP's ``refine_seg`` window)."""
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(coords.tolist())}
    out = np.empty_like(logits)
    for i, (x, y) in enumerate(coords.tolist()):
        rows = [i] + [
            j
            for dx, dy in ((-step, -step), (0, -step), (-step, 0))
            if (j := index.get((x + dx, y + dy))) is not None
        ]
        out[i] = logits[rows].mean(axis=0)
    return out


def vote(decisions: NDArray[np.intp], k: int, decision: Sequence[int]) -> tuple[int, NDArray[np.float64]]:
    """(the winning decision class's index into ``decision``, each decision class's share of
    the tiles). Ties go to the first class, as KEEP's ``max``."""
    share = np.bincount(decisions, minlength=k).astype(np.float64) / max(len(decisions), 1)
    sub = share[list(decision)]
    return int(np.argmax(sub)), sub


@dataclass(frozen=True)
class Screening:
    """The screened prompt sets of one encoder and what they were made with."""

    bag_hash: str
    encoder: str
    weights_sha256: str
    classes: tuple[str, ...]
    sets: list[list[int]]
    scores: list[float]
    selected: list[int]
    n_slides: int

    def check(self, bag_hash: str, encoder: str, weights: str, classes: Sequence[str]) -> None:
        want = (bag_hash, encoder, weights, tuple(classes))
        have = (self.bag_hash, self.encoder, self.weights_sha256, self.classes)
        if want != have:
            raise StoreError(
                f"prompt screening was made for {have} but scoring uses {want}; re-run 'screen-prompts'"
            )

    def write(self, path: str | Path, *, provenance: Any = None) -> Path:
        d = {"schema": SCHEMA, **self.__dict__, "classes": list(self.classes), "provenance": provenance}
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(d, indent=1, allow_nan=False), encoding="utf-8")
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> Screening:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"prompt screening {str(path)!r} cannot be read ({exc}); re-run 'screen-prompts'"
            ) from exc
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise StoreError(
                f"prompt screening {str(path)!r} is not a {SCHEMA} file; re-run 'screen-prompts'"
            )
        return cls(
            d["bag_hash"],
            d["encoder"],
            d["weights_sha256"],
            tuple(d["classes"]),
            d["sets"],
            d["scores"],
            d["selected"],
            int(d["n_slides"]),
        )


def screen(
    features: Sequence[NDArray[np.float32]],
    emb: NDArray[np.float32],
    sets: list[list[int]],
    *,
    top_n: int,
    chunk: int = 4096,
) -> tuple[list[float], list[int]]:
    """Each set's rank score averaged over slides (``features``: each slide's unit tile
    features at the protocol's scale), and the ``top_n`` best sets (best first; ties by
    set order)."""
    idx = np.asarray(sets, np.intp)  # [J, K]
    total = np.zeros(len(sets), np.float64)
    used = 0
    for f in features:
        if not len(f):
            continue
        per = np.zeros(len(sets), np.float64)
        for i in range(0, len(f), chunk):
            sims = f[i : i + chunk] @ emb.T  # [n, M]
            per += rank_score(sims[:, idx]) * (min(chunk, len(f) - i))
        total += per / len(f)
        used += 1
    scores = total / max(used, 1)
    order = sorted(range(len(sets)), key=lambda j: (-scores[j], j))
    return scores.tolist(), order[:top_n]
