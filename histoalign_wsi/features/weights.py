"""Finding model weights (local path, local caches, download when allowed) and loading
them safely (safetensors, or ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WeightsError
from .registry import EncoderEntry

if TYPE_CHECKING:
    import torch

__all__ = ["ResolvedWeights", "WeightsNotFound", "file_sha256", "load_state_dict", "resolve_weights"]

log = logging.getLogger(__name__)

#: file names a weights folder may hold, best first
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
)
CONFIG_FILES = ("open_clip_config.json", "config.json")


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path  # a file, or a folder (hf-hub style / HF CLIPModel)
    source: str  # "path", "cache", "download"
    sha256: str

    @property
    def weight_file(self) -> Path:
        if self.path.is_file():
            return self.path
        for name in WEIGHT_FILES:
            if (self.path / name).is_file():
                return self.path / name
        raise WeightsError(f"no weights file ({', '.join(WEIGHT_FILES)}) in {str(self.path)!r}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _folder_weight(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _hf_repo(entry: EncoderEntry) -> str | None:
    if "hf_hub" in entry.weights:
        return entry.weights["hf_hub"].removeprefix("hf-hub:").strip("/")
    if "pretrained" in entry.weights and entry.architecture:
        from open_clip.pretrained import get_pretrained_cfg

        cfg = get_pretrained_cfg(entry.architecture, entry.weights["pretrained"])
        hub = cfg.get("hf_hub") if cfg else None
        if not hub:
            raise WeightsError(
                f"encoder {entry.name!r}: open_clip knows no pretrained tag "
                f"{entry.weights['pretrained']!r} for {entry.architecture!r}"
            )
        return str(hub).strip("/")
    return None


class WeightsNotFound(WeightsError):
    """No weights anywhere looked; ``looked`` lists the places."""

    def __init__(self, message: str, looked: list[str]) -> None:
        super().__init__(message)
        self.looked = looked


def resolve_weights(entry: EncoderEntry, *, offline: bool, hash_file: bool = True) -> ResolvedWeights:
    """Local path, else the local Hugging Face cache, else a download (only if allowed).
    ``hash_file=False`` skips the sha256 (listing the registry must not read gigabytes).

    Raises
    ------
    WeightsNotFound
        Naming the encoder, every place looked and how to supply the weights.
    """

    def found(path: Path, source: str, weight_file: Path) -> ResolvedWeights:
        return ResolvedWeights(path, source, file_sha256(weight_file) if hash_file else "")

    looked: list[str] = []
    if "path" in entry.weights:
        p = Path(os.path.expanduser(entry.weights["path"]))
        looked.append(f"path {str(p)!r}")
        if p.is_file() or (p.is_dir() and _folder_weight(p)):
            target = p if p.is_file() else _folder_weight(p)
            assert target is not None
            return found(p, "path", target)
    repo = _hf_repo(entry)
    if repo is not None:
        from huggingface_hub import constants, snapshot_download

        looked.append(f"Hugging Face cache {constants.HF_HUB_CACHE!r} (repo {repo!r})")
        try:
            folder = Path(snapshot_download(repo, local_files_only=True))
            if _folder_weight(folder):
                w = _folder_weight(folder)
                assert w is not None
                return found(folder, "cache", w)
        except Exception:  # not in the cache
            pass
        if not offline:
            try:
                folder = Path(snapshot_download(repo))
            except Exception as exc:
                raise WeightsError(f"encoder {entry.name!r}: download of {repo!r} failed: {exc}") from exc
            w = _folder_weight(folder)
            if w is not None:
                return found(folder, "download", w)
            looked.append(f"download of {repo!r} (no weights file in it)")
        else:
            looked.append("download (not tried: offline is true)")
    raise WeightsNotFound(
        f"weights for encoder {entry.name!r} not found; looked in: {'; '.join(looked) or 'nowhere'}. "
        "Supply them by setting weights.path to a local checkpoint file or folder in an "
        "encoder_registry file, by placing the model in the Hugging Face cache "
        "(huggingface-cli download <repo>), or by setting offline: false to allow a download.",
        looked,
    )


def load_state_dict(path: Path, *, encoder: str) -> dict[str, torch.Tensor]:
    """Load a checkpoint without unpickling arbitrary objects.

    Raises
    ------
    WeightsError
        Corrupt files, and checkpoints that need arbitrary unpickling (refused).
    """
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"encoder {encoder!r}: checkpoint {str(path)!r} refused: it needs arbitrary "
            f"unpickling, which could run code ({str(exc).splitlines()[0][:200]}). "
            "Convert it to safetensors or a plain state dict."
        ) from exc
    except Exception as exc:
        raise WeightsError(
            f"encoder {encoder!r}: checkpoint {str(path)!r} is corrupt or unreadable: {exc}"
        ) from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"encoder {encoder!r}: checkpoint {str(path)!r} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}
