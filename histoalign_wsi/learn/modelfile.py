"""A saved model folder: ``model.safetensors`` (tensors only, never a pickle) and
``config.json`` (what the model is, plus the SHA-256 of the tensor file). Loading checks
the checksum and that every tensor is finite, so a damaged or diverged model is refused
in one line instead of predicting NaN."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError

__all__ = ["CONFIG", "WEIGHTS", "read_config", "read_tensors", "write_model"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_SUM = "weights_sha256"


def write_model(
    tmp: Path, tensors: Mapping[str, NDArray[Any]], meta: Mapping[str, Any], *, what: str
) -> None:
    """Write the two files into ``tmp`` (a folder that :func:`atomic_dir` will publish).
    Refuses non-finite tensors: a model that diverged is not saved as if it were fine."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for k, v in arrays.items():
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise ConfigError(f"{what}: tensor {k!r} holds non-finite values (training diverged); not saved")
    blob = save(arrays)
    (tmp / WEIGHTS).write_bytes(blob)
    info = {**meta, _SUM: hashlib.sha256(blob).hexdigest()}
    (tmp / CONFIG).write_text(
        json.dumps(info, indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8"
    )


def read_config(folder: Path, *, what: str) -> dict[str, Any]:
    """``config.json`` of a saved model, refused in one line when missing or broken."""
    p = folder / CONFIG
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{str(folder)!r} is not a saved {what} (no {CONFIG})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {str(folder)!r}: {CONFIG} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ConfigError(f"{what} {str(folder)!r}: {CONFIG} is not a JSON object")
    return meta


def read_tensors(folder: Path, meta: Mapping[str, Any], *, what: str) -> dict[str, NDArray[Any]]:
    """The tensors of ``folder/model.safetensors`` after checking them against the
    checksum in ``meta`` and for finiteness."""
    from safetensors.numpy import load

    p = folder / WEIGHTS
    try:
        blob = p.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {str(folder)!r}: {WEIGHTS} is missing") from exc
    want = meta.get(_SUM)
    if not isinstance(want, str):
        raise ConfigError(
            f"{what} {str(folder)!r}: {CONFIG} has no {_SUM} (saved by an older version, or edited); "
            "train it again"
        )
    if hashlib.sha256(blob).hexdigest() != want:
        raise ConfigError(
            f"{what} {str(folder)!r}: {WEIGHTS} does not match its checksum (damaged or altered)"
        )
    try:
        arrays = load(blob)
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise ConfigError(
            f"{what} {str(folder)!r}: {WEIGHTS} is not a valid safetensors file ({exc}); pickles are refused"
        ) from exc
    for k, v in arrays.items():
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise ConfigError(f"{what} {str(folder)!r}: tensor {k!r} holds non-finite values")
    return arrays
