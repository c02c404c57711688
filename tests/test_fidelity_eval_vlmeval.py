"""Through the real VLMEvalKit (offline): its own prompts and the reference answer lengths reach the model,
and the written results record the set-up.

Runs only where the eval extra is installed (``.venv-eval/bin/python -m pytest -m vlmeval``). The model's
``Runner.answer`` is replaced by a recorder, so what is checked is what the model would be asked, and with
how many new tokens; the expected prompts come from VLMEvalKit's own ``dataset.build_prompt``.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vlmeval")
pytest.importorskip("pandas")

from test_eval_vlmeval import COLORS, checkpoints, offline  # noqa: E402, F401  (fixtures)

from fusion_vlm.cli import main  # noqa: E402
from fusion_vlm.evaluation.messages import split_message  # noqa: E402
from fusion_vlm.evaluation.registry import entry_name  # noqa: E402
from fusion_vlm.evaluation.runner import Runner  # noqa: E402

pytestmark = pytest.mark.vlmeval

# TYPE of each tiny set -> the reference length: Y/N 32, MCQ 32, VQA with OCRVQA in the name 100, Caption + COCO 32
EXPECTED_TOKENS = {"TinyPOPE": 32, "TinyMCQ": 32, "TinyOCRVQA": 100, "TinyCOCO": 32}


@pytest.fixture
def recorder(monkeypatch):
    """Replace generation by a recorder: ``{dataset: [(question, max_new_tokens), ...]}``; right-ish answers."""
    seen: dict = {}

    def answer(self, images, questions, dataset=None, dataset_type=None):
        for (q,) in questions:
            seen.setdefault(dataset, []).append((q, self.max_new_tokens_for(dataset, dataset_type)))
        return [["A" if "\nA. " in q else ("Yes" if ("green" in q or "yellow" in q) else "No")]
                for (q,) in questions]

    monkeypatch.setattr(Runner, "answer", answer)
    return seen


@pytest.mark.parametrize("batch_size", [1, 3])  # 1: VLMEvalKit's own loop; 3: our batched prefill
def test_vlmevalkit_prompts_and_reference_lengths(checkpoints, offline, recorder, tmp_path, monkeypatch, batch_size):
    from vlmeval.dataset import build_dataset

    lmu, sizes = offline
    work = tmp_path / "w"
    assert main(["eval", "--checkpoint", str(checkpoints[0]), "--data", *sizes, "--work-dir", str(work),
                 "--data-root", str(lmu), "--batch-size", str(batch_size)]) == 0
    monkeypatch.setenv("LMUData", str(lmu))
    for ds, n in sizes.items():
        dataset = build_dataset(ds)
        expected = [split_message(dataset.build_prompt(dataset.data.iloc[i]))[1] for i in range(n)]
        assert sorted(q for q, _ in recorder[ds]) == sorted(expected), ds
        assert {t for _, t in recorder[ds]} == {EXPECTED_TOKENS[ds]}, ds
    mcq = recorder["TinyMCQ"][0][0]
    assert "Options:" in mcq and "Please select the correct answer" in mcq and "option's letter" not in mcq
    assert {q for q, _ in recorder["TinyPOPE"]} == {f"Is the image {c}?" for c in COLORS}  # no suffix added

    name = entry_name(checkpoints[0], None, "vqq")
    for ds, n in EXPECTED_TOKENS.items():
        setup = json.loads((work / name / f"{ds}.fusion_metrics.json").read_text())["setup"]
        assert (setup["max_new_tokens"], setup["max_new_tokens_source"], setup["prompt_set"]) == (
            n, "reference rule", "vlmeval")
        assert (setup["batch_size"], setup["seed"], setup["n_queries"], setup["mode"]) == (batch_size, 0, 8, "vqq")
        assert setup["judge"] == "exact_matching" and setup["packages"]["vlmeval"]
    record = json.loads((work / "scores.setup.json").read_text())["evaluations"]
    assert {e["dataset"]: e["max_new_tokens"] for e in record} == EXPECTED_TOKENS
    scores = {r.split(",")[0]: float(r.split(",")[-1]) for r in (work / "scores.csv").read_text().splitlines()[1:]}
    assert scores["Overall@TinyMCQ"] == 100.0 and scores["Overall@TinyPOPE"] == 100.0


def test_llava_prompt_set_and_user_length(checkpoints, offline, recorder, tmp_path):
    lmu, _ = offline
    work = tmp_path / "w"
    assert main(["eval", "--checkpoint", str(checkpoints[0]), "--data", "TinyPOPE", "TinyMCQ", "--work-dir",
                 str(work), "--data-root", str(lmu), "--prompt-set", "llava", "--max-new-tokens", "6"]) == 0
    assert all(q.endswith("\nPlease answer yes or no.") and t == 6 for q, t in recorder["TinyPOPE"])
    assert all(q.endswith("Answer with the option's letter from the given choices directly.") and t == 6
               for q, t in recorder["TinyMCQ"])
    record = json.loads((work / "scores.setup.json").read_text())["evaluations"]
    assert [(e["prompt_set"], e["max_new_tokens"], e["max_new_tokens_source"]) for e in record] == [
        ("llava", 6, "user")] * 2


def test_predictions_of_other_settings_are_not_reused(checkpoints, offline, recorder, tmp_path, capsys):
    lmu, _ = offline
    argv = ["eval", "--checkpoint", str(checkpoints[0]), "--data", "TinyPOPE", "--work-dir", str(tmp_path / "w"),
            "--data-root", str(lmu)]
    assert main([*argv, "--prompt-set", "llava"]) == 0
    assert main(argv) == 2  # VLMEvalKit would silently score the llava predictions
    err = capsys.readouterr().err
    assert "generated with other settings" in err and "prompt_set 'llava' -> 'vlmeval'" in err
    assert main([*argv, "--prompt-set", "llava"]) == 0  # same settings: reused


def test_paper_benchmarks_get_the_reference_lengths():
    """VLMEvalKit's own TYPE of each of the paper's 15 benchmarks gives the length the reference used."""
    from vlmeval.dataset import DATASET_TYPE

    from fusion_vlm.evaluation.prompts import PAPER_BENCHMARKS
    from fusion_vlm.evaluation.settings import reference_max_new_tokens

    expected = {"MME": 32, "HallusionBench": 32, "POPE": 32, "OCRBench": 512, "OCRVQA_TESTCORE": 100,
                "ChartQA_TEST": 100, "TextVQA_VAL": 10, "COCO_VAL": 32, "RealWorldQA": 32, "MMStar": 32,
                "SEEDBench_IMG": 32, "SEEDBench2": 32, "SEEDBench2_Plus": 32, "ScienceQA_TEST": 32, "AI2D_TEST": 32}
    assert set(expected) == set(PAPER_BENCHMARKS)
    assert {name: reference_max_new_tokens(name, DATASET_TYPE(name)) for name in expected} == expected
