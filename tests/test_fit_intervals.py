"""Bootstrap intervals of the scaling-law fit (fusion_vlm.analysis.intervals)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion_vlm.analysis.intervals import band, item_intervals, residual_intervals
from fusion_vlm.analysis.scaling import fit_scaling_law

N = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])


def power(n, a, b):
    return (a / n) ** b


def test_replicate_refit_is_the_same_fit():
    """The closed-form refit of a replicate equals fit_scaling_law (BFGS from the LS start) on the same data."""
    rng = np.random.default_rng(0)
    p = power(N, 1e-3, -0.05) * np.exp(rng.normal(0, 0.02, N.size))
    fit, iv = residual_intervals(N, p, n_boot=50, seed=1)
    c, b = iv.replicates[7]
    # rebuild that replicate's data from its own (c, b) and check the solver on one noisy replicate too
    refit = fit_scaling_law(N, np.exp(c - b * np.log(N)))
    assert math.isclose(refit.b, b, rel_tol=0, abs_tol=1e-9) and math.isclose(refit.c, c, abs_tol=1e-9)
    assert iv.b[0] <= fit.b <= iv.b[1]


def test_points_on_the_curve_give_a_zero_width_interval():
    _, iv = residual_intervals(N, power(N, 2e-4, -0.08), n_boot=200)
    assert iv.b[1] - iv.b[0] < 1e-9 and math.isclose(iv.b[0], -0.08, abs_tol=1e-9)
    assert math.isclose(iv.a[0], 2e-4, rel_tol=1e-6) and iv.b_excludes_zero


def test_residual_interval_covers_the_true_exponent():
    """Coverage over 60 noisy curves of known b: a 95 % interval should miss rarely (allow up to 20 %)."""
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(60):
        p = power(N, 1e-3, -0.05) * np.exp(rng.normal(0, 0.03, N.size))
        _, iv = residual_intervals(N, p, n_boot=1000, seed=int(rng.integers(1 << 30)))
        hits += iv.b[0] <= -0.05 <= iv.b[1]
    assert hits >= 48


def test_item_interval_covers_the_true_exponent_and_shrinks_with_items():
    rng = np.random.default_rng(5)
    true = power(N, 5e3, -0.06)  # accuracies 0.60 .. 0.84 as fractions
    hits, widths = 0, {}
    for n_items in (200, 2000):
        w = []
        for _ in range(25):
            items = (rng.random((N.size, n_items)) < true[:, None]).astype(float)
            _, iv = item_intervals(N, items, n_boot=500, seed=int(rng.integers(1 << 30)))
            hits += n_items == 2000 and iv.b[0] <= -0.06 <= iv.b[1]
            w.append(iv.b[1] - iv.b[0])
        widths[n_items] = np.median(w)
    assert hits >= 20  # of 25
    assert widths[2000] < 0.5 * widths[200]  # ~ 1 / sqrt(10)


def test_flat_curve_leaves_a_unidentified():
    rng = np.random.default_rng(2)
    p = 50 * np.exp(rng.normal(0, 0.05, N.size))
    _, iv = residual_intervals(N, p)
    assert iv.b[0] < 0 < iv.b[1] and not iv.b_excludes_zero and iv.a == (0.0, math.inf)
    assert iv.as_dict()["a"] == [0.0, "inf"]


def test_band_contains_the_fit_and_widens_away_from_the_data_centre():
    rng = np.random.default_rng(4)
    p = power(N, 1e-3, -0.05) * np.exp(rng.normal(0, 0.03, N.size))
    fit, iv = residual_intervals(N, p)
    grid = np.array([1.0, 16.0, 256.0])
    lo, hi = band(iv, grid)
    mid = np.exp(fit.c - fit.b * np.log(grid))
    assert np.all(lo <= mid) and np.all(mid <= hi)
    width = hi - lo
    assert width[1] < width[0] and width[1] < width[2]


def test_bad_item_matrix_is_one_clear_error():
    with pytest.raises(ValueError, match=r"item_scores must be \[K=9"):
        item_intervals(N, np.ones((3, 10)))
