"""The linear probe's head: multinomial logistic regression on frozen features, tuned by itself.

Features are standardized, and the weights are fitted by L-BFGS (:mod:`finetune.lbfgs`) on the
whole training split at once
(how long that takes: docs/benchmarks.md, Fine-tuning), with an L2 penalty whose strength is chosen
by stratified k-fold cross-validation on the training split only: the validation split stays unseen
until the final measurement. The loss weights each class by :meth:`~finetune.split.Split.class_weights`
(every class counts the same, however many images it has), and so does the cross-validated loss
that chooses the penalty. Augmented views of a training image (mirror images, other crops:
:mod:`finetune.augment`) are more rows with its label; the folds keep all views of one image on
one side, and held-out images are scored on their eval view alone, which is what serving sees.

The fit runs in the span of the standardized training rows (an SVD basis): an L2-penalized linear
model's optimum lies in that span, so the solution is the same, in fewer dimensions when there are
fewer rows than features. The standardization is folded into the returned weights, so the head
applies to raw features: ``logits = features @ W.T + b``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import config_default
from .lbfgs import minimize

log = logging.getLogger(__name__)

# L2 strengths tried by cross-validation, in units of the mean per-image loss; with standardized
# features, 1e-3 barely constrains a separable problem and 1.0 nearly flattens the logits.
WEIGHT_DECAY_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
# with fewer than two images in some class there is nothing to cross-validate: this strength is used
FALLBACK_WEIGHT_DECAY = 1e-2
MAX_FOLDS = 5
MAX_ITER = 200
# singular values below this share of the largest are numerical noise, not directions of the data
_RANK_TOLERANCE = 1e-9
SELECTION_RULE = (
    "the lowest class-weighted log loss of the out-of-fold predictions (each training image scored on its "
    "eval view by a head fitted without it); a tie goes to the stronger penalty"
)


@dataclass
class LinearHead:
    """The fitted head, and how its penalty was chosen: ``cv`` holds one row per grid value
    (out-of-fold loss, accuracy and balanced accuracy), empty when nothing was cross-validated."""

    weight: np.ndarray  # (classes, feature_dim), applies to raw features
    bias: np.ndarray  # (classes,)
    weight_decay: float
    cv: list[dict[str, float]] = field(default_factory=list)
    folds: int = 0
    views: int = 1  # rows per training image
    why: str = ""

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias.astype(np.float64)  # type: ignore[no-any-return]

    @property
    def chosen(self) -> dict[str, float] | None:
        """The cross-validation row of the chosen penalty (``None`` when nothing was cross-validated)."""
        return next((r for r in self.cv if r["weight_decay"] == self.weight_decay), None)

    def summary(self) -> dict[str, Any]:
        return {
            "weight_decay": self.weight_decay,
            "why": self.why,
            "selection_rule": SELECTION_RULE if self.cv else None,
            "folds": self.folds,
            "views_per_image": self.views,
            "cross_validation": self.cv,
        }


@dataclass
class _Basis:
    """Standardization and an orthonormal basis of the standardized rows' span."""

    mean: np.ndarray
    std: np.ndarray
    vt: np.ndarray  # (rank, feature_dim)

    @classmethod
    def of(cls, x: np.ndarray) -> _Basis:
        mean, std = x.mean(0), np.maximum(x.std(0, ddof=1), 1e-6)
        _, s, vt = np.linalg.svd((x - mean) / std, full_matrices=False)
        rank = max(1, int((s > s[0] * _RANK_TOLERANCE).sum()))
        return cls(mean, std, vt[:rank])

    def project(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std) @ self.vt.T  # type: ignore[no-any-return]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))  # type: ignore[no-any-return]


def weighted_log_loss(logits: np.ndarray, y: np.ndarray, class_weights: np.ndarray) -> float:
    """Cross-entropy with each row weighted by its class's weight (a weighted mean)."""
    w = class_weights[y]
    return float(-(w * _log_softmax(logits)[np.arange(len(y)), y]).sum() / w.sum())


def _fit(
    z: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    class_weights: np.ndarray,
    weight_decay: float,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias on projected rows ``z`` (float64) by L-BFGS: class-weighted mean
    cross-entropy plus ``weight_decay / 2 * |W|^2`` (the bias is not penalized). ``init``: a
    starting point (the solution for a nearby penalty converges in fewer steps)."""
    r = z.shape[1]
    onehot = np.eye(num_classes)[y]
    row_w = class_weights[y] / class_weights[y].sum()

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = p[: num_classes * r].reshape(num_classes, r), p[num_classes * r :]
        logp = _log_softmax(z @ w.T + b)
        loss = -float((row_w * (logp * onehot).sum(1)).sum()) + 0.5 * weight_decay * float((w * w).sum())
        g = (np.exp(logp) - onehot) * row_w[:, None]
        return loss, np.concatenate([(g.T @ z + weight_decay * w).ravel(), g.sum(0)])

    x0 = np.zeros(num_classes * (r + 1)) if init is None else np.concatenate([init[0].ravel(), init[1]])
    p = minimize(objective, x0, max_iter=MAX_ITER)
    return p[: num_classes * r].reshape(num_classes, r), p[num_classes * r :]


def _folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Stratified fold assignment: each class's rows dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        fold_of[rows] = np.arange(len(rows)) % k
    return [np.flatnonzero(fold_of == f) for f in range(k)]


def fit_linear_head(
    features: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    *,
    views: Sequence[np.ndarray] = (),
    class_weights: Sequence[float] | None = None,
    weight_decay: float | None = None,
    grid: Sequence[float] = WEIGHT_DECAY_GRID,
    score_given: bool = False,
    seed: int = config_default("seed"),
) -> LinearHead:
    """Fit the head on training ``features`` (n, d) of the eval view, and integer ``targets``.

    ``views``: more (n, d) arrays, row i another view of image i (fitted with its label).
    ``weight_decay=None`` picks the L2 strength from ``grid`` by cross-validation
    (``min(MAX_FOLDS, smallest class size)`` stratified folds; with fewer than two images in some
    class, :data:`FALLBACK_WEIGHT_DECAY`). ``score_given``: cross-validate a given ``weight_decay``
    too, for its out-of-fold loss (to compare backbones by).
    """
    x = [v.astype(np.float64) for v in (features, *views)]
    cw = np.asarray(class_weights if class_weights is not None else [1.0] * num_classes, dtype=np.float64)
    given = [weight_decay] if weight_decay is not None and score_given else []
    candidates = sorted(grid if weight_decay is None else given, reverse=True)  # strong to weak
    k = min(MAX_FOLDS, int(np.bincount(targets, minlength=num_classes).min()))
    cv = _cross_validate(x, targets, num_classes, cw, candidates, k, seed) if k >= 2 and candidates else []
    if weight_decay is not None:
        why = f"weight decay {weight_decay:g} as given"
    elif not cv:
        weight_decay = FALLBACK_WEIGHT_DECAY
        why = f"weight decay {weight_decay:g}: too few images per class to cross-validate (fewer than 2)"
    else:
        best = min(cv, key=lambda r: (r["loss"], -r["weight_decay"]))
        weight_decay = best["weight_decay"]
        edge = " (at the edge of the grid)" if weight_decay in (min(grid), max(grid)) else ""
        why = (
            f"weight decay {weight_decay:g}{edge}: the lowest out-of-fold log loss ({best['loss']:.4f}, accuracy "
            f"{best['accuracy']:.4f}) of {len(cv)} values, {k}-fold cross-validation on the {len(targets)} "
            f"training images ({len(x)} view(s) each)"
        )
    log.info("%s", why)
    rows = np.concatenate(x)
    basis = _Basis.of(rows)
    w, b = _fit(basis.project(rows), np.tile(targets, len(x)), num_classes, cw, weight_decay)
    raw_w = (w @ basis.vt) / basis.std  # back to feature space, standardization folded in
    raw_b = b - raw_w @ basis.mean
    return LinearHead(
        weight=raw_w.astype(np.float32),
        bias=raw_b.astype(np.float32),
        weight_decay=weight_decay,
        cv=cv,
        folds=k if cv else 0,
        views=len(x),
        why=why,
    )


def _cross_validate(
    x: list[np.ndarray],
    y: np.ndarray,
    num_classes: int,
    cw: np.ndarray,
    candidates: Sequence[float],
    k: int,
    seed: int,
) -> list[dict[str, float]]:
    """Out-of-fold eval-view logits of every training image for each candidate penalty, and their
    class-weighted log loss, accuracy and balanced accuracy (one row per candidate, grid order)."""
    oof = {wd: np.zeros((len(y), num_classes)) for wd in candidates}
    for held in _folds(y, k, seed):
        rows = np.setdiff1d(np.arange(len(y)), held)
        # standardized with the fold's own statistics, as the final fit is with all rows
        basis = _Basis.of(np.concatenate([v[rows] for v in x]))
        z, zh = basis.project(np.concatenate([v[rows] for v in x])), basis.project(x[0][held])
        start = None
        for wd in candidates:  # strong to weak, warm-started
            start = _fit(z, np.tile(y[rows], len(x)), num_classes, cw, wd, start)
            oof[wd][held] = zh @ start[0].T + start[1]
    out = []
    for wd in sorted(candidates):
        hit = oof[wd].argmax(1) == y
        recalls = [float(hit[y == c].mean()) for c in range(num_classes) if (y == c).any()]
        out.append(
            {
                "weight_decay": wd,
                "loss": weighted_log_loss(oof[wd], y, cw),
                "accuracy": float(hit.mean()),
                "balanced_accuracy": float(np.mean(recalls)),
            }
        )
    return out
