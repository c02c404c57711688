"""Analysis of the paper's results: scaling-law fits, K-means clusters, mode comparisons, plots,
and the branch-divergence estimate on a causal LM.

Importing this package loads numpy/scipy only; the divergence functions (torch,
transformers, datasets) and the plotting functions (matplotlib) are imported on
first use.
"""

from fusion_vlm.analysis.clustering import ClusterResult, cluster_curves, cluster_mode, minmax_normalise
from fusion_vlm.analysis.compare import ModeDifference, bar_color, mode_differences, summarise
from fusion_vlm.analysis.scaling import ScalingFit, evaluate, fit_all, fit_scaling_law, group_curves, load_scores_csv

_LAZY = {
    "divergence": (
        "branch_differences", "distance_curve", "phi_curve", "upsilon", "fit_delta", "term_ratio",
        "ratio_threshold", "phi_threshold", "load_pairs", "load_model", "estimate_divergence",
        "average_curves", "analyse", "fit_phi_scaling", "DivergenceCurves",
    ),
    "plots": ("plot_scaling_fits", "plot_clusters", "plot_mode_differences", "plot_divergence"),
}

__all__ = [
    "ClusterResult", "cluster_curves", "cluster_mode", "minmax_normalise",
    "ModeDifference", "bar_color", "mode_differences", "summarise",
    "ScalingFit", "evaluate", "fit_all", "fit_scaling_law", "group_curves", "load_scores_csv",
    *[name for names in _LAZY.values() for name in names],
]


def __getattr__(name):
    import importlib

    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"fusion_vlm.analysis.{module}"), name)
    raise AttributeError(name)
