"""Slide-level heads on stored features: a linear probe on pooled per-scale features and
the scale-aware attention MIL (with its no-scale-embedding ablation); stratified k-fold
cross-validation by slide (by patient when given); saving and loading as safetensors +
JSON (no pickle anywhere: the probe is stored as its coefficients)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._atomic import atomic_dir
from ..errors import ConfigError, StoreError
from .abmil import ABMILConfig, ScaleAwareABMIL, predict_bag, train_abmil
from .bags import Bag, BagSource
from .distill import MLPConfig, MLPHead
from .modelfile import read_config, read_tensors, write_model

__all__ = [
    "ABSENT_LOGIT",
    "HEADS",
    "Head",
    "Scorer",
    "cross_validate",
    "fit_head",
    "fit_linear",
    "fit_linear_full",
    "linear_probs",
]

#: metrics of held-out predictions: (true labels, probabilities [n, K]) -> {name: value};
#: given by the caller (the outputs stage owns the metrics)
Scorer = Callable[[Sequence[str], NDArray[np.float32]], dict[str, Any]]

log = logging.getLogger(__name__)

#: head name -> what it is; ``abmil_noscale`` is the ablation of ``abmil``
HEADS = {
    "linear": "logistic regression on per-scale mean features",
    "abmil": "gated attention MIL over all scales with learnable scale embeddings",
    "abmil_noscale": "the same attention MIL without scale embeddings (ablation)",
}
_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


def fit_linear(
    x: NDArray[np.float32], y: NDArray[np.int64], *, seed: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """L2 logistic regression; C by stratified cross-validation on these rows only (C = 1
    when a class has a single example). Returns (coef [K', D], intercept [K'], C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    counts = np.bincount(y)
    least = int(counts[counts > 0].min())
    base = LogisticRegression(max_iter=5000)
    if least >= 2:
        cv = StratifiedKFold(n_splits=min(5, least), shuffle=True, random_state=seed)
        grid = GridSearchCV(base, {"C": list(_CS)}, cv=cv, scoring="neg_log_loss").fit(x, y)
        model, c = grid.best_estimator_, float(grid.best_params_["C"])
    else:
        model, c = base.set_params(C=1.0).fit(x, y), 1.0
    return model.coef_.astype(np.float64), model.intercept_.astype(np.float64), c


#: the intercept of a class that no training row had: its probability is exactly 0
ABSENT_LOGIT = -1.0e4


def fit_linear_full(
    x: NDArray[np.float32], y: NDArray[np.int64], k: int, *, seed: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """:func:`fit_linear` on the classes present in ``y`` (indices into ``k`` classes),
    returned with one row per class of all ``k``: a class absent from these rows gets a
    zero row and :data:`ABSENT_LOGIT`, so probabilities always have ``k`` columns in class
    order (a training fold may lack a class)."""
    present = np.unique(y)
    coef, icpt, c = fit_linear(x, np.searchsorted(present, y), seed=seed)
    if len(present) == 2 and coef.shape[0] == 1:  # sklearn's binary form: one row for class 1
        coef = np.concatenate([np.zeros_like(coef), coef])
        icpt = np.concatenate([np.zeros_like(icpt), icpt])
    full_coef = np.zeros((k, x.shape[1]), np.float64)
    full_icpt = np.full(k, ABSENT_LOGIT, np.float64)
    full_coef[present], full_icpt[present] = coef, icpt
    return full_coef, full_icpt, c


def linear_probs(
    coef: NDArray[np.float64], intercept: NDArray[np.float64], x: NDArray[np.float32], k: int
) -> NDArray[np.float32]:
    z = x.astype(np.float64) @ coef.T + intercept
    if coef.shape[0] == 1 and k == 2:  # sklearn's binary form: one row for class 1
        z = np.concatenate([np.zeros_like(z), z], axis=-1)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Head:
    """A trained head and what it needs to be applied to new stores."""

    name: str
    kind: str  # "linear", "abmil" or "mlp" (distilled from reports: learn.distill)
    classes: tuple[str, ...]
    scale_names: tuple[str, ...]
    encoders: Mapping[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    model: ScaleAwareABMIL | MLPHead | None = None
    coef: NDArray[np.float64] | None = None
    intercept: NDArray[np.float64] | None = None

    def predict(self, bag: Bag) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
        """(probabilities [K], attention [N] or None) of one slide; refuses a non-finite
        result (damaged stores) in one line, naming the head and the slide."""
        probs, att = self._predict(bag)
        if not np.isfinite(probs).all():
            raise StoreError(
                f"head {self.name!r} gives non-finite probabilities for slide {bag.slide_id!r} "
                "(its stored features hold NaN or infinity)"
            )
        return probs, att

    def _predict(self, bag: Bag) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
        if self.kind == "linear":
            assert self.coef is not None and self.intercept is not None
            return linear_probs(self.coef, self.intercept, bag.pooled()[None], len(self.classes))[0], None
        if isinstance(self.model, MLPHead):
            return self.model.probs(bag.pooled()[None])[0], None
        assert isinstance(self.model, ScaleAwareABMIL)
        return predict_bag(self.model, bag)

    @property
    def in_dim(self) -> int:
        """The feature width the head reads: pooled (scales x D) for linear and MLP heads,
        per tile (D) for the attention MIL."""
        if self.kind == "linear":
            assert self.coef is not None
            return int(self.coef.shape[1])
        assert self.model is not None
        return int(self.model.cfg.in_dim)

    def check(self, source: BagSource) -> None:
        """Refuse stores made with other encoders or scales than the head was trained on."""
        if tuple(source.scale_names) != tuple(self.scale_names):
            raise StoreError(
                f"head {self.name!r} was trained on scales {list(self.scale_names)}, "
                f"the stores have {list(source.scale_names)}"
            )
        if dict(source.encoders) != dict(self.encoders):
            raise StoreError(
                f"head {self.name!r} was trained on encoders {dict(self.encoders)}, "
                f"the stores have {dict(source.encoders)}"
            )
        have = source.dim if self.kind == "abmil" else source.dim * len(source.scale_names)
        if have != self.in_dim:
            raise StoreError(f"head {self.name!r} reads {self.in_dim}-wide features, the stores give {have}")

    def save(self, folder: str | Path) -> Path:
        meta: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "classes": list(self.classes),
            "scale_names": list(self.scale_names),
            "encoders": dict(self.encoders),
            "params": self.params,
        }
        if self.kind == "linear":
            assert self.coef is not None and self.intercept is not None
            tensors: dict[str, NDArray[Any]] = {"coef": self.coef, "intercept": self.intercept}
        else:
            assert self.model is not None
            meta[self.kind] = self.model.cfg.to_dict()
            tensors = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}
        with atomic_dir(folder) as tmp:
            write_model(tmp, tensors, meta, what=f"head {self.name!r}")
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> Head:
        """Load a saved head (safetensors only: a pickle-bearing file is refused), checked
        against its checksum, for finite weights and for shapes that fit its classes."""
        f = Path(folder)
        meta = read_config(f, what="head")
        where = f"head {str(f)!r}"
        try:
            head = cls(
                str(meta["name"]),
                str(meta["kind"]),
                tuple(str(c) for c in meta["classes"]),
                tuple(str(s) for s in meta["scale_names"]),
                dict(meta["encoders"]),
                dict(meta.get("params", {})),
            )
            if head.kind not in ("linear", "abmil", "mlp"):
                raise ValueError(f"unknown kind {head.kind!r}")
            cfg: ABMILConfig | MLPConfig | None = None
            if head.kind != "linear":
                cfg = MLPConfig(**meta["mlp"]) if head.kind == "mlp" else ABMILConfig(**meta["abmil"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: config.json is not a head's ({type(exc).__name__}: {exc})") from exc
        arrays = read_tensors(f, meta, what="head")
        k = len(head.classes)
        try:
            if cfg is None:
                head.coef, head.intercept = arrays["coef"], arrays["intercept"]
                if head.coef.ndim != 2 or head.coef.shape[0] != k or head.intercept.shape != (k,):
                    raise ValueError(f"coefficients {head.coef.shape} do not fit {k} classes")
            else:
                if cfg.n_classes != k:
                    raise ValueError(f"the model has {cfg.n_classes} outputs for {k} classes")
                model = MLPHead(cfg) if isinstance(cfg, MLPConfig) else ScaleAwareABMIL(cfg)
                import torch

                model.load_state_dict({n: torch.from_numpy(a) for n, a in arrays.items()})
                head.model = model.eval()
        except (KeyError, ValueError, RuntimeError) as exc:
            msg = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ConfigError(f"{where}: its weights do not fit its config.json ({msg})") from exc
        return head


def fit_head(
    name: str,
    source: BagSource,
    ids: Sequence[str],
    y: NDArray[np.int64],
    classes: Sequence[str],
    *,
    seed: int,
    epochs: int,
    groups: Sequence[str] | None = None,
) -> Head:
    """Train head ``name`` (see :data:`HEADS`) on the slides ``ids`` (``y`` indexes
    ``classes``; a class without slides here gets probability 0). ``groups`` (a patient
    per slide) keeps a patient on one side of the attention MIL's early-stopping split."""
    cls, scales, encs = tuple(classes), source.scale_names, source.encoders
    if name == "linear":
        x = np.stack([source.bag(s).pooled() for s in ids])
        coef, intercept, c = fit_linear_full(x, y, len(classes), seed=seed)
        return Head(name, "linear", cls, scales, encs, {"C": c}, coef=coef, intercept=intercept)
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r} (choose {', '.join(HEADS)})")
    cfg = ABMILConfig(
        in_dim=source.dim,
        n_classes=len(classes),
        n_scales=len(source.scale_names),
        scale_embedding=name == "abmil",
    )
    model, hist = train_abmil(source, ids, y.tolist(), cfg, seed=seed, epochs=epochs, groups=groups)
    params = {"seed": seed, **{k: v for k, v in hist.items() if k != "val_losses"}}
    return Head(name, "abmil", cls, scales, encs, params, model=model)


def cross_validate(
    source: BagSource,
    ids: Sequence[str],
    labels: Mapping[str, str],
    classes: Sequence[str],
    *,
    heads: Sequence[str],
    folds: int,
    seed: int,
    epochs: int,
    score: Scorer,
    groups: Mapping[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    cv: str = "kfold",
    sites: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Stratified k-fold by slide (by ``groups``, e.g. patient, when given; by site with
    ``cv="site"`` and ``sites``): per-fold and mean metrics (``score(y_true, probs)``) of
    each head on its held-out slides, with the out-of-fold probabilities and the split
    (``split``). ``progress(1)`` is called after each head of each fold."""
    from .splits import cv_splits

    y = np.array([list(classes).index(labels[s]) for s in ids], np.int64)
    g = np.array([(groups or {}).get(s, s) for s in ids])
    splits = cv_splits(ids, y, folds=folds, seed=seed, cv=cv, patients=groups, sites=sites, classes=classes)
    out: dict[str, Any] = {h: {"folds": [], "oof": {}} for h in heads}
    for f, (tr, te) in enumerate(splits.folds):
        for h in heads:
            head = fit_head(
                h,
                source,
                [ids[i] for i in tr],
                y[tr],
                classes,
                seed=seed + f,
                epochs=epochs,
                groups=g[tr].tolist() if groups else None,
            )
            probs = np.stack([head.predict(source.bag(ids[i]))[0] for i in te])
            held_out = [ids[i] for i in te]
            out[h]["folds"].append(dict(score([labels[s] for s in held_out], probs)) | {"slides": held_out})
            out[h]["oof"].update({ids[i]: probs[j].tolist() for j, i in enumerate(te)})
            if progress is not None:
                progress(1)
    for h in heads:
        fm = out[h]["folds"]
        keys = ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro_ovr")
        out[h]["mean"] = {k: _mean([m[k] for m in fm]) for k in keys}
        out[h]["sd"] = {k: _sd([m[k] for m in fm]) for k in keys}
    out["split"] = splits.describe()
    return out


def _mean(v: Sequence[float | None]) -> float | None:
    xs = [x for x in v if x is not None]
    return float(np.mean(xs)) if xs else None


def _sd(v: Sequence[float | None]) -> float | None:
    xs = [x for x in v if x is not None]
    return float(np.std(xs)) if xs else None
