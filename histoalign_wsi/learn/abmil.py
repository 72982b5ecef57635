"""The scale-aware attention-MIL slide encoder: gated attention (ABMIL, Ilse et al. 2018)
over the tiles of every scale at once, each tile's projected feature plus a learnable
embedding of its scale; trained with cross-entropy, early stopping on an inner split,
fixed seeds. ``scale_embedding=False`` is the ablation, trained the same way."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from .bags import Bag, BagSource

__all__ = ["ABMILConfig", "ScaleAwareABMIL", "predict_bag", "prefetched", "train_abmil", "train_epoch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ABMILConfig:
    in_dim: int
    n_classes: int
    n_scales: int
    hidden: int = 64
    dropout: float = 0.1
    scale_embedding: bool = True

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class ScaleAwareABMIL(nn.Module):
    """Bag of tiles (features [N, D], scale index [N]) -> class logits [K], attention [N]."""

    def __init__(self, cfg: ABMILConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        # the layers both variants share are created first, so that with one seed the
        # ablation starts from the same weights and differs only by the scale embedding
        self.proj = nn.Sequential(nn.Linear(cfg.in_dim, h), nn.GELU(), nn.Dropout(cfg.dropout))
        self.att_v = nn.Linear(h, h // 2)
        self.att_u = nn.Linear(h, h // 2)
        self.att_w = nn.Linear(h // 2, 1)
        self.head = nn.Linear(h, cfg.n_classes)
        self.scale_emb = nn.Embedding(cfg.n_scales, h) if cfg.scale_embedding else None

    def embed(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slide embedding [H] and the attention over tiles [N] (sums to 1)."""
        h = self.proj(x)
        if self.scale_emb is not None:
            h = h + self.scale_emb(scale)
        a = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))).squeeze(-1)
        a = torch.softmax(a, dim=0)
        return (a[:, None] * h).sum(dim=0), a

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, a = self.embed(x, scale)
        return self.head(z), a


def _tensors(bag: Bag) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(bag.features), torch.from_numpy(bag.scale)


def _inner_split(
    y: NDArray[np.int64],
    fraction: float,
    rng: np.random.Generator,
    groups: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Stratified by group (patient when given, else slide): about ``fraction`` of each
    class's groups held out for early stopping (at least one of a class with two or more
    groups), so no patient is on both sides."""
    g = np.asarray(groups) if groups is not None else np.arange(len(y))
    held: set[object] = set()
    for k in np.unique(y):
        own = [x for x in rng.permutation(np.unique(g[y == k])).tolist() if x not in held]
        n_groups = len(np.unique(g[y == k]))
        if n_groups >= 2:
            held.update(own[: max(1, round(fraction * n_groups))])
    val = [i for i in range(len(y)) if g[i] in held]
    train = [i for i in range(len(y)) if g[i] not in held]
    if not train:  # too few groups to hold any out
        return list(range(len(y))), []
    return train, val


def train_abmil(
    source: BagSource,
    slide_ids: Sequence[str],
    y: Sequence[int],
    cfg: ABMILConfig,
    *,
    seed: int = 0,
    epochs: int = 60,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    patience: int = 10,
    val_fraction: float = 0.2,
    groups: Sequence[str] | None = None,
) -> tuple[ScaleAwareABMIL, dict[str, object]]:
    """Train on ``slide_ids`` with labels ``y``; returns the model at its best inner-split
    loss and a small history. The early-stopping split keeps ``groups`` (patients, one
    per slide) together. Bags are read from the stores each epoch (streamed)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    yy = np.asarray(y, np.int64)
    tr, va = _inner_split(yy, val_fraction, rng, groups)
    model = ScaleAwareABMIL(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    best, best_state, since, losses = float("inf"), copy.deepcopy(model.state_dict()), 0, []
    for _ in range(epochs):
        order = rng.permutation(tr).tolist()
        train_epoch(model, opt, source, [slide_ids[i] for i in order], yy[order])
        val_ids = va or tr
        model.eval()
        with torch.no_grad():
            vl = [
                float(loss_fn(model(*_tensors(b))[0][None], torch.tensor([yy[i]])))
                for i in val_ids
                if len((b := source.bag(slide_ids[i])).features)
            ]
        v = float(np.mean(vl)) if vl else 0.0
        losses.append(v)
        if v < best - 1e-4:
            best, best_state, since = v, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    log.info(
        "abmil (scale embedding %s): %d epochs, best inner loss %.4f", cfg.scale_embedding, len(losses), best
    )
    return model, {"epochs": len(losses), "best_val_loss": best, "val_losses": losses, "n_val": len(va)}


def prefetched(source: BagSource, slide_ids: Sequence[str]) -> Iterator[Bag]:
    """The bags in order, the next one read in a background thread while the caller
    works on the current one (store reads overlap with training)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bag-reader") as pool:
        nxt: Future[Bag] | None = pool.submit(source.bag, slide_ids[0]) if slide_ids else None
        for k in range(len(slide_ids)):
            assert nxt is not None
            bag = nxt.result()
            nxt = pool.submit(source.bag, slide_ids[k + 1]) if k + 1 < len(slide_ids) else None
            yield bag


def train_epoch(
    model: ScaleAwareABMIL,
    opt: torch.optim.Optimizer,
    source: BagSource,
    slide_ids: Sequence[str],
    y: NDArray[np.int64],
) -> float:
    """One pass over ``slide_ids`` (one slide per step); returns the mean loss."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total = 0.0
    for bag, label in zip(prefetched(source, slide_ids), y, strict=True):
        if len(bag.features) == 0:
            continue
        logits, _ = model(*_tensors(bag))
        loss = loss_fn(logits[None], torch.tensor([int(label)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / max(len(slide_ids), 1)


@torch.no_grad()
def predict_bag(model: ScaleAwareABMIL, bag: Bag) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(class probabilities [K], attention [N]) of one slide."""
    model.eval()
    if len(bag.features) == 0:
        k = model.cfg.n_classes
        return np.full(k, 1 / k, np.float32), np.zeros(0, np.float32)
    logits, a = model(*_tensors(bag))
    return torch.softmax(logits, dim=0).numpy().astype(np.float32), a.numpy().astype(np.float32)
