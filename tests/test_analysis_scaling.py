"""Scaling-law fit (paper Table 1), clustering and mode comparisons on the Appendix D scores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fusion_vlm.analysis import (cluster_curves, cluster_mode, evaluate, fit_all, fit_scaling_law,
                                 load_scores_csv, minmax_normalise, mode_differences, summarise)

CSV = Path(__file__).parent / "data" / "paper_appendix_scores.csv"

# Paper Table 1: metric -> (a, b) for vision+question+queries (vqq) and vision+queries (ft) (vq_ft)
TABLE1 = {
    "Overall@MME": ((1.9911e-59, -0.0516), (1.7149e-41, -0.0725)),
    "Overall@HallusionBench": ((2.7617e-21, -0.0632), (1.7770e-20, -0.0653)),
    "Overall@POPE": ((8.5924e-37, -0.0503), (2.1636e-49, -0.0377)),
    "BLEU-4@COCO VAL": ((6.1584e-07, -0.1161), (3.5680e-04, -0.1968)),
    "CIDEr@COCO VAL": ((1.9376e-04, -0.1642), (2.4293e-02, -0.3937)),
    "Final Score@OCRBench": ((1.6755e-05, -0.3727), (7.7939e-05, -0.4142)),
    "Overall@MMStar": ((1.6421e-54, -0.0272), (3.8265e-59, -0.0235)),
    "Overall@SEEDBench2 Plus": ((4.6058e-19, -0.0762), (2.5006e-04, -0.2512)),
    "Overall@ScienceQA TEST": ((4.2754e-68, -0.0247), (2.7737e-22, -0.0695)),
    "Overall@ChartQA TEST": ((3.0580e-05, -0.2370), (1.3465e-05, -0.2173)),
    "Overall@TextVQA VAL": ((7.9968e-06, -0.2297), (5.8912e-05, -0.2538)),
}
# cells whose scores are printed exactly (integers, multiples of 0.04) or insensitive: a matches all 5 digits
EXACT_A = [("Final Score@OCRBench", "vqq"), ("Final Score@OCRBench", "vq_ft"), ("Overall@ChartQA TEST", "vqq"),
           ("Overall@ChartQA TEST", "vq_ft"), ("Overall@TextVQA VAL", "vqq"), ("Overall@TextVQA VAL", "vq_ft"),
           ("Overall@MME", "vqq")]


@pytest.fixture(scope="module")
def fits():
    return fit_all(load_scores_csv(CSV))


@pytest.mark.parametrize("metric", sorted(TABLE1))
@pytest.mark.parametrize("col,mode", [(0, "vqq"), (1, "vq_ft")])
def test_table1_b_to_printed_digits_and_a_within_rounding(fits, metric, col, mode):
    a_paper, b_paper = TABLE1[metric][col]
    fit = fits[(metric, mode)]
    assert f"{fit.b:.4f}" == f"{b_paper:.4f}"
    assert not fit.degenerate and fit.n_points == 10
    # a = exp(c/b) amplifies the 3-decimal rounding of the appendix scores: |d log a| stays < 0.01
    assert abs(math.log(fit.a / a_paper)) < 0.01
    assert fit.c == pytest.approx(fit.b * math.log(fit.a))


@pytest.mark.parametrize("metric,mode", EXACT_A)
def test_table1_a_to_all_printed_digits_where_scores_are_exact(fits, metric, mode):
    a_paper = TABLE1[metric][0 if mode == "vqq" else 1][0]
    assert f"{fits[(metric, mode)].a:.4e}" == f"{a_paper:.4e}"


def test_realworldqa_row_is_the_vq_ft_fit_printed_under_the_vqq_column(fits):
    # Table 1 prints "7.5513e+49 | 0.0335" in the vqq column and leaves vq_ft empty
    vqq, vq_ft = fits[("Overall@RealWorldQA", "vqq")], fits[("Overall@RealWorldQA", "vq_ft")]
    assert f"{vq_ft.b:.4f}" == "0.0335" and abs(math.log(vq_ft.a / 7.5513e49)) < 0.01
    assert f"{vqq.b:.4f}" == "-0.0030" and vqq.degenerate and vqq.a == 0.0  # exp(c/b) underflows
    assert "underflows" in vqq.message and math.isfinite(vqq.c)


def test_recovers_known_parameters_from_noiseless_data():
    n = np.array([1, 8, 16, 32, 64, 128, 256, 384, 512, 768], dtype=float)
    for a, b in [(1e-30, -0.05), (3e-5, -0.3), (2000.0, 0.2)]:
        fit = fit_scaling_law(n, (a / n) ** b)
        assert fit.b == pytest.approx(b, rel=1e-6)
        assert fit.a == pytest.approx(a, rel=1e-4)
        assert fit.r2 == pytest.approx(1.0)
        assert np.allclose(evaluate(fit, n), (a / n) ** b, rtol=1e-6)


def test_degenerate_fit_is_flagged_not_inf_or_nan():
    n = np.array([1.0, 10.0, 100.0, 1000.0])
    flat = fit_scaling_law(n, [50.0, 50.0, 50.0, 50.0])
    assert flat.degenerate and flat.message
    assert flat.c == pytest.approx(math.log(50.0)) and abs(flat.b) < 1e-8
    assert np.allclose(evaluate(flat, n), 50.0)
    tiny = fit_scaling_law(n, 40.0 * n ** 1e-4)  # b = -1e-4: c/b ~ -3.7e4 overflows exp
    assert tiny.degenerate and tiny.a == 0.0 and tiny.b == pytest.approx(-1e-4, rel=1e-4)
    assert fit_scaling_law(n, 40.0 * n ** 0.3).degenerate is False
    with pytest.raises(ValueError):
        fit_scaling_law([5, 5], [1.0, 2.0])
    with pytest.raises(ValueError):
        fit_scaling_law([1, 2], [1.0, 0.0])


def test_csv_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_scores_csv(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("metric,mode,N,score\nx,vqq,1,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*n_queries"):
        load_scores_csv(bad)
    bad.write_text("metric,mode,n_queries,score\nx,vqq,one,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2"):
        load_scores_csv(bad)


def test_clustering_deterministic_and_separates_shapes():
    n = np.array([1, 4, 16, 64, 256], dtype=float)
    rng = np.random.default_rng(1)
    curves = {}
    for i in range(4):
        curves[f"rise{i}"] = (n, 10 + 5 * np.log(n) + rng.normal(0, 0.05, 5) * i)
        curves[f"fall{i}"] = (n, 100 - 3 * np.log(n) * (1 + i))
        curves[f"dip{i}"] = (n, np.array([5, 1, 1, 1, 5.0]) * (i + 1))
    first = cluster_curves(curves, k=3, seed=0)
    again = cluster_curves(curves, k=3, seed=0)
    assert np.array_equal(first.labels, again.labels) and np.allclose(first.centroids, again.centroids)
    groups = {name[:-1]: {lab for nm, lab in zip(first.names, first.labels) if nm[:-1] == name[:-1]}
              for name in first.names}
    assert all(len(labs) == 1 for labs in groups.values()) and len({min(v) for v in groups.values()}) == 3
    assert first.normalised.min() == 0.0 and first.normalised.max() == 1.0
    assert minmax_normalise([[3.0, 3.0, 3.0]]).tolist() == [[0.0, 0.0, 0.0]]
    uneven = dict(curves, short=(n[:3], n[:3]))
    assert cluster_curves(uneven, k=3).skipped == ["short"]


def test_cluster_paper_scores_per_mode():
    res = cluster_mode(load_scores_csv(CSV), "vqq", k=4, seed=0)
    assert len(res.names) == 23 and sorted(set(res.labels.tolist())) == [0, 1, 2, 3]
    assert np.all(np.bincount(res.labels)[:-1] >= np.bincount(res.labels)[1:])  # cluster 0 is the largest


def test_mode_differences_sign_colour_and_relative_range():
    rows = [{"metric": "m", "mode": mode, "n_queries": n, "score": s}
            for mode, pts in {"A": [(1, 10.0), (8, 30.0)], "B": [(1, 20.0), (8, 25.0), (16, 1.0)]}.items()
            for n, s in pts]
    diffs = mode_differences(rows, "A", "B")
    assert [(d.n_queries, d.diff) for d in diffs] == [(1.0, -10.0), (8.0, 5.0)]  # only N both modes have
    assert diffs[0].range == 29.0  # pooled over both modes: max 30 - min 1
    assert diffs[0].relative == pytest.approx(-10 / 29) and diffs[1].relative == pytest.approx(5 / 29)
    assert diffs[0].color.lower() != diffs[1].color.lower()
    assert diffs[1].color == "#2e9b45" and diffs[0].color == "#d64541"  # green A better, red B better
    assert summarise(diffs)["m"] == {"wins": 1, "losses": 1, "mean_relative": pytest.approx(-5 / 58),
                                     "min_relative": pytest.approx(-10 / 29), "max_relative": pytest.approx(5 / 29)}
    with pytest.raises(ValueError, match="'C'"):
        mode_differences(rows, "A", "C")
