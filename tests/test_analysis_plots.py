"""Plots and the ``fusion-vlm fit`` command end to end on the paper's Appendix D scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fusion_vlm.analysis import cluster_mode, fit_all, group_curves, load_scores_csv, mode_differences
from fusion_vlm.cli import main

CSV = Path(__file__).parent / "data" / "paper_appendix_scores.csv"
PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_functions_write_real_pngs(tmp_path):
    from fusion_vlm.analysis.plots import plot_clusters, plot_divergence, plot_mode_differences, plot_scaling_fits

    rows = load_scores_csv(CSV)
    modes = ["vqq", "vq_ft"]
    few = [r for r in rows if r["metric"] in ("Overall@MME", "Overall@RealWorldQA", "Overall@POPE")]
    w, h = _png_size(Path(plot_scaling_fits(group_curves(few, modes), fit_all(few, modes), tmp_path / "s.png",
                                            cols=2)))
    assert w > 600 and h > 500  # 2 x 2 panels, one empty
    _png_size(Path(plot_clusters(cluster_mode(rows, "vq_ft"), tmp_path / "c.png")))
    _png_size(Path(plot_mode_differences(mode_differences(rows, "vqq", "vq"), tmp_path / "d.png", "vqq", "vq")))
    result = {"n": [1, 2, 3, 4], "mean_distance": [1.0, 1.5, 2.2, 2.9], "std_distance": [0.1, 0.2, 0.2, 0.3],
              "phi": [1.0, 0.5, 0.3, 0.29], "bound": [1.0, 1.7, 2.4, 3.1], "ratio": [None, 2.0, 1.7, 1.1],
              "delta": 1.0, "delta_method": "envelope", "ratio_value": 1.5, "ratio_threshold": 4,
              "phi_epsilon": 0.05, "phi_threshold": 3, "n_pairs": 3}
    _png_size(Path(plot_divergence(result, tmp_path / "v.png")))


def test_cli_fit_end_to_end(tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["fit", "--csv", str(CSV), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Overall@MME" in printed and "1.9911e-59" in printed and "degenerate" in printed
    with open(out / "fits.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 23 * 3 == len({(r["metric"], r["mode"]) for r in table})
    mme = next(r for r in table if r["metric"] == "Overall@MME" and r["mode"] == "vqq")
    assert f"{float(mme['b']):.4f}" == "-0.0516" and int(mme["n_points"]) == 10
    assert len(json.loads((out / "fits.json").read_text())) == 69
    for name in ["scaling_fits", "clusters_vqq", "clusters_vq_ft", "clusters_vq", "diff_vqq-vq_ft", "diff_vqq-vq"]:
        assert (out / f"{name}.png").read_bytes()[:8] == PNG, name
    with open(out / "clusters.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 69


def test_cli_fit_modes_and_compare_options(tmp_path, capsys):
    out = tmp_path / "fit2"
    rc = main(["fit", "--csv", str(CSV), "--out", str(out), "--modes", "vq_ft", "vq",
               "--compare", "vq:vq_ft", "--no-plots"])
    assert rc == 0
    with open(out / "fits.csv", newline="") as fh:
        assert {r["mode"] for r in csv.DictReader(fh)} == {"vq_ft", "vq"}
    with open(out / "mode_differences.csv", newline="") as fh:
        assert {(r["mode_a"], r["mode_b"]) for r in csv.DictReader(fh)} == {("vq", "vq_ft")}
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("argv,needle", [
    (["--csv", "nowhere.csv"], "nowhere.csv"),
    (["--modes", "vqq", "bogus"], "bogus"),
    (["--compare", "vqq-vq"], "vqq-vq"),
])
def test_cli_fit_user_errors_are_one_line(tmp_path, capsys, argv, needle):
    args = ["fit", "--csv", str(CSV), "--out", str(tmp_path / "o"), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_cli_fit_bad_columns(tmp_path, capsys):
    bad = tmp_path / "scores.csv"
    bad.write_text("benchmark,mode,n_queries,score\nx,vqq,1,2\n")
    assert main(["fit", "--csv", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "scores.csv" in err and "metric" in err
