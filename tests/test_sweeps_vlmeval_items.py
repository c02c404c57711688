"""With VLMEvalKit: a sweep archives every item with the judge's own per-item score, and the fit uses them.

Runs only where VLMEvalKit is installed (``.venv-eval/bin/python -m pytest -m vlmeval
tests/test_sweeps_vlmeval_items.py``). A 4-image yes/no TSV is registered as a local dataset
(sockets blocked); answers are scripted per N, so the per-item correctness is known.
"""

from __future__ import annotations

import csv

import pytest

from conftest import POPE_COLORS

pytest.importorskip("vlmeval")
pytest.importorskip("pandas")  # the TinyPOPE fixture (conftest) writes its TSV with pandas

pytestmark = pytest.mark.vlmeval

COLORS = POPE_COLORS  # TinyPOPE (conftest): "Is the image <colour>?", Yes for green and yellow
RIGHT_FOR = {2: {"red", "green"}, 4: {"red", "green", "blue"}, 8: set(COLORS)}


def test_elastic_sweep_archives_judged_items(tmp_path, tiny_pope, monkeypatch, capsys):
    from fusion_vlm.cli import main
    from fusion_vlm.evaluation.items import read_items
    from fusion_vlm.evaluation.runner import Runner
    from fusion_vlm.model import FusionVLM

    def scripted(self, images, questions, *args, **kwargs):
        right = RIGHT_FOR[self.n_queries_used()]
        out = []
        for (q,) in questions:
            colour = next(c for c in COLORS if c in q)
            truth = colour in ("green", "yellow")
            out.append(["Yes" if truth == (colour in right) else "No"])
        return out

    monkeypatch.setattr(Runner, "answer", scripted)
    FusionVLM.from_config("tiny", ["fusion.max_queries=8", "fusion.n_queries=8"]).save_pretrained(tmp_path / "ck")
    sweep = tmp_path / "sweep"
    assert main(["sweep", "--checkpoint", str(tmp_path / "ck"), "--n-queries", "2", "4", "8", "--mode", "vqq",
                 "--data", "TinyPOPE", "--out", str(sweep), "--data-root", str(tiny_pope),
                 "--max-new-tokens", "2"]) == 0
    items = read_items(sweep / "scores.items.jsonl")
    assert len(items) == 12
    for it in items:
        colour = next(c for c in COLORS if c in it["question"])
        assert it["score"] == float(colour in RIGHT_FOR[it["n_queries"]]), it  # the judge's own verdict
        assert it["score_source"].endswith("_auxmatch.tsv:score") and it["answer"] in ("Yes", "No")
        assert it["prediction"] in ("Yes", "No")
    out = tmp_path / "fit"
    assert main(["fit", "--csv", str(sweep / "scores.csv"), "--out", str(out), "--no-plots", "--clusters", "1",
                 "--n-boot", "200"]) == 0
    assert "curves over items (12 item records)" in capsys.readouterr().out
    with open(out / "fits.csv") as fh:
        fits = {r["metric"]: r for r in csv.DictReader(fh)}
    assert fits["acc@TinyPOPE"]["interval_method"] == "items"
