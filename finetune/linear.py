"""The linear probe's head: multinomial logistic regression on frozen features.

Features are standardized, the weights are fitted by L-BFGS on the whole training split at once
(how long that takes: docs/benchmarks.md, Fine-tuning), with an L2 penalty whose strength is
chosen by stratified k-fold cross-validation on the training split only (the validation split
stays unseen until the final measurement). The standardization is folded into the returned
weights, so the head applies to raw features: ``logits = features @ W.T + b``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .config import config_default

log = logging.getLogger(__name__)

# L2 strengths tried by cross-validation, in units of the mean per-image loss; with standardized
# features, 1e-3 barely constrains a separable problem and 1.0 nearly flattens the logits.
WEIGHT_DECAY_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
# with fewer than two images in some class there is nothing to cross-validate: this strength is used
FALLBACK_WEIGHT_DECAY = 1e-2
MAX_FOLDS = 5
MAX_ITER = 200
# Below this many feature values the fits are small, and OpenMP threads cost more than they bring
# (on a busy machine, spinning threads fight for the cores).
SINGLE_THREAD_BELOW = 8_000_000


@dataclass
class LinearHead:
    weight: np.ndarray  # (classes, feature_dim), applies to raw features
    bias: np.ndarray  # (classes,)
    weight_decay: float
    cv: list[dict[str, float]] = field(default_factory=list)  # per grid value: mean fold loss/accuracy

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias.astype(np.float64)  # type: ignore[no-any-return]

    def summary(self) -> dict[str, Any]:
        return {"weight_decay": self.weight_decay, "cross_validation": self.cv}


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    class_weights: torch.Tensor,
    weight_decay: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias on standardized ``x`` (float64) by L-BFGS; the bias is not penalized.
    ``init``: a starting point (the solution for a nearby penalty converges in fewer steps)."""
    if init is None:
        w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
        b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    else:
        w, b = init[0].clone().requires_grad_(True), init[1].clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=MAX_ITER, tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe"
    )
    sample_w = class_weights[y]
    norm = sample_w.sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (F.cross_entropy(x @ w.T + b, y, reduction="none") * sample_w).sum() / norm
        loss = loss + 0.5 * weight_decay * (w * w).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return w.detach(), b.detach()


def _folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Stratified fold assignment: each class's rows dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        fold_of[rows] = np.arange(len(rows)) % k
    return [np.flatnonzero(fold_of == f) for f in range(k)]


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_linear_head(
    features: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    *,
    class_weights: Sequence[float] | None = None,
    weight_decay: float | None = None,
    seed: int = config_default("seed"),
) -> LinearHead:
    """Fit the head on training ``features`` (n, d) and integer ``targets``.

    ``weight_decay=None`` picks the L2 strength from :data:`WEIGHT_DECAY_GRID` by the lowest mean
    cross-validated log loss (``min(MAX_FOLDS, smallest class size)`` folds; with fewer than two
    images in some class, :data:`FALLBACK_WEIGHT_DECAY`).
    """
    threads = 1 if features.size < SINGLE_THREAD_BELOW else torch.get_num_threads()
    with _threads(threads):
        return _fit_head(features, targets, num_classes, class_weights, weight_decay, seed)


def _fit_head(
    features: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    class_weights: Sequence[float] | None,
    weight_decay: float | None,
    seed: int,
) -> LinearHead:
    torch.manual_seed(seed)
    x = torch.from_numpy(features.astype(np.float64))
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    y = torch.from_numpy(targets.astype(np.int64))
    cw = torch.tensor(class_weights if class_weights is not None else [1.0] * num_classes, dtype=torch.float64)

    cv: list[dict[str, float]] = []
    if weight_decay is None:
        k = min(MAX_FOLDS, int(np.bincount(targets, minlength=num_classes).min()))
        if k < 2:
            weight_decay = FALLBACK_WEIGHT_DECAY
            log.info("too few images per class to cross-validate; weight decay %g", weight_decay)
        else:
            folds = _folds(targets, k, seed)
            results: dict[float, tuple[list[float], list[float]]] = {wd: ([], []) for wd in WEIGHT_DECAY_GRID}
            for held in folds:
                fit_rows = np.setdiff1d(np.arange(len(targets)), held)
                # standardize with the fold's own statistics, as the final fit does with all rows
                m, s = x[fit_rows].mean(0), x[fit_rows].std(0).clamp_min(1e-6)
                xf, xh = (x[fit_rows] - m) / s, (x[held] - m) / s
                start = None
                for wd in sorted(WEIGHT_DECAY_GRID, reverse=True):  # strong to weak, warm-started
                    start = _fit(xf, y[fit_rows], num_classes, cw, wd, start)
                    logits = xh @ start[0].T + start[1]
                    results[wd][0].append(float(F.cross_entropy(logits, y[held], weight=cw)))
                    results[wd][1].append(float((logits.argmax(1) == y[held]).double().mean()))
            for wd in WEIGHT_DECAY_GRID:
                losses, accs = results[wd]
                cv.append({"weight_decay": wd, "loss": float(np.mean(losses)), "accuracy": float(np.mean(accs))})
            weight_decay = min(cv, key=lambda r: (r["loss"], -r["weight_decay"]))["weight_decay"]
            log.info("weight decay %g chosen by %d-fold cross-validation", weight_decay, k)
    w, b = _fit(xs, y, num_classes, cw, weight_decay)
    raw_w = w / std  # fold the standardization into the head
    raw_b = b - raw_w @ mean
    return LinearHead(
        weight=raw_w.numpy().astype(np.float32), bias=raw_b.numpy().astype(np.float32), weight_decay=weight_decay, cv=cv
    )
