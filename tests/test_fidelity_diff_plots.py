"""Mode-difference bars (paper Figs. 11-12) show the raw difference P - P' by default; relative % is the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion_vlm.analysis import load_scores_csv, mode_differences
from fusion_vlm.analysis import plots
from fusion_vlm.cli import main

CSV = Path(__file__).parent / "data" / "paper_appendix_scores.csv"
METRICS = ("Overall@MME", "Overall@POPE", "Overall@RealWorldQA")


@pytest.fixture
def captured(monkeypatch):
    """The figures the plot functions save (closed by the real _save afterwards)."""
    figs = []
    real = plots._save

    def keep(fig, path):
        figs.append([[p.get_width() for p in ax.patches] for ax in fig.axes])
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figs


def _diffs():
    rows = [r for r in load_scores_csv(CSV) if r["metric"] in METRICS]
    return mode_differences(rows, "vqq", "vq")


def test_default_bars_are_raw_differences_one_panel_per_metric(captured, tmp_path):
    diffs = _diffs()
    plots.plot_mode_differences(diffs, tmp_path / "d.png", "vqq", "vq")
    panels = [w for w in captured[0] if w]
    assert len(panels) == len(METRICS)  # each metric on its own axis (MME's scale is not POPE's)
    order = list(dict.fromkeys(d.metric for d in diffs))
    for widths, metric in zip(panels, order):
        expected = [d.diff for d in sorted((d for d in diffs if d.metric == metric), key=lambda d: d.n_queries)]
        assert widths == pytest.approx(expected)
    mme = max(abs(d.diff) for d in diffs if d.metric == "Overall@MME")
    assert mme > 1.0  # MME differences are in MME points, not a fraction of a range


def test_relative_is_the_option(captured, tmp_path):
    diffs = _diffs()
    plots.plot_mode_differences(diffs, tmp_path / "r.png", "vqq", "vq", relative=True)
    widths = sorted(w for panel in captured[0] for w in panel)
    assert widths == pytest.approx(sorted(100 * d.relative for d in diffs))


def test_cli_fit_draws_raw_by_default_and_relative_on_request(captured, tmp_path):
    lines = CSV.read_text().splitlines()
    small = tmp_path / "small.csv"  # three metrics: keeps the command's other plots quick
    small.write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in METRICS]) + "\n")
    common = ["fit", "--csv", str(small), "--modes", "vqq", "vq_ft", "--clusters", "2"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    raw = [w for panel in captured[-1] for w in panel]
    assert main(common + ["--out", str(tmp_path / "b"), "--relative"]) == 0
    rel = [w for panel in captured[-1] for w in panel]
    rows = load_scores_csv(small)
    diffs = mode_differences(rows, "vqq", "vq_ft")
    assert sorted(raw) == pytest.approx(sorted(d.diff for d in diffs))
    assert sorted(rel) == pytest.approx(sorted(100 * d.relative for d in diffs))
