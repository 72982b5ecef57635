"""Distilling paired report text into a vision-only classifier (CLIP-IT): a teacher
classifies the fusion of an image's features and its paired-text feature; the student, an
MLP on the image features alone, learns with cross-entropy plus a feature-distillation
loss pulling its hidden layer towards the teacher's. The baseline is the same student,
same initialisation and seed, without the distillation term. No text at inference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

__all__ = ["DistillSettings", "Distilled", "MLPConfig", "MLPHead", "distill", "train_mlp"]


@dataclass(frozen=True)
class MLPConfig:
    in_dim: int
    n_classes: int
    hidden: int = 128
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLPHead(nn.Module):
    """features [N, D] -> (logits [N, K], hidden [N, H])."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.body = nn.Sequential(nn.Linear(cfg.in_dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout))
        self.out = nn.Linear(cfg.hidden, cfg.n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.out(h), h

    @torch.no_grad()
    def probs(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        self.eval()
        logits, _ = self(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return torch.softmax(logits, dim=-1).numpy().astype(np.float32)


@dataclass(frozen=True)
class DistillSettings:
    epochs: int
    lr: float
    weight_decay: float
    hidden: int
    weight: float  # of the feature-distillation term
    seed: int


def train_mlp(
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    n_classes: int,
    s: DistillSettings,
    *,
    target: NDArray[np.float32] | None = None,
) -> MLPHead:
    """Full-batch AdamW on cross-entropy over the rows with a label (``y >= 0``), plus
    ``s.weight`` x the mean squared distance between the unit hidden features and the unit
    ``target`` rows (every row, labelled or not) when given."""
    torch.manual_seed(s.seed)
    model = MLPHead(MLPConfig(x.shape[1], n_classes, s.hidden))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y)
    tt = None if target is None else F.normalize(torch.from_numpy(target), dim=-1)
    model.train()
    for _ in range(s.epochs):
        logits, h = model(xt)
        loss = F.cross_entropy(logits, yt, ignore_index=-1)
        if tt is not None:
            loss = loss + s.weight * (F.normalize(h, dim=-1) - tt).pow(2).sum(dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@dataclass
class Distilled:
    student: MLPHead
    baseline: MLPHead
    teacher: MLPHead


def distill(
    image: NDArray[np.float32],
    text: NDArray[np.float32],
    y: NDArray[np.int64],
    n_classes: int,
    s: DistillSettings,
    progress: Callable[[int], None] | None = None,
) -> Distilled:
    """Teacher on [image, paired text] of the labelled rows (``y >= 0``); the student learns
    cross-entropy on the labelled rows and the teacher's hidden features on every row
    (unlabelled images carry the paired text's knowledge too); the baseline is the same
    MLP on the labelled rows' image features alone, same seed."""
    lab = y >= 0
    fused = np.concatenate([image, text], axis=1).astype(np.float32)
    step = progress or (lambda n: None)
    teacher = train_mlp(fused[lab], y[lab], n_classes, s)
    step(1)
    with torch.no_grad():
        _, h_t = teacher(torch.from_numpy(fused))
    student = train_mlp(image, y, n_classes, s, target=h_t.numpy())
    step(1)
    baseline = train_mlp(image[lab], y[lab], n_classes, s)
    step(1)
    return Distilled(student, baseline, teacher)
