"""End to end through the real VLMEvalKit, offline: tiny checkpoint, tiny benchmark TSVs, `fusion-vlm eval`/`sweep`.

Runs only where the eval extra is installed (``bash scripts/install_eval.sh``;
``.venv-eval/bin/python -m pytest -m vlmeval``). Sockets are blocked. The tiny
TSVs get new names registered as local files, which bypasses VLMEvalKit's
download/MD5 step here in the test only. A random tiny model answers garbage:
the checks are on the pipeline's files and columns, not on the scores.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import socket
import ssl

import pytest

pytest.importorskip("vlmeval")
pd = pytest.importorskip("pandas")

from fusion_vlm.cli import main  # noqa: E402
from fusion_vlm.evaluation.registry import entry_name, import_vlmeval  # noqa: E402

pytestmark = pytest.mark.vlmeval

COLORS = ["red", "green", "blue", "yellow"]


def _png_b64(color: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_benchmarks(root):
    """One TSV per prompt kind, in VLMEvalKit's format, with base64 PNG images."""
    imgs = [_png_b64(c) for c in COLORS]
    rows = {
        "TinyPOPE": [dict(index=i, image=imgs[i], question=f"Is the image {c}?", answer="Yes" if i % 2 else "No",
                          category="adversarial" if i < 2 else "random") for i, c in enumerate(COLORS)],
        "TinyMCQ": [dict(index=i, image=imgs[i], question="What colour is the image?", A=COLORS[i], B="purple",
                         C="black", answer="A", category="colour") for i in range(4)],
        "TinyOCRVQA": [dict(index=i, image=imgs[i], question="What colour is it?", answer=c)
                       for i, c in enumerate(COLORS)],
        "TinyCOCO": [dict(index=i, image=imgs[i], answer=repr([f"a plain {c} image", f"{c} square"]))
                     for i, c in enumerate(COLORS)],
    }
    for name, data in rows.items():
        pd.DataFrame(data).to_csv(root / f"{name}.tsv", sep="\t", index=False)
    return {name: len(data) for name, data in rows.items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny checkpoints, trained (well, initialised) with N=8 and N=2."""
    from fusion_vlm.model import FusionVLM

    root = tmp_path_factory.mktemp("ckpt")
    model = FusionVLM.from_config("tiny")
    model.save_pretrained(root / "tiny_n8")
    model.config.fusion.n_queries = 2
    model.save_pretrained(root / "tiny_n2")
    return root / "tiny_n8", root / "tiny_n2"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A fresh LMUData with the tiny benchmarks, registered as local datasets; network blocked."""
    import_vlmeval()
    from vlmeval.dataset.image_caption import ImageCaptionDataset
    from vlmeval.dataset.image_vqa import ImageVQADataset
    from vlmeval.dataset.image_yorn import ImageYORNDataset

    def no_network(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("PRED_FORMAT", "tsv")
    lmu = tmp_path / "LMUData"
    lmu.mkdir()
    sizes = _write_benchmarks(lmu)
    # test-only bypass of the download/MD5 step: empty URL = local TSV, no checksum
    monkeypatch.setitem(ImageYORNDataset.DATASET_URL, "TinyPOPE", "")
    monkeypatch.setitem(ImageVQADataset.DATASET_URL, "TinyOCRVQA", "")
    monkeypatch.setitem(ImageCaptionDataset.DATASET_URL, "TinyCOCO", "")
    return lmu, sizes  # TinyMCQ is an unknown name with A/B columns: VLMEvalKit's Custom MCQ


def _read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_import_vlmeval_restores_default_ssl_context():
    before = ssl._create_default_https_context
    import_vlmeval()
    assert ssl._create_default_https_context is before


def test_eval_command_runs_vlmeval_inference_and_scoring(checkpoints, offline, tmp_path):
    lmu, sizes = offline
    work = tmp_path / "work"
    ckpt8 = checkpoints[0]
    rc = main(["eval", "--checkpoint", str(ckpt8), "--data", *sizes, "--n-queries", "4", "--mode", "vqq", "vq",
               "--work-dir", str(work), "--data-root", str(lmu), "--max-new-tokens", "4", "--batch-size", "3"])
    assert rc == 0
    for mode in ("vqq", "vq"):
        name = entry_name(ckpt8, 4, mode)
        d = work / name
        for ds, n in sizes.items():
            pred = pd.read_csv(d / f"{name}_{ds}.tsv", sep="\t")
            assert sorted(pred["index"]) == list(range(n)) and pred["prediction"].notna().all()
        pope = pd.read_csv(d / f"{name}_TinyPOPE_score.csv")
        assert {"split", "Overall", "acc", "precision", "recall"} <= set(pope.columns)
        assert "Overall" in set(pope["split"])
        assert pd.read_csv(d / f"{name}_TinyPOPE_auxmatch.tsv", sep="\t")["extracted"].isin(
            ["Yes", "No", "Unknown"]).all()
        mcq = pd.read_csv(d / f"{name}_TinyMCQ_acc.csv")
        assert {"split", "Overall"} <= set(mcq.columns) and 0 <= mcq["Overall"].iloc[0] <= 1
        vqa = pd.read_csv(d / f"{name}_TinyOCRVQA_acc.csv")
        assert 0 <= vqa["Overall"].iloc[0] <= 100
        coco = json.loads((d / f"{name}_TinyCOCO_score.json").read_text())
        assert {"Bleu", "ROUGE_L", "CIDEr"} <= set(coco) and len(coco["Bleu"]) == 4
        ours = json.loads((d / "TinyMCQ.fusion_metrics.json").read_text())
        assert ours["entry"]["mode"] == mode and ours["entry"]["n_queries"] == 4
        assert (ours["setup"]["mode"], ours["setup"]["n_queries"], ours["setup"]["max_new_tokens"]) == (mode, 4, 4)
        assert ours["metrics"]["Overall@TinyMCQ"] == pytest.approx(100 * mcq["Overall"].iloc[0])
    rows = _read_csv(work / "scores.csv")
    assert list(rows[0]) == ["metric", "mode", "n_queries", "score"]
    got = {(r["metric"], r["mode"], r["n_queries"]) for r in rows}
    for mode in ("vqq", "vq"):
        for metric in ("Overall@TinyPOPE", "acc@TinyPOPE", "Overall@TinyMCQ", "Overall@TinyOCRVQA",
                       "BLEU-1@TinyCOCO", "BLEU-4@TinyCOCO", "ROUGE-L@TinyCOCO", "CIDEr@TinyCOCO"):
            assert (metric, mode, "4") in got
    assert all(0 <= float(r["score"]) <= 100 or "CIDEr" in r["metric"] for r in rows)


def test_eval_per_sample_path_and_bad_dataset(checkpoints, offline, tmp_path, capsys, monkeypatch):
    import os

    lmu, sizes = offline
    monkeypatch.delenv("LMUData", raising=False)
    work = tmp_path / "work1"
    # batch size 1: VLMEvalKit's own per-sample loop calls generate_inner
    assert main(["eval", "--checkpoint", str(checkpoints[1]), "--data", "TinyMCQ", "--work-dir", str(work),
                 "--data-root", str(lmu), "--max-new-tokens", "3", "--batch-size", "1"]) == 0
    name = entry_name(checkpoints[1], None, "vqq")
    assert len(pd.read_csv(work / name / f"{name}_TinyMCQ.tsv", sep="\t")) == sizes["TinyMCQ"]
    assert [r["n_queries"] for r in _read_csv(work / "scores.csv")] == ["2"]  # N read from the checkpoint
    assert "LMUData" not in os.environ  # --data-root is set for the run only
    assert main(["eval", "--checkpoint", str(checkpoints[1]), "--data", "NoSuchSet", "--work-dir", str(work),
                 "--data-root", str(lmu)]) == 2
    assert "NoSuchSet" in capsys.readouterr().err


def test_sweep_resumes_and_writes_tidy_csv(checkpoints, offline, tmp_path, capsys):
    lmu, _ = offline
    out = tmp_path / "sweep"
    ck8, ck2 = checkpoints
    argv = ["sweep", "--checkpoint", f"8={ck8}", str(ck2), "--ft-checkpoint", f"8={ck8}", f"2={ck2}",
            "--data", "TinyPOPE", "TinyMCQ", "--out", str(out), "--data-root", str(lmu),
            "--max-new-tokens", "3", "--batch-size", "4"]
    assert main(argv) == 0
    assert "12 cells, 0 already done, 12 to run" in capsys.readouterr().out
    rows = _read_csv(out / "scores.csv")
    assert list(rows[0]) == ["metric", "mode", "n_queries", "score"]
    combos = {(r["mode"], r["n_queries"]) for r in rows}
    assert combos == {(m, n) for m in ("vqq", "vq_ft", "vq") for n in ("8", "2")}
    assert {r["metric"] for r in rows} >= {"Overall@TinyPOPE", "Overall@TinyMCQ"}
    before = (out / "scores.csv").read_text()
    preds = sorted(out.glob("work/*/*/*_TinyPOPE.tsv"))
    assert len(preds) == 6
    stamps = [p.stat().st_mtime_ns for p in preds]

    assert main(argv) == 0  # rerun: nothing to do, same CSV, predictions untouched
    assert "12 cells, 12 already done, 0 to run" in capsys.readouterr().out
    assert (out / "scores.csv").read_text() == before
    assert [p.stat().st_mtime_ns for p in preds] == stamps

    (out / "cells" / "vq_N2" / "TinyMCQ.scores.json").unlink()
    assert main(argv) == 0  # one lost cell is redone
    assert "11 already done, 1 to run" in capsys.readouterr().out
    assert (out / "scores.csv").read_text() == before


@pytest.mark.parametrize("prompt_set", ["vlmeval", "llava"])
def test_oracle_answers_score_full_marks(checkpoints, offline, tmp_path, monkeypatch, prompt_set):
    """Right answers get 100 from VLMEvalKit's scorers with either prompt set, in paper units (percent)."""
    from fusion_vlm.evaluation.runner import Runner

    def oracle(self, images, questions, dataset=None, dataset_type=None):
        out = []
        for (q,) in questions:
            if "\nA. " in q:  # a multiple-choice prompt of either set
                out.append(["A"])
            else:
                out.append(["Yes" if ("green" in q or "yellow" in q) else "No"])
        return out

    monkeypatch.setattr(Runner, "answer", oracle)
    lmu, _ = offline
    work = tmp_path / "oracle"
    assert main(["eval", "--checkpoint", str(checkpoints[0]), "--data", "TinyPOPE", "TinyMCQ",
                 "--work-dir", str(work), "--data-root", str(lmu), "--prompt-set", prompt_set]) == 0
    scores = {r["metric"]: float(r["score"]) for r in _read_csv(work / "scores.csv")}
    assert scores["Overall@TinyPOPE"] == 100.0 and scores["acc@TinyPOPE"] == 100.0
    assert scores["Overall@TinyMCQ"] == 100.0


def test_paper_benchmarks_get_the_intended_prompt_kind():
    """VLMEvalKit's TYPE of each of the paper's 15 benchmarks maps to the kind prompts.PAPER_BENCHMARKS states."""
    from vlmeval.dataset import DATASET_MODALITY, DATASET_TYPE

    from fusion_vlm.evaluation.prompts import PAPER_BENCHMARKS, dataset_kind

    for name, kind in PAPER_BENCHMARKS.items():
        assert DATASET_MODALITY(name) == "IMAGE", name
        assert dataset_kind(DATASET_TYPE(name), name) == kind, name
