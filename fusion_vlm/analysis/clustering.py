"""Appendix E: min-max normalise each benchmark's score curve over N and group the shapes with K-means.

Each curve P(N_1..N_m) of one (metric, mode) becomes (P - min P) / (max P -
min P) over its own N values (a flat curve becomes all zeros), so only its
shape is compared. K-means (scikit-learn, ``random_state=seed``, ``n_init=10``)
groups the normalised vectors. Cluster ids are then renumbered so that they do
not depend on K-means' internal numbering: cluster 0 is the largest, ties
broken by the centroid's mean (higher first), then by the first member's name.
All curves of one call must share the same N values; curves that lack some N
are left out and listed in ``skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ClusterResult:
    """K-means grouping of normalised curves.

    ``names``: curve names, length M; ``n_values``: shape (m,) the common N
    grid (ascending); ``normalised``: shape (M, m) min-max normalised scores in
    [0, 1]; ``labels``: shape (M,) int cluster ids 0..k-1; ``centroids``:
    shape (k, m); ``skipped``: names left out (missing N values).
    """

    names: list[str]
    n_values: np.ndarray
    normalised: np.ndarray
    labels: np.ndarray
    centroids: np.ndarray
    skipped: list[str] = field(default_factory=list)

    def members(self, cluster: int) -> list[str]:
        """Names of the curves in ``cluster``."""
        return [n for n, lab in zip(self.names, self.labels) if lab == cluster]


def minmax_normalise(values) -> np.ndarray:
    """(x - min) / (max - min) along the last axis; rows with max == min map to 0. Shape kept."""
    x = np.asarray(values, dtype=float)
    lo = x.min(axis=-1, keepdims=True)
    span = x.max(axis=-1, keepdims=True) - lo
    return np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)


def cluster_curves(curves: dict, k: int = 4, seed: int = 0) -> ClusterResult:
    """Cluster curves {name: (N array, scores array)} by the shape of their normalised scores.

    Uses the N grid shared by the most curves (the union of all N when every
    curve has it); curves lacking a grid N are skipped. ``k`` is capped at the
    number of distinct curves. Deterministic for a given ``seed``. Raises
    ValueError when no curve is usable.
    """
    from sklearn.cluster import KMeans

    if not curves:
        raise ValueError("no curves to cluster")
    grid = np.array(sorted({float(q) for n, _ in curves.values() for q in np.asarray(n, float)}))
    names, rows, skipped = [], [], []
    for name, (n, p) in curves.items():
        lookup = {float(q): float(s) for q, s in zip(np.asarray(n, float), np.asarray(p, float))}
        if all(q in lookup for q in grid):
            names.append(name)
            rows.append([lookup[q] for q in grid])
        else:
            skipped.append(name)
    if not names:
        raise ValueError("no curve has scores at every N of the common grid "
                         f"{grid.tolist()}; cluster curves that share their N values")
    norm = minmax_normalise(np.array(rows))
    k_eff = max(1, min(int(k), len(np.unique(norm, axis=0))))
    km = KMeans(n_clusters=k_eff, random_state=seed, n_init=10).fit(norm)
    labels, centroids = _canonical_order(km.labels_, km.cluster_centers_, names)
    return ClusterResult(names=names, n_values=grid, normalised=norm, labels=labels,
                         centroids=centroids, skipped=skipped)


def _canonical_order(labels: np.ndarray, centroids: np.ndarray, names: list[str]):
    """Renumber clusters: larger first, then higher centroid mean, then first member name."""
    ids = np.unique(labels)
    key = {c: (-int(np.sum(labels == c)), -float(centroids[c].mean()),
               min(n for n, lab in zip(names, labels) if lab == c)) for c in ids}
    order = sorted(ids, key=lambda c: key[c])
    remap = {old: new for new, old in enumerate(order)}
    return np.array([remap[lab] for lab in labels], dtype=int), centroids[order]


def cluster_mode(rows, mode: str, k: int = 4, seed: int = 0) -> ClusterResult:
    """Cluster every metric's curve of one ``mode`` from long rows (see ``scaling.load_scores_csv``).

    Curve names are the metric names. Raises ValueError when the mode has no rows.
    """
    from fusion_vlm.analysis.scaling import group_curves

    curves = {metric: np_pair for (metric, m), np_pair in group_curves(rows, [mode]).items()}
    if not curves:
        raise ValueError(f"mode {mode!r} has no rows to cluster")
    return cluster_curves(curves, k=k, seed=seed)
