"""Bootstrap 95 % intervals for the scaling-law fit P(N) = (a / N)^b.

The fit of :mod:`fusion_vlm.analysis.scaling` minimises a linear least-squares
objective in log space, ``log P = c - b log N``, so every bootstrap replicate is
refitted in closed form (the exact minimiser of the same objective), all
replicates at once.  Two resampling schemes:

``items`` (when per-item results exist)
    The same items are asked at every N, so the points of a curve are paired:
    a replicate draws item indices with replacement once and recomputes P(N)
    at every N from those items.  This is the uncertainty of the benchmark's
    finite sample of questions.

``residuals`` (when only the score table exists)
    Fit, take the log-space residuals scaled by ``1 / sqrt(1 - h_k)`` (the
    leverages of the design) and centred, draw them with replacement, add them
    to the fitted values and refit.  This is the uncertainty of the curve's
    shape given its K points; with few N it is wide, as it should be.

Intervals are percentile intervals of ``b``, ``c`` and ``log a = c / b``.  When
the interval of ``b`` contains 0, ``a`` is not identified and its interval is
reported as ``(0, inf)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from fusion_vlm.analysis.scaling import ScalingFit, fit_scaling_law

LEVEL = 0.95


@dataclass(frozen=True)
class FitInterval:
    """Percentile bootstrap intervals of one fit; ``replicates``: float [B, 2] of (c, b), kept for bands."""

    method: str  # "items" or "residuals"
    n_boot: int  # replicates used (those with a non-positive P at some N are dropped)
    b: tuple[float, float]
    c: tuple[float, float]
    a: tuple[float, float]  # (0, inf) when b's interval contains 0
    b_excludes_zero: bool  # the exponent is distinguishable from 0 at this level
    replicates: np.ndarray

    def as_dict(self) -> dict:
        """JSON-ready dict without the replicates (inf written as the string 'inf')."""
        out = {k: v for k, v in asdict(self).items() if k != "replicates"}
        out["a"] = [x if math.isfinite(x) else str(x) for x in self.a]
        return out


def _design(log_n: np.ndarray) -> np.ndarray:
    """[K, 2] design of log P = c - b log N."""
    return np.stack([np.ones_like(log_n), -log_n], axis=1)


def _solve(log_n: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    """Least-squares (c, b) of each row of log_p [B, K] -> [B, 2]."""
    return log_p @ np.linalg.pinv(_design(log_n)).T


def _summarise(reps: np.ndarray, method: str, level: float) -> FitInterval:
    """Percentile intervals of (c, b) replicates [B, 2] and of log a = c / b."""
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    c_lo, c_hi = np.percentile(reps[:, 0], [lo, hi])
    b_lo, b_hi = np.percentile(reps[:, 1], [lo, hi])
    excludes = bool(b_lo > 0 or b_hi < 0)
    a = (0.0, math.inf)
    if excludes:
        log_a_lo, log_a_hi = np.percentile(reps[:, 0] / reps[:, 1], [lo, hi])
        a = (math.exp(min(log_a_lo, 709.0)), math.exp(min(log_a_hi, 709.0)))
    return FitInterval(method, int(reps.shape[0]), (float(b_lo), float(b_hi)), (float(c_lo), float(c_hi)), a,
                       excludes, reps)


def residual_intervals(n_tokens, scores, n_boot: int = 2000, seed: int = 0,
                       level: float = LEVEL) -> tuple[ScalingFit, FitInterval]:
    """Fit and residual-bootstrap intervals of one curve: ``n_tokens``, ``scores`` shape (K,), K >= 3."""
    fit = fit_scaling_law(n_tokens, scores)
    log_n = np.log(np.asarray(n_tokens, float).ravel())
    log_p = np.log(np.asarray(scores, float).ravel())
    if log_n.size < 3:
        raise ValueError(f"residual bootstrap needs at least 3 points, got {log_n.size}")
    x = _design(log_n)
    fitted = x @ np.array([fit.c, fit.b])
    leverage = np.einsum("kj,jk->k", x, np.linalg.pinv(x))
    resid = (log_p - fitted) / np.sqrt(np.clip(1.0 - leverage, 1e-12, None))
    resid -= resid.mean()
    rng = np.random.default_rng(seed)
    draws = resid[rng.integers(0, resid.size, (n_boot, resid.size))]
    return fit, _summarise(_solve(log_n, fitted + draws), "residuals", level)


def item_intervals(n_tokens, item_scores, n_boot: int = 2000, seed: int = 0, scale: float = 1.0,
                   level: float = LEVEL) -> tuple[ScalingFit, FitInterval]:
    """Fit and paired item-bootstrap intervals of one curve.

    ``n_tokens``: shape (K,); ``item_scores``: float [K, I], the score of item i at the k-th N (0/1 for
    exact match, graded in [0, 1] otherwise), items aligned across N; P(N) = ``scale`` x mean over items
    (``scale=100`` for percent).  Replicates with a non-positive P at some N are dropped.
    """
    n = np.asarray(n_tokens, float).ravel()
    items = np.asarray(item_scores, float)
    if items.ndim != 2 or items.shape[0] != n.size or items.shape[1] < 2:
        raise ValueError(f"item_scores must be [K={n.size}, I >= 2], got {list(items.shape)}")
    fit = fit_scaling_law(n, scale * items.mean(axis=1))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, items.shape[1], (n_boot, items.shape[1]))
    p = scale * items[:, idx].mean(axis=2).T  # [B, K]
    ok = (p > 0).all(axis=1)
    if ok.sum() < max(10, n_boot // 2):
        raise ValueError(f"only {int(ok.sum())} of {n_boot} replicates have P > 0 at every N")
    return fit, _summarise(_solve(np.log(n), np.log(p[ok])), "items", level)


def band(interval: FitInterval, grid, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of the fitted curve at ``grid`` (shape (G,)): (lower, upper), each (G,)."""
    log_g = np.log(np.asarray(grid, float))
    curves = np.exp(interval.replicates[:, :1] - interval.replicates[:, 1:] * log_g[None])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return np.percentile(curves, lo, axis=0), np.percentile(curves, hi, axis=0)
