"""A small L-BFGS in NumPy, for the linear probe's smooth, strictly convex objective.

The probe used ``torch.optim.LBFGS``; the first optimizer a process builds imports PyTorch's
compiler stack, which is slow to import and does nothing for a problem this size. This is the
textbook method (Nocedal & Wright, Algorithm 7.4, two-loop recursion) with a backtracking line
search on the Armijo condition; curvature pairs that would break positive definiteness are skipped.
Deterministic: the same inputs give the same iterates.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]  # x -> (f(x), gradient at x)

_ARMIJO = 1e-4  # sufficient decrease, as a share of the directional derivative
_SHRINK = 0.5
_MAX_BACKTRACKS = 40


def _direction(g: np.ndarray, pairs: deque[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """``-H g`` with the inverse Hessian approximated from the curvature ``pairs`` (s, y, 1/s.y)."""
    if not pairs:
        return -g * min(1.0, 1.0 / max(float(np.abs(g).sum()), 1e-12))  # a cautious first step
    q = g.copy()
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float(s @ q)
        q -= a * y
        alphas.append(a)
    s, y, _ = pairs[-1]
    r = q * (float(s @ y) / float(y @ y))
    for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
        r += s * (a - rho * float(y @ r))
    return -r


def minimize(
    f: Objective,
    x0: np.ndarray,
    *,
    max_iter: int = 200,
    memory: int = 10,
    tolerance_grad: float = 1e-6,
    tolerance_change: float = 1e-9,
) -> np.ndarray:
    """The minimizer of ``f`` from ``x0`` (float64), to a largest gradient entry of
    ``tolerance_grad``, or until a step changes ``f`` or ``x`` by less than ``tolerance_change``."""
    x = x0.astype(np.float64, copy=True)
    fx, g = f(x)
    pairs: deque[tuple[np.ndarray, np.ndarray, float]] = deque(maxlen=memory)
    for _ in range(max_iter):
        if float(np.abs(g).max()) <= tolerance_grad:
            break
        d = _direction(g, pairs)
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: forget the curvature and go downhill
            pairs.clear()
            d = _direction(g, pairs)
            slope = float(g @ d)
        t = 1.0
        for _ in range(_MAX_BACKTRACKS):
            fn, gn = f(x + t * d)
            if fn <= fx + _ARMIJO * t * slope:
                break
            t *= _SHRINK
        else:
            break  # no decrease along d: as close as this precision allows
        step, change = t * d, fx - fn
        sy = float(step @ (gn - g))
        if sy > 1e-12:
            pairs.append((step, gn - g, 1.0 / sy))
        x, fx, g = x + step, fn, gn
        if change < tolerance_change or float(np.abs(step).max()) < tolerance_change:
            break
    return x
