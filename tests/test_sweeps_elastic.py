"""One elastic model for every N: nested query slots, the presets, and the demo's elastic-vs-per-N report."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from fusion_vlm.config import load_model_config
from fusion_vlm.fusion import FusionModule


@pytest.fixture(scope="module")
def fusion():
    torch.manual_seed(0)
    return FusionModule(load_model_config("tiny").fusion).eval()


def test_n_slots_are_the_first_codebook_rows(fusion):
    """slots(n) = codebook rows 0..n-2, then <eos>: a prefix of every larger group (not the last rows)."""
    top = fusion.cfg.max_queries
    big = fusion.slots(top)
    for n in (1, 2, 5, top):
        s = fusion.slots(n)
        assert torch.equal(s[:-1], big[: n - 1]) and torch.equal(s[-1], fusion.eos_slot)
    assert torch.equal(big[:-1], fusion.queries)  # the whole codebook, in order


@torch.no_grad()
def test_fused_tokens_of_small_n_are_a_prefix_of_large_n(fusion):
    """Causal fusion + nested slots: the first n-1 fused tokens of an N-slot group equal those of an n-slot one."""
    vision = [torch.randn(7, fusion.cfg.hidden_size)]
    questions = [[[320, 1125, 539, 518]]]
    eight = fusion(vision, questions, n_queries=8, n_later=1).groups[0][0]
    for n in (2, 4):
        small = fusion(vision, questions, n_queries=n, n_later=1).groups[0][0]
        assert small.shape[0] == n
        torch.testing.assert_close(small[:-1], eight[: n - 1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(small[-1], eight[n - 1])  # <eos> sits at another position


@pytest.mark.parametrize("preset, init", [("stage2_elastic", "runs/stage1_contrastive/final"),
                                          ("stage3_elastic", "runs/stage2_generation/final")])
def test_elastic_presets(preset, init):
    from fusion_vlm.training.config import load_train_config

    cfg = load_train_config(preset)
    cfg.validate()
    paper = load_model_config("paper")
    evaluated = [768, 512, 384, 256, 128, 64, 32, 16, 8, 1]  # the paper's N (DESIGN.md section 2)
    assert sorted(cfg.n_queries_choices) == sorted(evaluated) and cfg.init_from == init
    assert cfg.n_queries == max(evaluated) == paper.fusion.max_queries and cfg.n_queries_later is None
    assert (cfg.micro_batch_size, cfg.grad_accum, cfg.optim.lr) == (5, 64, 2e-5)
    assert cfg.data.fraction == (1.0 if preset == "stage2_elastic" else 0.1)


def _fam(correct, image):
    return {"accuracy": 100 * float(np.mean(correct)), "n": len(correct), "correct": list(correct),
            "image": list(image)}


def test_demo_report_elastic_vs_per_n(tmp_path):
    """The report's elastic rows: paired image-bootstrap intervals, one row per (family, N), items file."""
    from fusion_vlm.demo.report import elastic_table, item_records, write_report
    from fusion_vlm.evaluation.items import item_path, read_items

    rng = np.random.default_rng(0)
    image = np.repeat(np.arange(60), 2)  # 60 test images, 2 questions each
    ns = [1, 4, 16]
    results = {}
    for n, p in zip(ns, (0.55, 0.65, 0.75)):
        base = (rng.random(120) < p).astype(int)
        for mode in ("vqq", "vq_ft", "vq"):
            results[(mode, n)] = {"attribute": _fam(base, image), "all": _fam(base, image)}
        results[("elastic", n)] = {"attribute": _fam(base, image), "all": _fam(1 - base, image)}
    rows = elastic_table(results, ns)
    assert rows[0] == "| family | N | per-N (vqq) | elastic | elastic - per-N |" and len(rows) == 2 + 2 * len(ns)
    acc = results[("vqq", 1)]["attribute"]["accuracy"]
    same = rows[2].split(" | ")
    assert same[:2] == ["| attribute", "1"] and same[4] == "+0.0 [+0.0, +0.0] |"  # identical answers
    assert same[2] == same[3] and same[2].startswith(f"{acc:.1f} [")
    lo, hi = (float(x) for x in same[2].split("[")[1].rstrip("]").split(", "))
    assert lo < acc < hi and hi - lo < 30
    flipped = rows[2 + len(ns)].split(" | ")  # 'all': elastic answers every question the other way
    d = float(flipped[4].split(" ")[0])
    assert d == pytest.approx(100 - 2 * acc, abs=0.06)

    recs = item_records(results)
    assert len(recs) == 4 * len(ns) * 2 * 120 and {r["group"] for r in recs} == set(range(60))

    class Size:
        train_images, test_images = 10, 60

    report = write_report(tmp_path, results, {"attribute": 0.5}, Size, {"stage3 N-sweep fine-tunes": 60.0},
                          {"none": {"attribute": 10.0}})
    text = report.read_text()
    assert "## Elastic vs per-N" in text and "\n".join(rows) in text and "| attribute | +" in text
    with open(tmp_path / "scores.csv") as fh:
        assert {r["mode"] for r in csv.DictReader(fh)} == {"vqq", "vq_ft", "vq", "elastic"}
    assert len(read_items(item_path(tmp_path / "scores.csv"))) == len(recs)
    assert "(a) Weak scaling" in text and "of 6 (metric, mode) curves" in text  # paper modes only
