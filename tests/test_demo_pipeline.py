"""The CPU demo end to end at its ``--quick`` size, through the real command (slow: several minutes).

Checks the report's files and their contents against the results the run wrote, that the per-question
predictions agree with the summary JSONs, that a rerun skips every finished stage, and that the report's
question-fusion verdict agrees with the evaluation files.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_vlm.demo.config import load_demo_config
from fusion_vlm.demo.evaluate import items_path
from fusion_vlm.demo.pipeline import MODES
from fusion_vlm.demo.report import combo, decide, fmt
from fusion_vlm.demo.standins import VISION_PROBES
from fusion_vlm.demo.world import FAMILIES

pytestmark = pytest.mark.slow
QUICK = load_demo_config("quick")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "fusion_vlm.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_report_files_and_scores(demo_out):
    for name in ("report.md", "scores.csv", "fits.csv", "fits.json", "scaling.png", "scores.png", "diff_vqq_vq_ft.png",
                 "diff_vqq_vq.png", "timings.json", "config.yaml", "versions.json"):
        assert (demo_out / name).is_file() and (demo_out / name).stat().st_size > 0, name
    assert load_demo_config(demo_out / "config.yaml") == QUICK
    with (demo_out / "scores.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["metric", "mode", "n_queries", "score"]  # the paper appendix's columns
        rows = list(reader)
    # every (mode, N) of the sweep has its eval JSON and predictions, and the CSV repeats its figures
    for mode in MODES:
        for n in QUICK.n_values:
            path = demo_out / "eval" / f"{mode}_n{n}.json"
            scores = json.loads(path.read_text())
            assert set(scores) - {"all"} <= set(FAMILIES) and "existence" in scores
            recs = [json.loads(x) for x in items_path(path).read_text().splitlines()]
            assert [r["correct"] for r in recs] == scores["all"]["correct"]
            assert [r["image"] for r in recs] == scores["all"]["image"]
            for fam, v in scores.items():
                metric = {"description": "F1", "all": "Score"}.get(fam, "Accuracy")
                row = [r for r in rows if (r["metric"], r["mode"], int(r["n_queries"])) == (f"{metric}@{fam}", mode, n)]
                assert len(row) == 1 and float(row[0]["score"]) == pytest.approx(v["value"], abs=1e-3)
                fam_recs = [r for r in recs if fam in ("all", r["family"])]
                assert v["value"] == pytest.approx(100 * sum(r["score"] for r in fam_recs) / len(fam_recs))
    report = (demo_out / "report.md").read_text()
    timings = json.loads((demo_out / "timings.json").read_text())
    assert {"stage1 contrastive", "stage2 generation", "stage3 N-sweep fine-tunes", "evaluation"} <= set(timings)
    assert "## Verdicts" in report and "- (a) Weak scaling P(N) = (a/N)^b" in report and "- (c) Is the description" in report
    assert "## Mode differences at N <= 4, every family" in report
    assert "| existence | Accuracy | rule: commonest |" in report
    assert "## Run" in report and "| torch |" in report
    probe = json.loads((demo_out / "stage0/context_probe.json").read_text())
    standins = json.loads((demo_out / "stage0/standins.json").read_text())  # the shipped stand-ins, probed
    assert standins["source"].startswith("shipped") and "## Stand-ins" in report
    for key, name in VISION_PROBES.items():  # every probe row of the shipped stand-ins, with its figure
        assert f"| vision: {name} | {standins['probe']['vision'][key]:.1f} |" in report
    # the baselines: avgpool / random at every N, all_tokens once (in the report, not in the N-curve CSV)
    for mode in ("avgpool", "random"):
        for n in QUICK.n_values:
            assert json.loads((demo_out / "eval" / f"{mode}_n{n}.json").read_text())["all"]["n"] > 0
    assert "| existence | Accuracy | all_tokens |" in report and "all_tokens" not in {r["mode"] for r in rows}
    assert {r["mode"] for r in rows} >= {"avgpool", "random", "elastic", *MODES}
    assert set(probe) == {"answer", "evidence", "scene", "soft", "none"} and "| context | attribute |" in report
    assert f"| evidence | {probe['evidence']['attribute']:.1f} |" in report
    assert "| family | metric | mode | " + " | ".join(f"N={n}" for n in QUICK.n_values) + " | one setting |" in report


def test_rerun_skips_finished_stages(demo_out):
    before = {p: p.stat().st_mtime_ns for p in demo_out.rglob("model.safetensors")}
    proc = subprocess.run([sys.executable, "-m", "fusion_vlm.cli", "demo", "--quick", "--out", str(demo_out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done earlier, skipped") == 2 + 2 * len(QUICK.n_values)  # stages 1, 2 and 3
    assert before and before == {p: p.stat().st_mtime_ns for p in demo_out.rglob("model.safetensors")}


def test_report_question_fusion_verdict_matches_the_evaluation(demo_out):
    """The report's (b) line (vqq - vq_ft on all questions, mean over N <= 4, paired interval, and its verdict)
    agrees with the per-run evaluation JSONs. Model quality is a figure of the report, not a threshold here."""
    small = [n for n in QUICK.n_values if n <= QUICK.eval.small_n]
    load = lambda mode, n: json.loads((demo_out / "eval" / f"{mode}_n{n}.json").read_text())["all"]  # noqa: E731
    d = combo([load("vqq", n) for n in small], [load("vq_ft", n) for n in small], QUICK.eval.n_boot)
    (line,) = [x for x in (demo_out / "report.md").read_text().splitlines() if x.startswith("- (b)")]
    assert f"all {fmt(d, signed=True)} -> {decide(d)}" in line
