"""Report texts through an encoder's own (frozen) text tower: L2-normalised embeddings,
cached on disk by encoder weights and text content like prompt embeddings, and a count of
the reports the tower truncates (its tokenizer, its context length)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from .._atomic import atomic_file
from ..features.adapters import LoadedEncoder

__all__ = ["TextBatch", "embed_texts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextBatch:
    """Embeddings [n, D] of ``n`` texts and how many the text tower cut short."""

    emb: NDArray[np.float32]
    n_truncated: int
    max_tokens: int
    context_length: int

    def summary(self) -> dict[str, int]:
        return {
            "n_texts": len(self.emb),
            "n_truncated": self.n_truncated,
            "max_tokens": self.max_tokens,
            "context_length": self.context_length,
        }


def _key(enc: LoadedEncoder, texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return f"{enc.name}-{enc.weights_sha256[-16:]}-{h.hexdigest()[:16]}"


def embed_texts(
    enc: LoadedEncoder,
    texts: Sequence[str],
    *,
    cache_dir: str | Path | None = None,
    batch: int = 256,
    what: str = "reports",
) -> TextBatch:
    """Embed ``texts`` with ``enc``'s text tower (truncated by its own tokenizer), cached in
    ``cache_dir`` by weights and content; logs how many texts were truncated."""
    cached = Path(cache_dir) / f"{_key(enc, texts)}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        z = np.load(cached, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        log.debug("%s: %d %s embeddings from cache %s", enc.name, len(texts), what, cached)
        return TextBatch(z["emb"], meta["n_truncated"], meta["max_tokens"], meta["context_length"])
    counts: list[int] = []
    parts = []
    for i in range(0, len(texts), batch):
        chunk = list(texts[i : i + batch])
        if enc.token_count is not None:
            counts += enc.token_count(chunk)
        parts.append(enc.encode_text(chunk).cpu().numpy().astype(np.float32))
    emb = np.concatenate(parts) if parts else np.zeros((0, enc.entry.embed_dim), np.float32)
    ctx = enc.context_length
    out = TextBatch(emb, sum(c > ctx for c in counts), max(counts, default=0), ctx)
    if out.n_truncated:
        log.warning(
            "%s: %d of %d %s are longer than the text tower's %d tokens (up to %d) and were truncated",
            enc.name,
            out.n_truncated,
            len(texts),
            what,
            ctx,
            out.max_tokens,
        )
    if cached is not None:
        meta = {k: v for k, v in out.summary().items() if k != "n_texts"}
        with atomic_file(cached) as tmp, tmp.open("wb") as fh:
            np.savez(fh, emb=emb, meta=np.array(json.dumps(meta)))
    return out
