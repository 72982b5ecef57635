"""What every output was made from: one record per output, written, read and compared
here only.

A record names its stage, the stage's computation version (:data:`STAGE_VERSIONS`), the
package version, the hash of the settings that change what the stage writes, and its
inputs: the slide's fingerprint (size plus the hashes of its first and last MB), the
sheet's MPP, the digests of the upstream outputs' own records, the encoders' identities
(registry entry and weights hash), the prompt bag's content hash, a label sheet's content
hash. A record's digest is the hash of the record, so it changes exactly when something
the output was made from changes; downstream records hold their upstream's digest.

An output is *current* when its stored record equals the record the stage would write now;
the batch stages keep current outputs and redo the others, the failure hook lists only
current predictions, and the workflow hands each rule the digest of its inputs as a param
(so Snakemake reruns what changed, whatever the files' times say).

File hashes are cached by ``(device, inode, size, mtime, ctime)`` in
``{results}/cache/hashes.json``: a file rewritten in place, or replaced with its old mtime
(``cp -p``), changes its ctime, which no user can set back. Imports no model framework.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from ._atomic import atomic_file
from .config import STAGE_KEYS, Config

__all__ = [
    "FINGERPRINT_BYTES",
    "NOT_OUTPUT",
    "STAGE_VERSIONS",
    "Expected",
    "HashCache",
    "differs",
    "digest",
    "make_record",
    "output_settings",
    "settings_hash",
]

log = logging.getLogger(__name__)

#: The computation version of each stage. Bump a stage's number in the change that alters
#: what it computes (not how fast): every output of that stage, and of the stages after
#: it, is then redone on the next run; the stages before it keep theirs. One table, so
#: that the workflow reads them without importing the stages (torch and friends).
STAGE_VERSIONS: Mapping[str, int] = {
    "prepare": 1,  # tissue mask + nested tile grids (slides/tissue.py, slides/tiling.py)
    "encode": 1,  # tile pixels -> features (features/encode.py, tile_source.py, adapters.py)
    "embed_prompts": 1,  # prompt bag -> text embeddings (zeroshot/prompts.py, text.py)
    "screen_prompts": 1,  # KEEP's prompt screening (zeroshot/keep.py, stages/screening.py)
    "calibrate": 1,  # cohort logit offsets (zeroshot/calibration.py)
    "score": 2,  # alignment, pooling, fusion (zeroshot/scoring.py, alignment.py, pooling.py)
    "heatmap": 1,  # outputs/heatmaps.py, raster.py
    "geojson": 1,  # outputs/geojson.py
    "summarize": 2,  # predictions.csv, metrics.json (outputs/predictions.py, metrics.py)
    "fit": 2,  # heads and their cross-validation (learn/heads.py, abmil.py, bags.py, splits.py)
    "site_signature": 1,  # stages/sites.py, learn/site_probe.py
}

#: Settings that change how a stage runs, never what it writes: left out of its hash, so
#: changing them redoes nothing (``encode.batch_size`` gives the same store). Where the
#: weights and the bag come from is left out too: their content is among the inputs, as
#: is each configured encoder's identity (so the list of names is left out as well).
NOT_OUTPUT: Mapping[str, tuple[str, ...]] = {
    "encode": (
        "encode.batch_size",
        "encode.readers",
        "encode.prefetch",
        "offline",
        "encoder_registry",
        "encoders",
    ),
    "embed_prompts": ("offline", "encoder_registry", "prompt_bag", "encoders"),
    "train_reports": ("offline", "encoder_registry"),
    "pair_reports": ("offline", "encoder_registry"),
}

#: the fingerprint reads this much at each end of a file
FINGERPRINT_BYTES = 1 << 20


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def digest(obj: Any) -> str:
    """The short hash of a record (or any JSON-able value)."""
    return hashlib.sha256(_canonical(obj)).hexdigest()[:20]


def settings_hash(cfg: Config, stage: str) -> str:
    """The hash of the config keys ``stage`` reads that change what it writes."""
    return digest(output_settings(cfg.raw, stage))


def output_settings(raw: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The config keys ``stage`` reads, less :data:`NOT_OUTPUT` (dotted keys drop one
    sub-key). ``stain`` with ``method: none`` is left out: stores encoded before the
    setting existed are what ``none`` writes, and stay current."""
    drop = NOT_OUTPUT.get(stage, ())
    sub: dict[str, Any] = {}
    for k in sorted(STAGE_KEYS[stage]):
        if k in drop or (k == "stain" and (raw.get(k) or {}).get("method", "none") == "none"):
            continue
        v = raw.get(k)
        inner = [d.split(".", 1)[1] for d in drop if d.startswith(f"{k}.")]
        sub[k] = {a: b for a, b in v.items() if a not in inner} if isinstance(v, Mapping) and inner else v
    return sub


def make_record(
    stage: str, cfg: Config, inputs: Mapping[str, Any], *, settings: str | None = None
) -> dict[str, Any]:
    """The record an output of ``stage`` made now from ``inputs`` carries."""
    return {
        "stage": stage,
        "version": STAGE_VERSIONS[stage],
        "package_version": __version__,
        "settings": settings if settings is not None else settings_hash(cfg, stage),
        "inputs": _plain(inputs),
    }


def _plain(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``inputs`` as JSON reads them back (tuples as lists), so a stored record compares
    equal to a new one; flat inputs (text and numbers) need no round trip."""
    if all(v is None or isinstance(v, (str, int, float)) for v in inputs.values()):
        return {str(k): v for k, v in inputs.items()}
    plain: dict[str, Any] = json.loads(_canonical(dict(inputs)))
    return plain


def differs(stored: Any, expected: Mapping[str, Any]) -> str | None:
    """Why ``stored`` is not current (``None``: it is): the first thing that differs."""
    if not isinstance(stored, Mapping):
        return "no provenance record"
    for key in ("stage", "version", "package_version", "settings"):
        if stored.get(key) != expected[key]:
            return {"settings": "settings changed", "stage": "another stage's record"}.get(
                key, f"{key} {stored.get(key)!r} -> {expected[key]!r}"
            )
    old, new = stored.get("inputs") or {}, expected["inputs"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"input changed: {', '.join(changed)}" if changed else None


class HashCache:
    """File hashes cached by their stat (see the module docstring); ``path`` None keeps
    the cache in memory only."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, list[Any]] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(raw, dict):
                    self._entries = {k: v for k, v in raw.items() if isinstance(v, list) and len(v) == 6}
            except (OSError, ValueError):  # a damaged cache is rebuilt, never trusted
                log.warning("hash cache %s is unreadable; rebuilding it", self.path)

    @classmethod
    def for_results(cls, results: str | Path) -> HashCache:
        return cls(Path(results) / "cache" / "hashes.json")

    def _cached(self, kind: str, path: str | Path, compute: Any) -> str:
        """By the file itself (device and inode, as ``stat`` follows links): a renamed or
        linked file is not read again; any rewrite changes its size, mtime or ctime."""
        p = os.path.abspath(path)
        st = os.stat(p)
        key = f"{kind}:{st.st_dev}:{st.st_ino}"
        stat = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        hit = self._entries.get(key)
        if hit is not None and hit[:5] == stat:
            return str(hit[5])
        value: str = compute(p, st.st_size)
        self._entries[key] = [*stat, value]
        self._dirty = True
        return value

    def fingerprint(self, path: str | Path) -> str:
        """``{size}-{sha256 of the first and last MB}``: cheap for any slide size, and
        different for another scan of the same slide."""

        def compute(p: str, size: int) -> str:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                h.update(fh.read(FINGERPRINT_BYTES))
                if size > FINGERPRINT_BYTES:
                    fh.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                    h.update(fh.read(FINGERPRINT_BYTES))
            return f"{size}-{h.hexdigest()[:24]}"

        return self._cached("fp", path, compute)

    def sha256(self, path: str | Path) -> str:
        """The whole file's sha256 (weights, sheets, bags: what must match exactly)."""

        def compute(p: str, size: int) -> str:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            return h.hexdigest()

        return self._cached("sha", path, compute)

    def save(self) -> None:
        """Write the cache back when it learned something (atomically; a lost race only
        costs a hash next time)."""
        if self.path is None or not self._dirty:
            return
        try:
            with atomic_file(self.path) as tmp:
                tmp.write_text(json.dumps(self._entries), encoding="utf-8")
            self._dirty = False
        except OSError as exc:  # a read-only results folder: the hashes are recomputed
            log.debug("hash cache %s not written: %s", self.path, exc)


class Expected:
    """The records each stage would write now, for one configuration and results folder:
    what keep checks, the failure hook and the workflow compare stored records with.
    Encoder identities and the text record are worked out once (on first use)."""

    def __init__(self, cfg: Config, cache: HashCache) -> None:
        self.cfg = cfg
        self.cache = cache
        self._identities: Mapping[str, Mapping[str, str]] | None = None
        self._offline = True
        self._settings: dict[str, str] = {}

    def _record(
        self, stage: str, inputs: Mapping[str, Any], *, settings: str | None = None
    ) -> dict[str, Any]:
        """A record of ``stage`` with its settings' hash worked out once per run."""
        if settings is None:
            settings = self._settings.get(stage)
            if settings is None:
                settings = self._settings[stage] = settings_hash(self.cfg, stage)
        return make_record(stage, self.cfg, inputs, settings=settings)

    def identities(self, *, offline: bool = True) -> Mapping[str, Mapping[str, str]]:
        """Each configured encoder's identity; ``offline=False`` lets a job resolve
        weights as its encoders will (a download, where the config allows one)."""
        if self._identities is None or (self._offline and not offline):
            from .features.identity import encoder_identities

            self._identities = encoder_identities(self.cfg, self.cache, offline=offline)
            self._offline = offline
        return self._identities

    def prepare(self, slide_path: str | Path, sheet_mpp: float | None) -> dict[str, Any]:
        """Tissue and tiles: the slide's fingerprint and the sheet's MPP (the MPP used is
        the sheet's, else the slide's own metadata, else ``mpp_override``: each covered)."""
        inputs = {"slide": self.cache.fingerprint(slide_path), "sheet_mpp": sheet_mpp}
        return self._record("prepare", inputs)

    def encode(self, tiles_digest: str, *, offline: bool = True) -> dict[str, Any]:
        """Features: the tiles, each encoder's identity, and a stain reference image's
        content when one is used (an image edited in place re-encodes)."""
        inputs: dict[str, Any] = {"tiles": tiles_digest, "encoders": self.identities(offline=offline)}
        st = self.cfg.stain
        if st.method != "none" and st.reference != "builtin":
            inputs["stain_reference"] = (
                self.cache.sha256(st.reference) if Path(st.reference).is_file() else None
            )
        return self._record("encode", inputs)

    def text(self, *, offline: bool = True) -> dict[str, Any]:
        """Text embeddings: every expanded prompt of the bag (templates included) and the
        encoders' identities."""
        from .zeroshot.prompts import load_bag

        bag = load_bag(self.cfg.prompt_bag)
        texts, cls, groups = bag.texts(protocol=self.cfg.protocol)
        prompts = digest(
            [
                bag.name,
                bag.class_names,
                bag.colors(),
                texts,
                list(cls),
                groups,
                bag.ordered,
                bag.other_classes,
            ]
        )
        return self._record(
            "embed_prompts", {"prompts": prompts, "encoders": self.identities(offline=offline)}
        )

    def score(
        self, features: str, text: str, calibration: str | None, screening: str | None = None
    ) -> dict[str, Any]:
        inputs = {"features": features, "text": text, "calibration": calibration}
        return self._record("score", inputs | ({"screening": screening} if screening else {}))

    def heatmap(
        self, score: Mapping[str, Any], slide_path: str | Path, attention: str | None
    ) -> dict[str, Any]:
        inputs = {"score": digest(score), "slide": self.cache.fingerprint(slide_path), "attention": attention}
        return self._record("heatmap", inputs)

    def geojson(self, score: Mapping[str, Any], tiles: str, attention: str | None) -> dict[str, Any]:
        inputs = {"score": digest(score), "tiles": tiles, "attention": attention}
        settings = self._settings.get("geojson") or digest(output_settings(self.cfg.raw, "export_geojson"))
        self._settings["geojson"] = settings
        return self._record("geojson", inputs, settings=settings)

    def file(self, path: str | Path | None) -> str | None:
        """A small input's content hash (a calibration, an attention table, a sheet)."""
        return None if path is None else self.cache.sha256(path)
