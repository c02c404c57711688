"""Sweeps keep their per-item raw material, and one checkpoint is swept over N (tiny models, no VLMEvalKit)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from fusion_vlm.cli import main
from fusion_vlm.evaluation.items import as_score, item_path, items_from_tables, read_items
from fusion_vlm.evaluation.runner import GenerationSettings, Runner
from fusion_vlm.evaluation.settings import EvalResult
from fusion_vlm.evaluation.sweep import elastic_checkpoints, items_path, plan_cells, run_sweep, score_path

COLORS = ["red", "green", "blue", "yellow", "black", "white"]


def test_items_from_vlmeval_like_tables():
    preds = [{"index": 3, "question": "Is it red?", "prediction": "Yes", "answer": "Yes", "image": "b64..."},
             {"index": 4, "question": "Is it blue?", "prediction": "no", "answer": "Yes", "category": "color"}]
    yorn = ("M_POPE_auxmatch.tsv", [{"index": 3, "score": "True"}, {"index": 4, "score": "False"}])
    summary = ("M_POPE_score.csv", [{"split": "Overall", "acc": 50.0}])  # no index: not per item
    items = items_from_tables(preds, [summary, yorn])
    assert [it["score"] for it in items] == [1.0, 0.0] and items[0]["index"] == "3"
    assert items[0]["score_source"] == "M_POPE_auxmatch.tsv:score" and "image" not in items[0]
    assert items[1]["category"] == "color" and items[1]["prediction"] == "no"
    # MCQ 'hit' and VQA 'eval_score'; a table with repeated indices (circular MCQ) is not read
    circ = ("M_X_result.tsv", [{"index": 3, "hit": 1}, {"index": 3, "hit": 0}, {"index": 4, "hit": 1}])
    vqa = ("M_X_results.tsv", [{"index": 3, "eval_score": 0.6}, {"index": 4, "eval_score": float("nan")}])
    items = items_from_tables(preds, [circ, vqa])
    assert [it["score"] for it in items] == [0.6, None] and items[1]["score_source"] == "M_X_results.tsv:eval_score"
    assert [it["score"] for it in items_from_tables(preds)] == [None, None]
    assert [as_score(x) for x in (True, "false", 1, "0.25", "n/a", np.bool_(True), np.float64(0.5))] == [
        1.0, 0.0, 1.0, 0.25, None, 1.0, 0.5]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny checkpoint with query slots for N <= 16 (its own N 16), and coloured images."""
    from fusion_vlm.model import FusionVLM

    root = tmp_path_factory.mktemp("elastic")
    model = FusionVLM.from_config("tiny", ["fusion.max_queries=16", "fusion.n_queries=16"])
    model.save_pretrained(root / "ckpt")
    images = []
    for c in COLORS:
        Image.new("RGB", (48, 40), c).save(root / f"{c}.png")
        images.append(str(root / f"{c}.png"))
    return root / "ckpt", images


def per_item_evaluator(images, used):
    """A real generation with the tiny model at the cell's N; per-item score = 'answer starts with a letter'."""
    def evaluate(cell, work_dir):
        runner = Runner(cell.checkpoint, GenerationSettings(n_queries=cell.n_queries, use_question=cell.use_question,
                                                            max_new_tokens=2))
        used.append((runner.n_queries_used(), cell.checkpoint))
        qs = [[f"Is the image {c}?"] for c in COLORS]
        answers = runner.answer(images, qs)
        items = [{"index": str(i), "question": q[0], "prediction": a[0], "answer": "yes",
                  "score": float(a[0][:1].isalpha())} for i, (q, a) in enumerate(zip(qs, answers))]
        # the score is the mean of the items, as a benchmark's accuracy; +1 keeps it > 0 for the log fit
        acc = 100 * (1 + sum(it["score"] for it in items)) / (1 + len(items))
        return EvalResult({f"Overall@{cell.dataset}": acc}, {"n_queries": cell.n_queries}, items)

    return evaluate


def test_one_checkpoint_swept_over_n_keeps_its_items(tiny, tmp_path):
    ckpt, images = tiny
    checkpoints = elastic_checkpoints([str(ckpt)], [4, 1, 16, 2])
    assert checkpoints == {1: str(ckpt), 2: str(ckpt), 4: str(ckpt), 16: str(ckpt)}
    cells = plan_cells(checkpoints, ["TinyC"], ["vqq"])
    used = []
    csv_path = run_sweep(tmp_path, cells, per_item_evaluator(images, used), log=lambda s: None)
    assert used == [(n, str(ckpt)) for n in (1, 2, 4, 16)]  # one model, every N
    for cell in cells:
        recs = [json.loads(x) for x in items_path(tmp_path, cell).read_text().splitlines()]
        assert [(r["mode"], r["n_queries"], r["dataset"], r["index"]) for r in recs] == [
            ("vqq", cell.n_queries, "TinyC", str(i)) for i in range(len(COLORS))]
        assert all(r["question"].startswith("Is the image") and isinstance(r["prediction"], str) for r in recs)
    gathered = read_items(item_path(csv_path))
    assert len(gathered) == 4 * len(COLORS) and read_items(tmp_path) == gathered  # the sweep folder reads too
    # rerun: nothing evaluated again, the items stay
    used.clear()
    run_sweep(tmp_path, cells, per_item_evaluator(images, used), log=lambda s: None)
    assert used == [] and len(read_items(item_path(csv_path))) == 4 * len(COLORS)
    assert score_path(tmp_path, cells[0]).is_file()


def test_elastic_checkpoint_refuses_n_beyond_its_codebook(tiny, tmp_path):
    ckpt, _ = tiny
    with pytest.raises(ValueError, match=r"--n-queries 32: checkpoint '.*' has query slots for N <= 16"):
        elastic_checkpoints([str(ckpt)], [1, 32])
    with pytest.raises(ValueError, match="takes one checkpoint directory"):
        elastic_checkpoints([str(ckpt), str(ckpt)], [1, 2])
    with pytest.raises(ValueError, match="takes one checkpoint directory"):
        elastic_checkpoints([f"4={ckpt}"], [1, 2])
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        elastic_checkpoints([str(tmp_path / "nope")], [1])


def test_sweep_command_checks_elastic_input_before_any_evaluation(tiny, capsys):
    ckpt, _ = tiny
    assert main(["sweep", "--checkpoint", str(ckpt), "--n-queries", "1", "64", "--data", "X", "--mode", "vqq"]) == 2
    assert "has query slots for N <= 16 (fusion.max_queries)" in capsys.readouterr().err


def test_fit_bootstraps_a_tiny_sweep_over_its_items(tiny, tmp_path, capsys):
    """sweep -> scores.csv + scores.items.jsonl -> `fusion-vlm fit` picks the item bootstrap by itself."""
    ckpt, images = tiny
    cells = plan_cells(elastic_checkpoints([str(ckpt)], [1, 2, 4]), ["TinyC"], ["vqq", "vq"])

    def evaluate(cell, work_dir):  # items right on the first N + 2 colours: accuracy grows with N
        right = min(len(COLORS), cell.n_queries + 2)
        items = [{"index": c, "score": float(i < right)} for i, c in enumerate(COLORS)]
        return EvalResult({f"Overall@{cell.dataset}": 100 * right / len(COLORS)}, {}, items)

    csv_path = run_sweep(tmp_path / "sweep", cells, evaluate, log=lambda s: None)
    out = tmp_path / "fit"
    assert main(["fit", "--csv", str(csv_path), "--out", str(out), "--no-plots", "--clusters", "1",
                 "--n-boot", "200"]) == 0
    assert "2 curves over items (36 item records)" in capsys.readouterr().out
    with open(out / "fits.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["interval_method"] for r in rows} == {"items"}
