"""`fusion-vlm fit` with 95 % intervals: item bootstrap from archived items, residual bootstrap otherwise."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from fusion_vlm.analysis.intervals import item_intervals, match_items, resample_means, residual_intervals
from fusion_vlm.analysis.scaling import group_curves, load_scores_csv
from fusion_vlm.cli import main

PAPER_CSV = "tests/data/paper_appendix_scores.csv"
N = [1, 4, 16, 64]


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cluster_resampling_matches_a_plain_loop():
    """resample_means with groups: the replicate is sum over drawn clusters / items drawn (explicit loop)."""
    x = np.array([[1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], float)
    groups = np.array([5, 5, 7, 9, 9, 9])
    reps = resample_means(x, 40, seed=3, groups=groups)
    draws = np.random.default_rng(3).integers(0, 3, (40, 3))  # clusters 5, 7, 9 -> 0, 1, 2
    members = {0: [0, 1], 1: [2], 2: [3, 4, 5]}
    for b in range(40):
        cols = [i for g in draws[b] for i in members[g]]
        assert np.allclose(reps[b], x[:, cols].mean(axis=1))


def test_cluster_bootstrap_is_not_fooled_by_repeated_items():
    """Each item asked 5 times (perfectly correlated within an image): the image bootstrap keeps the width of
    the single-copy item bootstrap; the naive item bootstrap shrinks it ~ sqrt(5)."""
    rng = np.random.default_rng(0)
    p = np.array([0.55, 0.62, 0.70, 0.76])
    once = (rng.random((4, 300)) < p[:, None]).astype(float)
    five = np.repeat(once, 5, axis=1)
    img = np.repeat(np.arange(300), 5)
    w = {}
    for name, items, groups in (("once", once, None), ("naive", five, None), ("images", five, img)):
        _, iv = item_intervals(N, items, n_boot=1500, seed=1, scale=100, groups=groups)
        w[name] = iv.b[1] - iv.b[0]
    assert abs(w["images"] / w["once"] - 1) < 0.15
    assert w["naive"] < 0.6 * w["once"]


def _items_file(path, per_n, mode="vqq", dataset="TinyBench", shuffle_seed=0):
    """per_n: {N: 0/1 array over items}; written in a different item order at every N."""
    rng = np.random.default_rng(shuffle_seed)
    with open(path, "w") as fh:
        for n, scores in per_n.items():
            for i in rng.permutation(len(scores)):
                fh.write(json.dumps({"mode": mode, "n_queries": n, "dataset": dataset, "index": f"q{i}",
                                     "question": "?", "prediction": "yes", "answer": "yes",
                                     "score": float(scores[i])}) + "\n")


def test_fit_uses_the_items_beside_the_csv(tmp_path, capsys):
    rng = np.random.default_rng(7)
    truth = {n: (rng.random(400) < p).astype(int) for n, p in zip(N, (0.5, 0.6, 0.68, 0.8))}
    acc = {n: 100 * truth[n].mean() for n in N}
    csv_path = tmp_path / "scores.csv"
    with open(csv_path, "w") as fh:
        fh.write("metric,mode,n_queries,score\n")
        for n in N:
            fh.write(f"Overall@TinyBench,vqq,{n},{acc[n]:.3f}\n")
            fh.write(f"F1@TinyBench,vqq,{n},{acc[n] * 0.9 + n / 10:.3f}\n")  # not a mean over items
    _items_file(tmp_path / "scores.items.jsonl", truth)

    out = tmp_path / "fit"
    assert main(["fit", "--csv", str(csv_path), "--out", str(out), "--n-boot", "500", "--clusters", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1 curves over items (1600 item records), 1 over log-space residuals" in printed
    rows = {r["metric"]: r for r in _read(out / "fits.csv")}
    assert rows["Overall@TinyBench"]["interval_method"] == "items"
    assert rows["F1@TinyBench"]["interval_method"] == "residuals"
    # the same numbers as the item bootstrap on the items aligned by id (the file's order differs per N;
    # items are taken in the order of their sorted ids)
    order = sorted(range(400), key=lambda i: f"q{i}")
    _, iv = item_intervals(N, np.array([truth[n][order] for n in N], float), n_boot=500, seed=0, scale=100)
    assert float(rows["Overall@TinyBench"]["b_lo"]) == pytest.approx(iv.b[0], abs=1e-12)
    assert float(rows["Overall@TinyBench"]["b_hi"]) == pytest.approx(iv.b[1], abs=1e-12)
    assert float(rows["Overall@TinyBench"]["b_lo"]) < float(rows["Overall@TinyBench"]["b"]) < float(
        rows["Overall@TinyBench"]["b_hi"])
    obj = {o["metric"]: o for o in json.loads((out / "fits.json").read_text())}
    assert obj["Overall@TinyBench"]["interval"]["method"] == "items"
    assert obj["Overall@TinyBench"]["interval"]["b"] == pytest.approx(list(iv.b), abs=1e-12)
    assert (out / "scaling_fits.png").read_bytes()[:4] == b"\x89PNG"
    # --n-boot 0: the old table, no interval columns
    assert main(["fit", "--csv", str(csv_path), "--out", str(out), "--n-boot", "0", "--no-plots",
                 "--clusters", "1"]) == 0
    assert "b_lo" not in _read(out / "fits.csv")[0]


def test_items_that_do_not_reproduce_the_score_are_not_used(tmp_path):
    rng = np.random.default_rng(1)
    truth = {n: (rng.random(50) < 0.6).astype(int) for n in N}
    rows = [{"metric": "Overall@TinyBench", "mode": "vqq", "n_queries": n, "score": 100 * truth[n].mean() + 1.0}
            for n in N]
    _items_file(tmp_path / "i.jsonl", truth)
    from fusion_vlm.evaluation.items import read_items

    found, why = match_items(group_curves(rows), read_items(tmp_path / "i.jsonl"))
    assert not found and why[("Overall@TinyBench", "vqq")] == "not the mean of its items' scores"
    del truth[64]
    _items_file(tmp_path / "j.jsonl", truth)
    found, why = match_items(group_curves(rows), read_items(tmp_path / "j.jsonl"))
    assert why[("Overall@TinyBench", "vqq")] == "no items at N=[64.0]"


def test_bad_items_file_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "s.csv").write_text("metric,mode,n_queries,score\nA@B,vqq,1,50\nA@B,vqq,2,60\nA@B,vqq,4,70\n")
    (tmp_path / "bad.jsonl").write_text('{"mode": "vqq"}\n')
    assert main(["fit", "--csv", str(tmp_path / "s.csv"), "--items", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "o"), "--no-plots", "--clusters", "1"]) == 2
    assert "bad.jsonl:1: item record lacks n_queries, dataset, index" in capsys.readouterr().err


def test_paper_table1_intervals(tmp_path):
    """Residual-bootstrap intervals of the paper's exponents (no items in the appendix): they contain the
    point estimates; POPE's b (vqq) is clearly below 0, RealWorldQA's is not distinguishable from 0."""
    out = tmp_path / "paper"
    assert main(["fit", "--csv", PAPER_CSV, "--out", str(out), "--no-plots"]) == 0
    rows = {(r["metric"], r["mode"]): r for r in _read(out / "fits.csv")}
    assert all(r["interval_method"] == "residuals" for r in rows.values())
    for r in rows.values():
        assert float(r["b_lo"]) <= float(r["b"]) <= float(r["b_hi"])
    pope = rows[("Overall@POPE", "vqq")]
    assert f"{float(pope['b']):.4f}" == "-0.0503" and float(pope["b_hi"]) < 0 and pope["b_excludes_zero"] == "True"
    rwqa = rows[("Overall@RealWorldQA", "vq_ft")]
    assert float(rwqa["b_lo"]) < 0 < float(rwqa["b_hi"]) and rwqa["a_hi"] == "inf"
    # the interval is the residual bootstrap of intervals.py, reproduced directly
    n, p = group_curves(load_scores_csv(PAPER_CSV))[("Overall@POPE", "vqq")]
    _, iv = residual_intervals(n, p, n_boot=2000, seed=0)
    assert math.isclose(float(pope["b_lo"]), iv.b[0], abs_tol=1e-12)
