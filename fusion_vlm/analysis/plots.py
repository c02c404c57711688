"""Figures of the analysis: scaling fits (paper Figs. 8/9), K-means clusters (Figs. 16/17),
mode-difference bars (Figs. 11/12) and the branch-divergence curves (Figs. 3, 4, 10).

Every function takes plain data (results of the other ``analysis`` modules),
writes one PNG to ``path`` with matplotlib's Agg backend and returns the path.
"""

from __future__ import annotations

import math
import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log2_axis(ax, n_values) -> None:
    """log-scale x axis with a tick at every token count N."""
    ax.set_xscale("log", base=2)
    ticks = sorted({float(v) for v in n_values})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=7, rotation=90)
    ax.minorticks_off()


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_scaling_fits(curves: dict, fits: dict, path, cols: int = 5, title: str | None = None,
                      intervals: dict | None = None) -> str:
    """One panel per metric: points P(N) and fitted curve (a/N)^b per mode (colour = mode).

    ``curves``: {(metric, mode): (N (K,), P (K,))}; ``fits``: {(metric, mode): ScalingFit or None};
    ``intervals`` (optional): {(metric, mode): FitInterval or None}, drawn as the curve's pointwise
    95 % bootstrap band (:func:`fusion_vlm.analysis.intervals.band`) and the b interval in the legend.
    """
    from fusion_vlm.analysis.intervals import band
    from fusion_vlm.analysis.scaling import evaluate

    plt = _plt()
    metrics = list(dict.fromkeys(m for m, _ in curves))
    modes = list(dict.fromkeys(mode for _, mode in curves))
    colors = {mode: plt.get_cmap("tab10")(i % 10) for i, mode in enumerate(modes)}
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    for ax, metric in zip(axes.flat, metrics):
        all_n = []
        for mode in modes:
            if (metric, mode) not in curves:
                continue
            n, p = curves[(metric, mode)]
            all_n += list(n)
            ax.plot(n, p, "o", ms=3.5, color=colors[mode], alpha=0.75)
            fit = fits.get((metric, mode))
            if fit is not None:
                grid = np.geomspace(min(n), max(n), 200)
                iv = (intervals or {}).get((metric, mode))
                b_text = f"b={fit.b:.3f}" + (f" [{iv.b[0]:.3f}, {iv.b[1]:.3f}]" if iv is not None else "")
                label = f"{mode}: {b_text}, R²={fit.r2:.2f}" + (" (degenerate)" if fit.degenerate else "")
                ax.plot(grid, evaluate(fit, grid), "-", lw=1.6, color=colors[mode], label=label)
                if iv is not None:
                    lo, hi = band(iv, grid)
                    ax.fill_between(grid, lo, hi, color=colors[mode], alpha=0.15, lw=0)
        _log2_axis(ax, all_n)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("query tokens N (log scale)", fontsize=7)
        ax.set_ylabel("score", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
        rising = np.mean([f.b < 0 for (m, _), f in fits.items() if m == metric and f is not None] or [1]) >= 0.5
        ax.legend(fontsize=6, loc="upper left" if rising else "upper right", framealpha=0.6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title or "Weak scaling in token space: P(N) = (a/N)^b fitted per benchmark and mode", fontsize=12)
    return _save(fig, path)


def plot_clusters(result, path, title: str | None = None, cols: int = 2) -> str:
    """One panel per K-means cluster: members' min-max normalised curves and the centroid (black, dashed).

    ``result``: ``clustering.ClusterResult``.
    """
    plt = _plt()
    k = int(result.centroids.shape[0])
    cols = min(cols, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(9.5 * cols, 3.9 * rows), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("tab20")
    for c, ax in enumerate(axes.flat):
        if c >= k:
            ax.axis("off")
            continue
        idx = [i for i, lab in enumerate(result.labels) if lab == c]
        for j, i in enumerate(idx):
            ax.plot(result.n_values, result.normalised[i], "o-", ms=3, lw=1.1, alpha=0.85,
                    color=cmap(j % 20), label=result.names[i])
        ax.plot(result.n_values, result.centroids[c], "--", color="black", lw=2.4, label="centroid")
        _log2_axis(ax, result.n_values)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"cluster {c + 1} ({len(idx)} curves)", fontsize=10)
        ax.set_xlabel("query tokens N (log scale)", fontsize=8)
        ax.set_ylabel("min-max normalised score", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(title or "K-means clusters of normalised score curves", fontsize=12)
    return _save(fig, path)


def plot_mode_differences(diffs, path, mode_a: str, mode_b: str, relative: bool = False, cols: int = 2) -> str:
    """Horizontal bars per metric, one per N (top: smallest N, lighter shade = smaller N);
    green = ``mode_a`` better, red = ``mode_b`` better.

    ``diffs``: list of ``compare.ModeDifference``. Default (``relative=False``, as the
    paper's Figs. 11-12): the raw difference P_A - P_B in the metric's own units, one
    panel per metric with its own axis (metrics differ in scale: MME ~ 1500, accuracy
    ~ 0-100), laid out ``cols * 2`` panels wide. ``relative=True``: diff / pooled range in
    %, all metrics on one shared axis split over ``cols`` panels. The [min, max] of each
    metric's bars is written beside them.
    """
    from matplotlib.colors import to_rgba

    from fusion_vlm.analysis.compare import bar_color

    plt = _plt()
    metrics = list(dict.fromkeys(d.metric for d in diffs))
    groups = {m: sorted((d for d in diffs if d.metric == m), key=lambda d: d.n_queries) for m in metrics}
    if not relative:
        return _raw_difference_panels(plt, groups, path, mode_a, mode_b, cols * 2)
    value = (lambda d: 100 * d.relative) if relative else (lambda d: d.diff)
    lim = max(abs(value(d)) for d in diffs) or 1.0
    cols = max(1, min(cols, len(metrics)))
    per_col = math.ceil(len(metrics) / cols)
    longest = max(sum(len(groups[m]) + 2 for m in metrics[i:i + per_col]) for i in range(0, len(metrics), per_col))
    fig, axes = plt.subplots(1, cols, figsize=(7.2 * cols, 1.4 + 0.11 * longest), squeeze=False, layout="constrained")
    for ax, start in zip(axes[0], range(0, len(metrics), per_col)):
        y, centers = 0.0, []
        for m in metrics[start:start + per_col]:
            g = groups[m]
            vals = [value(d) for d in g]
            shade = np.linspace(0.35, 1.0, len(g)) if len(g) > 1 else [1.0]
            ys = y + np.arange(len(g))
            ax.barh(ys, vals, height=0.85, color=[to_rgba(bar_color(v), s) for v, s in zip(vals, shade)])
            centers.append(ys.mean())
            ax.annotate(f"[{min(vals):+.1f}, {max(vals):+.1f}]", xy=(1.01, ys.mean()),
                        xycoords=("axes fraction", "data"), fontsize=7, va="center")
            y += len(g) + 2.0
        ax.set_yticks(centers)
        ax.set_yticklabels(metrics[start:start + per_col], fontsize=8)
        ax.set_ylim(y - 1.0, -1.5)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlim(-1.08 * lim, 1.08 * lim)
        unit = "% of the metric's range over both modes" if relative else "metric units"
        ax.set_xlabel(f"{mode_a} − {mode_b} ({unit})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[0][math.ceil(len(metrics) / per_col):]:
        ax.axis("off")
    fig.suptitle(f"{mode_a} vs {mode_b}: green = {mode_a} better, red = {mode_b} better "
                 f"(bars per metric: N ascending from top, lighter = smaller N)", fontsize=11)
    return _save(fig, path)


def _raw_difference_panels(plt, groups: dict, path, mode_a: str, mode_b: str, cols: int) -> str:
    """One small bar panel per metric: P_A - P_B per N in the metric's units (see :func:`plot_mode_differences`)."""
    from matplotlib.colors import to_rgba

    from fusion_vlm.analysis.compare import bar_color

    metrics = list(groups)
    cols = max(1, min(cols, len(metrics)))
    rows = math.ceil(len(metrics) / cols)
    tallest = max(len(g) for g in groups.values())
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, (0.9 + 0.16 * tallest) * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax, m in zip(axes.flat, metrics):
        g = groups[m]
        vals = [d.diff for d in g]
        shade = np.linspace(0.35, 1.0, len(g)) if len(g) > 1 else [1.0]
        ax.barh(np.arange(len(g)), vals, height=0.85, color=[to_rgba(bar_color(v), s) for v, s in zip(vals, shade)])
        ax.set_yticks(np.arange(len(g)))
        ax.set_yticklabels([f"N={d.n_queries}" for d in g], fontsize=6)
        ax.set_ylim(len(g) - 0.4, -0.6)
        lim = max(abs(v) for v in vals) or 1.0
        ax.set_xlim(-1.08 * lim, 1.08 * lim)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{m}  [{min(vals):+.3g}, {max(vals):+.3g}]", fontsize=8)
        ax.tick_params(axis="x", labelsize=6)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{mode_a} − {mode_b} in each metric's units: green = {mode_a} better, red = {mode_b} better "
                 f"(N ascending from top)", fontsize=10)
    return _save(fig, path)


def _threshold_panel(ax, level_label: str, level: float, threshold, ylabel: str, title: str) -> None:
    """Finish a threshold panel: the level as a dashed line, the threshold n (if any) as a dotted one, log y."""
    ax.axhline(level, ls="--", color="grey", label=level_label)
    if threshold is not None:
        ax.axvline(threshold, ls=":", color="C3", label=f"threshold n = {threshold}")
    ax.set_yscale("log")
    ax.set(xlabel="answer tokens n", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)


def plot_divergence(result: dict, path, phi_fit=None, title: str | None = None) -> str:
    """2x2 figure from ``divergence.analyse``'s dict: (a) mean D(n) ± std with delta·sqrt(Y(n));
    (b) phi(n) (with the optional power-law ``phi_fit``); (c) the term ratio r(n) with threshold 1;
    (d) |phi(n+1) - phi(n)| with threshold 2."""
    plt = _plt()
    n = np.asarray(result["n"], dtype=float)
    dist, std = np.asarray(result["mean_distance"]), np.asarray(result["std_distance"])
    phi = np.asarray(result["phi"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), layout="constrained")
    ax = axes[0, 0]
    ax.plot(n, dist, lw=2, label="mean D(n) over pairs")
    ax.fill_between(n, dist - std, dist + std, alpha=0.15, label="± 1 std")
    ax.plot(n, result["bound"], "--", lw=1.8, color="C3",
            label=f"δ·√(n + n(n−1)φ(n)), δ = {result['delta']:.3g} ({result['delta_method']})")
    ax.set(xlabel="answer tokens n", ylabel="D(n) = |wᵀ Σ d_i|", title="(a) branch distance and bound")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(n[1:], phi[1:], lw=2, label="φ(n) (n ≥ 2)")
    if phi_fit is not None:
        from fusion_vlm.analysis.scaling import evaluate

        ax.plot(n[1:], evaluate(phi_fit, n[1:]), "--", color="C3",
                label=f"fit (a/n)^b, b = {phi_fit.b:.3f}, R² = {phi_fit.r2:.2f}")
    ax.set(xlabel="answer tokens n", ylabel="mean cos(d_i, d_j), i ≠ j", title="(b) φ(n)")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ratio = np.array([np.nan if r is None else r for r in result["ratio"]], dtype=float)
    ax.plot(n, ratio, lw=2, label="r(n) = n / (n(n−1)φ(n))")
    _threshold_panel(ax, f"R = {result['ratio_value']:g}", result["ratio_value"], result["ratio_threshold"],
                     "first / second term", "(c) threshold 1: term ratio")
    ax = axes[1, 1]
    if len(phi) > 2:
        ax.plot(n[1:-1], np.abs(np.diff(phi[1:])), lw=1.5, label="|φ(n+1) − φ(n)|")
    _threshold_panel(ax, f"ε = {result['phi_epsilon']:g}", result["phi_epsilon"], result["phi_threshold"],
                     "|Δφ|", "(d) threshold 2: change of φ")
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.suptitle(title or f"Branch divergence ({result['n_pairs']} pairs)", fontsize=12)
    return _save(fig, path)
