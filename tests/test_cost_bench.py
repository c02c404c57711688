"""Stage-bench report arithmetic and its join with a sweep CSV (``fusion-vlm fit --costs``)."""

from __future__ import annotations

import csv
import json

import pytest

from fusion_vlm.bench import BenchReport, BenchSetup, StageResult, _summaries, format_report, join_costs, \
    load_costs, speedup_ratio
from fusion_vlm.cli import main


def _report() -> BenchReport:
    setup = BenchSetup(n_values=(8, 64), vision_layers=2, fusion_layers=20, llm_layers=4)
    s = [StageResult("vision", None, 2.0, 3.0, 100.0, depth_scale=16.0),
         StageResult("merge", None, 0.5, 0.5, 10.0),
         StageResult("baseline LLM prefill", None, 10.0, 18.0, 1000.0, depth_scale=8.0),
         StageResult("fusion first question", 8, 3.0, 6.0, 200.0, depth_scale=1.0),
         StageResult("LLM prefill", 8, 0.5, 1.0, 40.0, depth_scale=8.0),
         StageResult("fusion first question", 64, 4.0, 6.0, 250.0, depth_scale=1.0),
         StageResult("LLM prefill", 64, 1.0, 2.0, 50.0, depth_scale=8.0)]
    report = BenchReport(vars(setup) | {"n_values": [8, 64]}, 100.0, s)
    for st in s:
        st.predicted_s = st.flops / 100.0
        st.ratio = st.wall_s / st.predicted_s
    _summaries(report, 1450)
    return report


def test_speedup_ratio_by_hand():
    r = speedup_ratio(_report(), 64)
    # measured 10 / (4 + 1) = 2; predicted 1000 / (250 + 50) = 3.33; ratio 0.6
    assert r["measured"] == pytest.approx(2.0) and r["predicted"] == pytest.approx(1000 / 300)
    assert r["ratio"] == pytest.approx(0.6)
    assert speedup_ratio(_report(), 64, "cpu_s")["measured"] == pytest.approx(18 / 8)


def test_ttft_rows_scale_each_stack_to_paper_depth():
    rows = {(t["path"], t["n_queries"]): t for t in _report().ttft}
    fused = rows[("fusion", 64)]
    assert fused["ttft_s"] == pytest.approx(2.0 + 0.5 + 4.0 + 1.0)
    assert fused["ttft_paper_depth_s"] == pytest.approx(2.0 * 16 + 0.5 + 4.0 + 1.0 * 8)
    assert fused["predicted_paper_depth_s"] == pytest.approx(1.0 * 16 + 0.1 + 2.5 + 0.5 * 8)
    assert rows[("baseline", 1450)]["ttft_paper_depth_s"] == pytest.approx(32 + 0.5 + 80)
    text = format_report(_report())
    assert "0.60" in text and "fused prefill vs baseline" in text


def _write(tmp_path):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(_report().to_json()))
    scores = tmp_path / "scores.csv"
    with open(scores, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["metric", "mode", "n_queries", "score"])
        for metric in ("vqa", "ocr"):
            for mode in ("vqq", "vq"):
                for n, sc in ((1, 0.3), (8, 0.5), (64, 0.6), (256, 0.65)):
                    w.writerow([metric, mode, n, sc + (0.01 if mode == "vqq" else 0)])
    return costs, scores


def test_join_keeps_only_measured_n(tmp_path):
    costs, _ = _write(tmp_path)
    table = load_costs(costs)
    assert table == {8: pytest.approx(2.0 * 16 + 0.5 + 3.0 + 0.5 * 8), 64: pytest.approx(44.5)}
    joined = join_costs([{"metric": "m", "mode": "a", "n_queries": n, "score": 1.0} for n in (1, 8, 64)], table)
    assert [(r["n_queries"], r["ttft_s"]) for r in joined] == [(8, table[8]), (64, table[64])]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_costs(bad)


def test_fit_costs_option(tmp_path, capsys):
    costs, scores = _write(tmp_path)
    out = tmp_path / "fit"
    assert main(["fit", "--csv", str(scores), "--out", str(out), "--costs", str(costs), "--n-boot", "0"]) == 0
    with open(out / "accuracy_vs_ttft.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 * 2  # metrics x modes x the two measured N
    assert [float(r["ttft_s"]) for r in rows if r["n_queries"] == "64"] == [pytest.approx(44.5)] * 4
    assert (out / "accuracy_vs_ttft.png").stat().st_size > 5000
    assert "N = [1, 256]" in capsys.readouterr().out
    assert main(["fit", "--csv", str(scores), "--out", str(out), "--costs", str(tmp_path / "none.json")]) != 0
