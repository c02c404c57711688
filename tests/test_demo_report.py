"""The demo report on constructed results (no training): intervals, tables, verdict rules, per-item files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusion_vlm.demo.evaluate import evaluate_to, items_path
from fusion_vlm.demo.report import (combo, difference_table, fit_curves, long_rows, score_table, verdicts,
                                    write_report)
from fusion_vlm.demo.scoring import family_scores
from fusion_vlm.demo.world import QA, Example

IMAGES = 40  # test images, 2 questions each per family


def _fam(correct, fam="attribute"):
    """A family result from 0/1 (or graded, for descriptions) per-question scores, 2 questions per image."""
    recs = [{"family": fam, "image": k // 2, "correct": int(c >= 1), "score": float(c)} for k, c in enumerate(correct)]
    return family_scores(recs)


def _rate(p, n=2 * IMAGES, shift=0):
    """n 0/1 scores with round(p * n) ones, spread over the images."""
    k = round(p * n)
    return list(np.roll([1] * k + [0] * (n - k), shift))


def test_combo_point_and_interval_by_hand():
    a = _fam([1, 1, 0, 0] * (IMAGES // 2))["attribute"]  # 50 %
    point, lo, hi = combo([a])
    assert point == 50.0 and lo < 50 < hi
    # a paired difference of a result with itself is exactly 0 in every replicate
    assert combo([a], [a]) == (0.0, 0.0, 0.0)
    # constant scores: no spread
    assert combo([_fam([1] * 2 * IMAGES)["attribute"]]) == (100.0, 100.0, 100.0)
    # mean over two rows minus one row: (50 + 100) / 2 - 50 = 25
    assert combo([a, _fam([1] * 2 * IMAGES)["attribute"]], [a])[0] == pytest.approx(25.0)
    # per-question scores missing (an F1 family without them): no interval
    assert combo([{"accuracy": 0.0, "f1": 30.0, "correct": [0, 0], "image": [0, 1]}]) is None


def _results(vqq_rates, vq_ft_rates, ns=(1, 4, 16)):
    out = {}
    for mode, rates in (("vqq", vqq_rates), ("vq_ft", vq_ft_rates)):
        for n, p in zip(ns, rates):
            res = _fam(_rate(p))
            res.update({k: v for k, v in _fam(_rate(p / 2), "description").items() if k == "description"})
            out[(mode, n)] = res
    return out


def test_verdict_b_question_fusion_from_paired_intervals():
    yes = verdicts(_results((0.9, 0.9, 0.9), (0.3, 0.3, 0.3)), {}, {})
    (line,) = [x for x in yes if x.startswith("(b)")]
    # attribute: 90 - 30 = +60 at N = 1 and 4 (N <= 4); far outside the noise of 80 questions
    assert "mean over N in [1, 4]" in line and "attribute +60.0 [" in line and "attribute +60.0" in line
    assert line.count("-> yes") == 2  # all and attribute (reading absent)
    (line,) = [x for x in verdicts(_results((0.3, 0.3, 0.3), (0.9, 0.9, 0.9)), {}, {}) if x.startswith("(b)")]
    assert "attribute -60.0 [" in line and line.count("-> no") == 2
    same = _results((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    (line,) = [x for x in verdicts(same, {}, {}) if x.startswith("(b)")]
    assert "attribute +0.0 [+0.0, +0.0] -> not distinguishable from 0" in line


def test_verdict_a_power_law_rule():
    # P = 20, 40, 80 % at N = 1, 4, 16: exactly (a/N)^b with b = -0.5 (x2 per x4 in N), R² = 1
    res = {("vqq", n): _fam(_rate(p)) for n, p in zip((1, 4, 16), (0.2, 0.4, 0.8))}
    res.update({("vq", n): _fam(_rate(0.5)) for n in (1, 4, 16)})  # flat
    res.update({("random", n): res[("vqq", n)] for n in (1, 4, 16)})  # a mode beyond the paper's
    curves, fits, ivs = fit_curves(res, n_boot=500)
    f = fits[("Accuracy@attribute", "vqq")]
    assert f.b == pytest.approx(-0.5, abs=1e-6) and f.r2 == pytest.approx(1.0)
    assert ivs[("Accuracy@attribute", "vqq")].b[1] < 0
    # the flat curve: the same items at every N, so every replicate has b = 0: the interval holds 0
    assert ivs[("Accuracy@attribute", "vq")].b == pytest.approx((0.0, 0.0), abs=1e-12)
    (line,) = [x for x in verdicts(res, fits, ivs) if x.startswith("(a)")]
    assert "partly: 2 of 4 (metric, mode) curves of the paper's modes" in line  # vqq's attribute and all, not vq's
    assert "Accuracy@attribute vqq: b=-0.500" in line and " vq:" not in line
    assert "Other modes: 2 of 2 curves (random)" in line


def test_verdict_c_description_and_shortcut_line():
    res = {("vqq", n): {**_fam(_rate(0.5)), **{k: v for k, v in _fam([0.5] * 2 * IMAGES, "description").items()
                                                if k == "description"}} for n in (1, 4)}
    res.update({("vq", n): {**_fam(_rate(0.5)), **{k: v for k, v in _fam([0.0] * 2 * IMAGES, "description").items()
                                                   if k == "description"}} for n in (1, 4)})
    rules = {"majority": {"attribute": _fam(_rate(0.2))["attribute"]},
             "commonest": {"attribute": _fam(_rate(0.9))["attribute"]}}
    lines = verdicts(res, {}, {}, rules)
    (c,) = [x for x in lines if x.startswith("(c)")]
    assert "yes (1 of 2 modes)" in c and "vqq 50.0 [50.0, 50.0]" in c and "vq 0.0 [0.0, 0.0]" in c
    (s,) = [x for x in lines if x.startswith("Shortcuts")]
    assert "attribute: 0 of 4 (best rule 'commonest' 90.0)" in s


def test_tables_metrics_single_n_modes_and_rules():
    res = _results((0.5, 0.6, 0.7), (0.4, 0.4, 0.4))
    res[("all_tokens", 144)] = res[("vqq", 16)]  # a mode run at one setting only
    rules = {"majority": {"attribute": _fam(_rate(0.2))["attribute"]}}
    rows = score_table(res, rules, n_boot=200)
    assert rows[0] == "| family | metric | mode | N=1 | N=4 | N=16 | one setting |"
    (single,) = [r for r in rows if r.startswith("| attribute | Accuracy | all_tokens |")]
    assert single.startswith("| attribute | Accuracy | all_tokens | - | - | - | 70.0 [")
    assert single.endswith("(N=144) |")
    (rule,) = [r for r in rows if "rule: majority" in r and r.startswith("| attribute")]
    assert rule.startswith("| attribute | Accuracy | rule: majority | - | - | - | 20.0 [")
    assert any(r.startswith("| description | F1 | vqq | 25.0 [") for r in rows)
    metrics = {r["metric"] for r in long_rows(res)}
    assert metrics == {"Accuracy@attribute", "F1@description", "Score@all"}
    res[("all_tokens_nolabel", None)] = res[("vqq", 4)]  # a mode without N (all merged tokens)
    rows = score_table(res, rules, n_boot=200)
    (none,) = [r for r in rows if r.startswith("| attribute | Accuracy | all_tokens_nolabel |")]
    assert none.endswith("(all tokens) |") and " 60.0 [" in none
    assert {r["metric"] for r in long_rows(res)} == metrics
    diff = difference_table(res, [1, 4, 16])
    assert diff[2].startswith("| attribute | +15.0 [") and diff[2].endswith("| - |")  # (10 + 20) / 2; no vq


class _FakeModel:
    """generate() answers every question with a fixed rule; counts calls."""

    calls = 0

    def eval(self):
        return self

    def generate(self, images, questions, **kw):
        _FakeModel.calls += 1
        return [["red" if q.startswith("What colour") else "yes" if q.startswith("Is") else "red square top left"
                 for q in qs] for qs in questions]


def test_per_item_predictions_match_the_summary(tmp_path):
    exs = [Example(f"test-{i}", None, [QA("attribute", "What colour is the shape in the centre?", c),
                                        QA("existence", "Is there a red circle?", e),
                                        QA("description", "Describe the image.", "red square top left, letter k top")])
           for i, (c, e) in enumerate([("red", "yes"), ("blue", "no"), ("red", "no")])]
    path = tmp_path / "eval" / "vqq_n4.json"
    scores = evaluate_to(path, _FakeModel, exs, 4, True, batch_images=2)
    recs = [json.loads(x) for x in items_path(path).read_text().splitlines()]
    assert json.loads(path.read_text()) == scores and len(recs) == scores["all"]["n"] == 9
    assert [r["family"] for r in recs] == ["attribute"] * 3 + ["existence"] * 3 + ["description"] * 3
    assert [r["correct"] for r in recs] == scores["all"]["correct"] == [1, 0, 1, 1, 0, 0, 0, 0, 0]
    assert [r["image"] for r in recs] == scores["all"]["image"] == [0, 1, 2] * 3
    assert recs[1] == {"family": "attribute", "image": 1, "image_id": "test-1", "correct": 0, "score": 0.0,
                       "question": "What colour is the shape in the centre?", "prediction": "red", "answer": "blue"}
    # description: F1 of 1 item against 2 = 2/3, reported as the family's value; exact match 0
    assert scores["description"]["value"] == pytest.approx(200 / 3) and scores["description"]["accuracy"] == 0.0
    assert [r["score"] for r in recs[6:]] == pytest.approx([2 / 3] * 3) == scores["description"]["score"]
    for fam in ("attribute", "existence", "description"):
        fam_recs = [r for r in recs if r["family"] == fam]
        assert scores[fam]["value"] == pytest.approx(100 * np.mean([r["score"] for r in fam_recs]))
    assert scores["all"]["value"] == pytest.approx(100 * np.mean([r["score"] for r in recs]))
    calls = _FakeModel.calls
    assert evaluate_to(path, _FakeModel, exs, 4, True) == scores and _FakeModel.calls == calls  # cached


class _RecordingModel(_FakeModel):
    """Answers each question with its own text and records (questions, max_new_tokens) per call."""

    seen = []

    def generate(self, images, questions, **kw):
        _RecordingModel.seen.append((questions, kw["max_new_tokens"]))
        return [[f"{q} -> {kw['max_new_tokens']}" for q in qs] for qs in questions]


def test_descriptions_get_their_own_generate_call_with_the_long_budget():
    from fusion_vlm.demo.evaluate import evaluate

    exs = [Example("test-0", None, [QA("existence", "Is there a red circle?", "yes"),
                                    QA("description", "Describe the image.", "x"),
                                    QA("counting", "How many circles are there?", "2")]),
           Example("test-1", None, [QA("attribute", "What shape is in the centre?", "circle")])]
    preds = []
    _RecordingModel.seen = []
    evaluate(_RecordingModel(), exs, 4, True, batch_images=2, max_new_tokens=96, predictions=preds,
             short_new_tokens=8)
    assert _RecordingModel.seen == [
        ([["Is there a red circle?", "How many circles are there?"], ["What shape is in the centre?"]], 8),
        ([["Describe the image."]], 96)]
    # every prediction comes back to its own question
    assert all(r["prediction"] == f"{r['question']} -> {96 if r['family'] == 'description' else 8}" for r in preds)
    assert sorted(r["question"] for r in preds) == sorted(qa.question for ex in exs for qa in ex.qas)
    _RecordingModel.seen = []
    evaluate(_RecordingModel(), exs, 4, True, batch_images=2, max_new_tokens=48)  # short budget: the same
    assert [k for _, k in _RecordingModel.seen] == [48, 48]


def test_write_report_sections(tmp_path):
    from types import SimpleNamespace

    res = _results((0.5, 0.6, 0.7), (0.4, 0.4, 0.4))
    res.update({("elastic", n): res[("vqq", n)] for n in (1, 4, 16)})
    res[("all_tokens", None)] = res[("vqq", 16)]
    rules = {"majority": {"attribute": _fam(_rate(0.2))["attribute"]}}
    cfg = SimpleNamespace(name="t", seed=3, train_images=10, test_images=IMAGES,
                          eval=SimpleNamespace(n_boot=200, small_n=4))
    path = write_report(tmp_path, res, rules, cfg, {"world": 1.0}, {"answer": {"attribute": 100.0}})
    md = path.read_text()
    for head in ("## Run", "## Scores on the test split, with 95 % intervals", "## Verdicts",
                 "## Scaling-law fits (log space, BFGS) with 95 % intervals", "## Elastic vs per-N"):
        assert head in md, head
    assert "Seed 3" in md and "| torch |" in md and "| git_commit |" in md
    assert "| attribute | Accuracy | all_tokens | - | - | - | 70.0 [" in md
    assert "of 6 (metric, mode) curves of the paper's modes" in md and "Other modes: " in md
    ver = json.loads((tmp_path / "versions.json").read_text())
    assert ver["seed"] == 3 and ver["python"].count(".") == 2
    for name in ("scores.png", "scaling.png", "fits.csv", "fits.json", "scores.items.jsonl", "diff_vqq_vq_ft.png"):
        assert (tmp_path / name).stat().st_size > 0, name
