"""Many-to-many alignment: similarity of every tile embedding with every prompt of a
class, aggregated over the class's prompts; encoders fused late (an image is only ever
compared with its own encoder's text)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from ..config import Config
from .text import EncoderText, TextEmbeddings

__all__ = ["RULES", "AlignmentSpec", "class_logits", "class_similarity", "fuse_encoders", "fused_logits"]

RULES = ("centroid", "mean", "lse", "topk")


def _normalize(x: NDArray[np.float32]) -> NDArray[np.float32]:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def class_similarity(
    feats: NDArray[np.float32],
    text: EncoderText,
    n_classes: int,
    *,
    rule: str = "centroid",
    temperature: float = 0.05,
    topk: float = 0.1,
) -> NDArray[np.float32]:
    """[N, K] class similarity of L2-normalised tile features ``feats`` [N, D].

    Rules
    -----
    centroid
        cosine with the renormalised mean of the class's prompt embeddings (the standard
        CLIP / CONCH zero-shot classifier).
    mean
        mean cosine over the class's prompts.
    lse
        soft maximum: ``t * log(mean(exp(s / t)))``, between ``mean`` (t large) and max.
    topk
        mean of the highest cosines over the class's prompts, the fraction ``topk`` of
        them (at least one).

    No rule's score grows with a class's prompt count: duplicating every prompt of a
    class leaves its score unchanged (tested), so unbalanced bags are not favoured.
    """
    if rule not in RULES:
        raise ValueError(f"unknown alignment rule {rule!r} (choose {', '.join(RULES)})")
    feats = np.asarray(feats, np.float32)
    out = np.empty((feats.shape[0], n_classes), np.float32)
    if rule == "centroid":
        cents = np.stack([_normalize(text.emb[text.cls == k].mean(axis=0)) for k in range(n_classes)])
        return (feats @ cents.T).astype(np.float32)
    sims = feats @ text.emb.T  # [N, P]
    for k in range(n_classes):
        s = sims[:, text.cls == k]
        if rule == "mean":
            out[:, k] = s.mean(axis=1)
        elif rule == "lse":
            m = s.max(axis=1, keepdims=True)
            out[:, k] = m[:, 0] + temperature * np.log(np.mean(np.exp((s - m) / temperature), axis=1))
        else:
            kk = max(1, int(np.ceil(topk * s.shape[1] - 1e-9)))
            out[:, k] = np.sort(s, axis=1)[:, -kk:].mean(axis=1)
    return out


def class_logits(
    feats: NDArray[np.float32], text: EncoderText, n_classes: int, **kw: object
) -> NDArray[np.float32]:
    """Similarity scaled by the encoder's own logit scale (so encoders are comparable)."""
    return class_similarity(feats, text, n_classes, **kw) * np.float32(text.logit_scale)  # type: ignore[arg-type]


def fuse_encoders(
    logits: Mapping[str, NDArray[np.float32]], weights: Mapping[str, float]
) -> NDArray[np.float32]:
    """Weighted mean of per-encoder logits (weight 1 for encoders not named)."""
    names = sorted(logits)
    w = np.array([float(weights.get(n, 1.0)) for n in names], np.float32)
    if w.sum() <= 0:
        raise ValueError("encoder weights sum to zero")
    stacked = np.stack([logits[n] for n in names])
    return np.tensordot(w / w.sum(), stacked, axes=1).astype(np.float32)


@dataclass(frozen=True)
class AlignmentSpec:
    """How tile features become class logits: the rule over a class's prompts and the
    late-fusion weight of each encoder. Scoring, calibration and patch classification
    all build it with :meth:`from_config`, so they score the same logit."""

    rule: str = "centroid"
    temperature: float = 0.05
    topk: float = 0.1
    encoder_weights: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config) -> AlignmentSpec:
        rule = "centroid" if cfg.protocol == "conch" else cfg.alignment.rule
        return cls(rule, cfg.alignment.temperature, cfg.alignment.topk, dict(cfg.encoder_weights))


def fused_logits(
    features: Mapping[str, NDArray[np.floating]], text: TextEmbeddings, spec: AlignmentSpec
) -> NDArray[np.float32]:
    """Class logits [N, K] of tiles whose features per encoder are ``features[name]``
    ([N, D_name], L2-normalised): each encoder against its own text, scaled by its own
    logit scale, then fused late by ``spec.encoder_weights``."""
    k = len(text.classes)
    per = {
        name: class_logits(
            np.asarray(features[name], np.float32),
            t,
            k,
            rule=spec.rule,
            temperature=spec.temperature,
            topk=spec.topk,
        )
        for name, t in text.encoders.items()
    }
    return fuse_encoders(per, spec.encoder_weights)
