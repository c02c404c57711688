"""Sweep bookkeeping (cells, resume, tidy CSV) and plain generation on the tiny model; no VLMEvalKit needed."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from fusion_vlm.evaluation.runner import GenerationSettings, Runner, answer_file, checkpoint_n_queries
from fusion_vlm.evaluation.sweep import (
    Cell,
    collect_scores,
    is_done,
    parse_checkpoints,
    plan_cells,
    run_sweep,
    score_path,
)

COLORS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from fusion_vlm.model import FusionVLM

    root = tmp_path_factory.mktemp("ckpt")
    model = FusionVLM.from_config("tiny")
    model.save_pretrained(root / "n8")
    model.config.fusion.n_queries = 2
    model.save_pretrained(root / "n2")
    return root / "n8", root / "n2"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    paths = []
    for c in COLORS:
        p = root / f"{c}.png"
        Image.new("RGB", (50, 40), c).save(p)
        paths.append(str(p))
    return paths


def test_plan_cells_modes_and_checkpoints():
    cells = plan_cells({8: "a8", 2: "a2"}, ["POPE", "MMStar"], ["vqq", "vq_ft", "vq"], {8: "f8", 2: "f2"})
    assert len(cells) == 12
    assert cells[0] == Cell("vqq", 2, "POPE", "a2") and cells[0].use_question
    ft = [c for c in cells if c.mode == "vq_ft"]
    assert {c.checkpoint for c in ft} == {"f8", "f2"} and not any(c.use_question for c in ft)
    assert {c.checkpoint for c in cells if c.mode == "vq"} == {"a8", "a2"}
    with pytest.raises(ValueError, match=r"vq_ft has no fine-tuned checkpoint for N=\[2\]"):
        plan_cells({8: "a8", 2: "a2"}, ["POPE"], ["vq_ft"], {8: "f8"})
    with pytest.raises(ValueError, match="needs at least one --ft-checkpoint"):
        plan_cells({8: "a8"}, ["POPE"], ["vq_ft"])
    with pytest.raises(ValueError, match="unknown mode"):
        plan_cells({8: "a8"}, ["POPE"], ["vqa"])
    with pytest.raises(ValueError, match="dataset name"):
        plan_cells({8: "a8"}, ["../x"], ["vqq"])


def test_parse_checkpoints(checkpoints, tmp_path):
    n8, n2 = checkpoints
    assert checkpoint_n_queries(n8) == 8 and checkpoint_n_queries(n2) == 2
    assert parse_checkpoints([str(n8), f"64={n2}"]) == {8: str(n8), 64: str(n2)}
    with pytest.raises(ValueError, match="two checkpoints for N=8"):
        parse_checkpoints([str(n8), f"8={n2}"])
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        parse_checkpoints([f"4={tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        parse_checkpoints([str(tmp_path)])


def test_runner_generates_per_image_and_writes_jsonl(checkpoints, images, tmp_path):
    runner = Runner(checkpoints[0], GenerationSettings(n_queries=4, use_question=False, max_new_tokens=3,
                                                       batch_size=2))
    answers = runner.answer(images, [["What colour?", "Sure?"], ["Q?"], ["Q?"]])
    assert [len(a) for a in answers] == [2, 1, 1] and all(isinstance(x, str) for a in answers for x in a)
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps({"image": p, "questions": ["Colour?"], "id": i}) + "\n"
                           for i, p in enumerate(images)))
    assert answer_file(runner, req, tmp_path / "out.jsonl") == 3
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == [0, 1, 2] and all(len(o["answers"]) == 1 for o in out)


def test_generate_command(checkpoints, images, capsys):
    from fusion_vlm.cli import main

    assert main(["generate", "--checkpoint", str(checkpoints[1]), "--image", images[0], "--question", "A?",
                 "--question", "B?", "--no-question", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line[:3] for line in out] == ["Q: ", "A: ", "Q: ", "A: "] and out[2] == "Q: B?"
    assert main(["generate", "--checkpoint", str(checkpoints[1]), "--image", "/no/such.png", "--question", "A?"]) == 2
    assert "image not found: /no/such.png" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(checkpoints[1]), "--image", images[0]]) == 2


def make_evaluator(images, calls, fail_on=None):
    """A real evaluation of the tiny model: yes/no questions about coloured images, accuracy in percent."""
    runners = {}

    def evaluate(cell, work_dir):
        calls.append((cell.mode, cell.n_queries, cell.dataset))
        if fail_on == (cell.mode, cell.n_queries, cell.dataset):
            raise RuntimeError("boom")
        key = (cell.checkpoint, cell.n_queries, cell.use_question)
        if key not in runners:
            runners[key] = Runner(cell.checkpoint, GenerationSettings(n_queries=cell.n_queries,
                                                                      use_question=cell.use_question,
                                                                      max_new_tokens=2))
        qs = [[f"Is the image {c}? Please answer yes or no."] for c in COLORS]
        answers = runners[key].answer(images, qs)
        acc = 100 * sum(a[0].strip().lower().startswith("yes") for a in answers) / len(answers)
        return {f"Overall@{cell.dataset}": acc, f"Answered@{cell.dataset}": 100.0}

    return evaluate


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_sweep_resume_and_csv(checkpoints, images, tmp_path):
    n8, n2 = checkpoints
    cells = plan_cells({8: str(n8), 2: str(n2)}, ["TinyA", "TinyB"], ["vqq", "vq_ft", "vq"],
                       {8: str(n8), 2: str(n2)})
    calls, logs = [], []
    csv_path = run_sweep(tmp_path, cells, make_evaluator(images, calls), log=logs.append)
    assert len(calls) == 12 and "12 cells, 0 already done, 12 to run" in logs[0]
    rows = _rows(csv_path)
    assert list(rows[0]) == ["metric", "mode", "n_queries", "score"] and len(rows) == 24
    assert {(r["mode"], r["n_queries"]) for r in rows} == {(m, n) for m in ("vqq", "vq_ft", "vq") for n in "82"}
    assert {r["metric"] for r in rows} == {"Overall@TinyA", "Overall@TinyB", "Answered@TinyA", "Answered@TinyB"}
    assert all(0 <= float(r["score"]) <= 100 for r in rows)
    first = rows.index(next(r for r in rows if r["metric"] == "Answered@TinyA"))
    assert [(r["mode"], r["n_queries"]) for r in rows[first:first + 6]] == [
        ("vqq", "8"), ("vqq", "2"), ("vq_ft", "8"), ("vq_ft", "2"), ("vq", "8"), ("vq", "2")]
    text = csv_path.read_text()
    from fusion_vlm.analysis.scaling import group_curves, load_scores_csv  # the reader of `fusion-vlm fit --csv`

    curves = group_curves(load_scores_csv(csv_path))
    assert len(curves) == 12 and list(curves[("Overall@TinyA", "vqq")][0]) == [2.0, 8.0]

    calls.clear()
    run_sweep(tmp_path, cells, make_evaluator(images, calls), log=logs.append)
    assert calls == [] and csv_path.read_text() == text

    score_path(tmp_path, cells[5]).unlink()
    assert not is_done(tmp_path, cells[5])
    run_sweep(tmp_path, cells, make_evaluator(images, calls), log=logs.append)
    assert calls == [(cells[5].mode, cells[5].n_queries, cells[5].dataset)] and csv_path.read_text() == text


def test_sweep_failure_keeps_other_cells(checkpoints, images, tmp_path):
    n8, _ = checkpoints
    cells = plan_cells({8: str(n8)}, ["TinyA", "TinyB"], ["vqq", "vq"])
    calls = []
    with pytest.raises(RuntimeError, match="boom"):
        run_sweep(tmp_path, cells, make_evaluator(images, calls, fail_on=("vqq", 8, "TinyA")), log=lambda s: None)
    assert len(calls) == 4
    done = [c for c in cells if is_done(tmp_path, c)]
    assert len(done) == 3 and cells[0] not in done
    assert len(collect_scores(tmp_path)) == 6  # the CSV was still written with the finished cells
    assert len(_rows(tmp_path / "scores.csv")) == 6
    calls.clear()
    run_sweep(tmp_path, cells, make_evaluator(images, calls), log=lambda s: None)
    assert calls == [("vqq", 8, "TinyA")]
