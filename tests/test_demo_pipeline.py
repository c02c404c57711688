"""The CPU demo end to end at its ``--quick`` size, through the real command (slow: several minutes).

Checks the report's files and their contents against the results the run wrote, that a rerun skips every
finished stage, and that the report's yes/no verdict agrees with the evaluation files.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_vlm.demo.pipeline import MODES, SIZES, demo_world
from fusion_vlm.demo.report import YES_NO_MARGIN
from fusion_vlm.demo.world import FAMILIES, majority_baseline, make_examples

pytestmark = pytest.mark.slow
QUICK = SIZES["quick"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "fusion_vlm.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_report_files_and_scores(demo_out):
    for name in ("report.md", "scores.csv", "fits.csv", "scaling.png", "diff_vqq_vq_ft.png", "diff_vqq_vq.png",
                 "timings.json"):
        assert (demo_out / name).is_file() and (demo_out / name).stat().st_size > 0, name
    with (demo_out / "scores.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["metric", "mode", "n_queries", "score"]  # the paper appendix's columns
        rows = list(reader)
    # every (mode, N) of the sweep has its eval JSON, and the CSV repeats its numbers
    for mode in MODES:
        for n in QUICK.n_values:
            scores = json.loads((demo_out / "eval" / f"{mode}_n{n}.json").read_text())
            assert set(scores) - {"all"} <= set(FAMILIES) and "existence" in scores
            for fam, v in scores.items():
                row = [r for r in rows if (r["metric"], r["mode"], int(r["n_queries"])) == (f"Accuracy@{fam}", mode, n)]
                assert len(row) == 1 and float(row[0]["score"]) == pytest.approx(v["accuracy"], abs=1e-3)
    report = (demo_out / "report.md").read_text()
    timings = json.loads((demo_out / "timings.json").read_text())
    assert {"stage1 contrastive", "stage2 generation", "stage3 N-sweep fine-tunes", "evaluation"} <= set(timings)
    assert "## What the numbers say" in report and "(a) Weak scaling" in report
    assert "## Mode differences at N <= 4, every family" in report and "- Yes/no ('existence')" in report
    probe = json.loads((demo_out / "stage0/llm/context_probe.json").read_text())
    assert set(probe) == {"answer", "evidence", "scene", "soft", "none"} and "| context | attribute |" in report
    assert f"| evidence | {probe['evidence']['attribute']:.1f} |" in report
    assert "| family | mode | " + " | ".join(f"N={n}" for n in QUICK.n_values) + " |" in report


def test_rerun_skips_finished_stages(demo_out):
    before = {p: p.stat().st_mtime_ns for p in demo_out.rglob("model.safetensors")}
    proc = subprocess.run([sys.executable, "-m", "fusion_vlm.cli", "demo", "--quick", "--out", str(demo_out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done earlier, skipped") == 2 + 2 * len(QUICK.n_values)  # stages 1, 2 and 3
    assert before and before == {p: p.stat().st_mtime_ns for p in demo_out.rglob("model.safetensors")}


def test_report_yes_no_verdict_matches_the_evaluation(demo_out):
    """The report's yes/no line (lowest accuracy over N per mode, and whether every model beats the majority
    by more than the margin) agrees with the per-run evaluation JSONs. Model quality is a figure of the
    report, not a threshold of this test: at this size, two standard errors on yes/no are about 9 points."""
    cfg = demo_world(seed=0)
    baseline = 100 * majority_baseline(make_examples("train", QUICK.train_images, cfg),
                                       make_examples("test", QUICK.test_images, cfg))["existence"]
    worst = {mode: min((json.loads((demo_out / "eval" / f"{mode}_n{n}.json").read_text())["existence"]["accuracy"], n)
                       for n in QUICK.n_values) for mode in MODES}
    (line,) = [x for x in (demo_out / "report.md").read_text().splitlines() if x.startswith("- Yes/no")]
    assert f"majority answer ({baseline:.1f})" in line
    for mode, (acc, n) in worst.items():
        assert f"{mode} {acc:.1f} (N={n})" in line, (mode, line)
    every = all(acc > baseline + YES_NO_MARGIN for acc, _ in worst.values())
    assert line.endswith(f"? {'yes' if every else 'no'}.")
