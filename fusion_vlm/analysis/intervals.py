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
                   level: float = LEVEL, groups=None) -> tuple[ScalingFit, FitInterval]:
    """Fit and paired item-bootstrap intervals of one curve.

    ``n_tokens``: shape (K,); ``item_scores``: float [K, I], the score of item i at the k-th N (0/1 for
    exact match, graded in [0, 1] otherwise), items aligned across N; P(N) = ``scale`` x mean over items
    (``scale=100`` for percent). ``groups``: optional int (I,), the cluster of each item (e.g. the image
    its question is about): whole clusters are drawn with replacement and P = ``scale`` x (sum of the
    drawn items' scores) / (number of drawn items), the cluster bootstrap for correlated items; None =
    every item its own cluster. Replicates with a non-positive P at some N are dropped.
    """
    n = np.asarray(n_tokens, float).ravel()
    items = np.asarray(item_scores, float)
    if items.ndim != 2 or items.shape[0] != n.size or items.shape[1] < 2:
        raise ValueError(f"item_scores must be [K={n.size}, I >= 2], got {list(items.shape)}")
    fit = fit_scaling_law(n, scale * items.mean(axis=1))
    p = scale * resample_means(items, n_boot, seed, groups)  # [B, K]
    ok = (p > 0).all(axis=1)
    if ok.sum() < max(10, n_boot // 2):
        raise ValueError(f"only {int(ok.sum())} of {n_boot} replicates have P > 0 at every N")
    return fit, _summarise(_solve(np.log(n), np.log(p[ok])), "items", level)


def resample_means(item_scores, n_boot: int = 2000, seed: int = 0, groups=None) -> np.ndarray:
    """Bootstrap replicates of the per-row item mean: ``item_scores`` float [K, I] -> float [B, K].

    Every replicate draws the same items (or, with ``groups`` int (I,), the same whole clusters) for
    all K rows, so rows stay paired. Without ``groups`` a replicate is the mean of I drawn items; with
    them, the sum over the drawn clusters' items divided by their number of items.
    """
    items = np.asarray(item_scores, float)
    if items.ndim != 2 or items.shape[1] < 1:
        raise ValueError(f"item_scores must be [K, I >= 1], got {list(items.shape)}")
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, items.shape[1], (n_boot, items.shape[1]))
        return items[:, idx].mean(axis=2).T
    labels, inverse = np.unique(np.asarray(groups).ravel(), return_inverse=True)
    if inverse.size != items.shape[1]:
        raise ValueError(f"groups has {inverse.size} labels for {items.shape[1]} items")
    sums = np.zeros((items.shape[0], labels.size))
    np.add.at(sums.T, inverse, items.T)
    counts = np.bincount(inverse, minlength=labels.size).astype(float)
    idx = rng.integers(0, labels.size, (n_boot, labels.size))
    return (sums[:, idx].sum(axis=2) / counts[idx].sum(axis=1)[None]).T


def band(interval: FitInterval, grid, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of the fitted curve at ``grid`` (shape (G,)): (lower, upper), each (G,)."""
    log_g = np.log(np.asarray(grid, float))
    curves = np.exp(interval.replicates[:, :1] - interval.replicates[:, 1:] * log_g[None])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return np.percentile(curves, lo, axis=0), np.percentile(curves, hi, axis=0)


@dataclass(frozen=True)
class ItemCurve:
    """The items behind one curve: ``n`` (K,), ``scores`` float [K, I] aligned by item, P = ``scale`` x mean;
    ``groups``: int (I,) cluster labels (e.g. the image of each question) or None."""

    n: np.ndarray
    scores: np.ndarray
    scale: float
    groups: np.ndarray | None = None


def _bench(metric: str) -> str | None:
    return metric.split("@", 1)[1] if "@" in metric else None


def match_items(curves: dict, records, tol: float = 5.01e-4) -> tuple[dict, dict]:
    """Find the items behind each curve of a score table: ({(metric, mode): ItemCurve}, {(metric, mode): why not}).

    ``curves``: {(metric, mode): (N (K,), P (K,))} (:func:`fusion_vlm.analysis.scaling.group_curves`);
    ``records``: per-item records (:mod:`fusion_vlm.evaluation.items`: mode, n_queries, dataset, index,
    score[, group]). A curve ``metric@Bench`` takes the scored items of its mode whose dataset is ``Bench``
    (``_`` read as a space) and is matched only when the same items were scored at every N of the curve and
    ``scale`` x their mean reproduces every point (``scale`` 100 for percent, else 1; within ``tol`` + 1e-6
    relative, the CSV's rounding). Other curves (MME's summed scores, F1, CIDEr, ...) are not a mean over items:
    the reason is returned and they keep the residual bootstrap.
    """
    by_key: dict[tuple[str, str], dict[float, dict[str, tuple[float, object]]]] = {}
    for r in records:
        if r.get("score") is None:
            continue
        bench = str(r["dataset"]).replace("_", " ")
        by_key.setdefault((bench, str(r["mode"])), {}).setdefault(float(r["n_queries"]), {})[str(r["index"])] = (
            float(r["score"]), r.get("group"))
    found, why = {}, {}
    for (metric, mode), (n, p) in curves.items():
        per_n = by_key.get((_bench(metric), mode))
        if not per_n:
            why[(metric, mode)] = "no scored items"
            continue
        missing = [float(x) for x in n if float(x) not in per_n]
        if missing:
            why[(metric, mode)] = f"no items at N={missing}"
            continue
        ids = sorted(per_n[float(n[0])])
        if any(sorted(per_n[float(x)]) != ids for x in n) or len(ids) < 2:
            why[(metric, mode)] = "not the same items at every N"
            continue
        scores = np.array([[per_n[float(x)][i][0] for i in ids] for x in n])
        mean = scores.mean(axis=1)
        scale = next((s for s in (100.0, 1.0) if np.all(np.abs(s * mean - p) <= tol + 1e-6 * np.abs(p))), None)
        if scale is None:
            why[(metric, mode)] = "not the mean of its items' scores"
            continue
        labels = [per_n[float(n[0])][i][1] for i in ids]
        groups = None if any(g is None for g in labels) else np.unique([str(g) for g in labels],
                                                                       return_inverse=True)[1]
        found[(metric, mode)] = ItemCurve(np.asarray(n, float), scores, scale, groups)
    return found, why


def curve_intervals(curves: dict, item_curves: dict | None = None, n_boot: int = 2000, seed: int = 0,
                    level: float = LEVEL) -> dict:
    """Bootstrap intervals of every curve: {(metric, mode): FitInterval or None}.

    The item bootstrap (:func:`item_intervals`) where ``item_curves`` (:func:`match_items`) has the curve,
    else the residual bootstrap (:func:`residual_intervals`, K >= 3 points); None when neither applies
    (fewer than 3 points without items, a score <= 0, too few positive replicates).
    """
    item_curves = item_curves or {}
    out = {}
    for key, (n, p) in curves.items():
        try:
            if key in item_curves:
                ic = item_curves[key]
                out[key] = item_intervals(ic.n, ic.scores, n_boot, seed, ic.scale, level, ic.groups)[1]
            elif np.unique(n).size >= 3 and np.asarray(n).size >= 3:
                out[key] = residual_intervals(n, p, n_boot, seed, level)[1]
            else:
                out[key] = None
        except ValueError:
            out[key] = None
    return out
