"""Slide-report contrastive training: the scale-aware attention MIL of
:mod:`.abmil` (its output layer projecting into the text space of the chosen encoder) maps
all of a slide's tiles, across scales, to one L2-normalised vector, trained against that
slide's frozen report embedding with a symmetric InfoNCE loss and a learnable temperature
(CLIP). ``scale_embedding=False`` is the ablation, trained the same way on the same split
and seed. Saved as safetensors + JSON."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from .._atomic import atomic_dir
from ..errors import ConfigError
from .abmil import ABMILConfig, ScaleAwareABMIL, prefetched
from .bags import Bag, BagSource
from .modelfile import read_config, read_tensors, write_model

__all__ = ["ContrastiveSettings", "SlideReportModel", "embed_slides", "info_nce", "train_contrastive"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContrastiveSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    hidden: int
    temperature: float  # initial; learned
    seed: int


class SlideReportModel(nn.Module):
    """The MIL slide encoder plus the learnable log inverse temperature of the loss."""

    def __init__(self, cfg: ABMILConfig, temperature: float = 0.07) -> None:
        super().__init__()
        self.mil = ScaleAwareABMIL(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def embed(self, bag: Bag) -> torch.Tensor:
        """The slide's unit vector in the text space [D_text]."""
        z, _ = self.mil(torch.from_numpy(bag.features), torch.from_numpy(bag.scale))
        return F.normalize(z, dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def save(self, folder: str | Path, meta: Mapping[str, Any]) -> Path:
        info = {**meta, "abmil": self.mil.cfg.to_dict(), "logit_scale": float(self.scale().detach())}
        tensors = {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}
        with atomic_dir(folder) as tmp:
            write_model(tmp, tensors, info, what="slide-report model")
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> tuple[SlideReportModel, dict[str, Any]]:
        """A saved model, checked against its checksum and for finite weights."""
        f, what = Path(folder), "slide-report model"
        meta = read_config(f, what=what)
        try:
            model = cls(ABMILConfig(**meta["abmil"]))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{what} {str(f)!r}: config.json has no valid 'abmil' ({exc})") from exc
        arrays = read_tensors(f, meta, what=what)
        try:
            model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        except RuntimeError as exc:
            msg = " ".join(str(exc).split())[:300]
            raise ConfigError(f"{what} {str(f)!r}: weights do not fit config.json ({msg})") from exc
        return model.eval(), meta


def info_nce(z: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows: slide i's positive is report i, the other reports
    of the batch are its negatives, and the same for each report."""
    logits = scale * z @ t.T
    target = torch.arange(len(z))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _val_loss(model: SlideReportModel, source: BagSource, ids: Sequence[str], text: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        z = torch.stack([model.embed(source.bag(s)) for s in ids])
        return float(info_nce(z, text, model.scale()))


def train_contrastive(
    source: BagSource,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    text: Mapping[str, NDArray[np.float32]],
    settings: ContrastiveSettings,
    *,
    scale_embedding: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[SlideReportModel, dict[str, Any]]:
    """Train on ``train_ids`` (report embedding ``text[slide]``), early-stopped on the
    InfoNCE loss of ``val_ids``; returns the best model and its history. ``progress(1)``
    is called after each epoch."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    dim = len(next(iter(text.values())))
    cfg = ABMILConfig(
        in_dim=source.dim,
        n_classes=dim,
        n_scales=len(source.scale_names),
        hidden=settings.hidden,
        scale_embedding=scale_embedding,
    )
    model = SlideReportModel(cfg, settings.temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    tv = torch.from_numpy(np.stack([text[s] for s in val_ids]))
    bs = max(2, min(settings.batch_size, len(train_ids)))
    best, best_state, since = float("inf"), copy.deepcopy(model.state_dict()), 0
    hist: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "temperature": []}
    for _ in range(settings.epochs):
        order = [train_ids[i] for i in rng.permutation(len(train_ids))]
        losses = []
        model.train()
        bags = prefetched(source, order)
        for i in range(0, len(order), bs):
            batch = [next(bags) for _ in order[i : i + bs]]
            if len(batch) < 2:  # InfoNCE needs a negative: a lone last slide waits for the next epoch
                continue
            z = torch.stack([model.embed(b) for b in batch])
            t = torch.from_numpy(np.stack([text[b.slide_id] for b in batch]))
            loss = info_nce(z, t, model.scale())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        v = _val_loss(model, source, val_ids, tv)
        hist["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        hist["val_loss"].append(v)
        hist["temperature"].append(1.0 / float(model.scale().detach()))
        if progress is not None:
            progress(1)
        if v < best - 1e-4:
            best, best_state, since = v, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if since >= settings.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    log.info(
        "slide-report model (scale embedding %s): %d epochs, best val InfoNCE %.4f (chance %.4f)",
        scale_embedding,
        len(hist["val_loss"]),
        best,
        math.log(len(val_ids)),
    )
    return model, {"epochs": len(hist["val_loss"]), "best_val_loss": best, **hist}


@torch.no_grad()
def embed_slides(model: SlideReportModel, source: BagSource, ids: Sequence[str]) -> NDArray[np.float32]:
    """Unit slide embeddings [n, D_text] in ``ids`` order."""
    model.eval()
    return np.stack([model.embed(source.bag(s)).numpy() for s in ids]).astype(np.float32)


def settings_dict(s: ContrastiveSettings) -> dict[str, Any]:
    return asdict(s)
