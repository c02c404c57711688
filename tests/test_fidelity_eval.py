"""Evaluation follows the authors' set-up: answer length per benchmark, VLMEvalKit prompts, recorded set-up.

The expected answer lengths are written out by hand from the reference wrapper's
``adjust_kwargs`` (tensorfusionvlm/eval_models/imgque.py). Nothing here needs
VLMEvalKit: the plug-in is exercised through its mix-in, and the commands with
the VLMEvalKit calls replaced by fakes.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from PIL import Image


def _settings():
    """The module under test, imported per test (so each test fails on its own where it is missing)."""
    from fusion_vlm.evaluation import settings

    return settings


# (dataset name, VLMEvalKit TYPE, max_new_tokens of the reference)
REFERENCE_TABLE = [
    ("MME", "Y/N", 32), ("HallusionBench", "Y/N", 32), ("POPE", "Y/N", 32),
    ("MMStar", "MCQ", 32), ("SEEDBench_IMG", "MCQ", 32), ("SEEDBench2_Plus", "MCQ", 32), ("AI2D_TEST", "MCQ", 32),
    ("RealWorldQA", "MCQ", 32), ("ScienceQA_TEST", "MCQ", 32),
    ("COCO_VAL", "Caption", 32), ("MyCaptions", "Caption", 512), ("coco_lower", "Caption", 512),
    ("OCRVQA_TESTCORE", "VQA", 100), ("ChartQA_TEST", "VQA", 100), ("DocVQA_VAL", "VQA", 100),
    ("TextVQA_VAL", "VQA", 10), ("OCRBench", "VQA", 512), ("InfoVQA_VAL", "VQA", 512),
    ("MMMU_Pro_10c", "MCQ_MMMU_Pro", 512),  # the reference compares the TYPE exactly
    ("mini_seedbench", "MT", 3), ("mini_seedbench", "VQA", 512),  # the VQA branch comes first
    ("SEEDBench_IMG", "MT", 512),  # name tests are case-sensitive
    ("Anything", None, 512), (None, None, 512),
]


@pytest.mark.parametrize("name,dtype,expected", REFERENCE_TABLE)
def test_max_new_tokens_follows_the_reference_table(name, dtype, expected):
    s = _settings()
    assert s.reference_max_new_tokens(name, dtype) == expected
    assert s.resolve_max_new_tokens(None, name, dtype) == expected


def test_explicit_max_new_tokens_overrides_the_table():
    s = _settings()
    assert s.DEFAULT_MAX_NEW_TOKENS == 512
    assert s.resolve_max_new_tokens(7, "POPE", "Y/N") == 7
    assert s.resolve_max_new_tokens(600, "TextVQA_VAL", "VQA") == 600
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        s.resolve_max_new_tokens(0, "POPE", "Y/N")


class StubModel:
    """Records generate calls; answers 'Yes' to everything."""

    def __init__(self):
        self.calls = []

    def eval(self):
        return self

    def generate(self, images, questions, **kw):
        self.calls.append(kw)
        return [["Yes"] * len(q) for q in questions]


def _plugin(tmp_path, **kwargs):
    from fusion_vlm.evaluation.vlmeval_model import FusionVLMEvalMixin

    class Wrapped(FusionVLMEvalMixin):
        def dump_image(self, line, dataset):
            path = tmp_path / f"{line['index']}.png"
            Image.new("RGB", (16, 16)).save(path)
            return [str(path)]

    (tmp_path / "config.yaml").write_text("fusion: {n_queries: 8}\n")
    stub = StubModel()
    m = Wrapped()
    m._setup(tmp_path, model=stub, **kwargs)
    m.dataset_types.update({"POPE": "Y/N", "MMStar": "MCQ", "TextVQA_VAL": "VQA", "ChartQA_TEST": "VQA",
                            "COCO_VAL": "Caption", "OCRBench": "VQA"})
    return m, stub


def _message(tmp_path):
    path = tmp_path / "m.png"
    Image.new("RGB", (16, 16)).save(path)
    return [{"type": "image", "value": str(path)}, {"type": "text", "value": "Q?"}]


def test_plugin_generates_with_the_reference_lengths(tmp_path):
    m, stub = _plugin(tmp_path)
    msg = _message(tmp_path)
    expected = {"POPE": 32, "MMStar": 32, "TextVQA_VAL": 10, "ChartQA_TEST": 100, "COCO_VAL": 32, "OCRBench": 512}
    for ds, n in expected.items():
        assert m.generate_batch([msg], ds) == ["Yes"]
        assert stub.calls[-1]["max_new_tokens"] == n, ds
        assert m.max_new_tokens_for(ds) == n
    m.generate_inner(msg, "TextVQA_VAL")
    assert stub.calls[-1]["max_new_tokens"] == 10


def test_plugin_user_value_overrides_every_dataset(tmp_path):
    msg = _message(tmp_path)
    rule, stub = _plugin(tmp_path)
    rule.generate_batch([msg], "TextVQA_VAL")
    assert stub.calls[-1]["max_new_tokens"] == 10
    m, stub = _plugin(tmp_path, max_new_tokens=5)
    for ds in ("POPE", "TextVQA_VAL", "ChartQA_TEST", "OCRBench"):
        m.generate_batch([msg], ds)
        assert stub.calls[-1]["max_new_tokens"] == 5


def test_runner_uses_the_rule_without_an_explicit_value(tmp_path):
    from fusion_vlm.evaluation.runner import GenerationSettings, Runner

    stub = StubModel()
    img = Image.new("RGB", (8, 8))
    runner = Runner(tmp_path, GenerationSettings(), model=stub)
    runner.answer([img], [["Q"]], dataset="OCRVQA_TESTCORE", dataset_type="VQA")
    runner.answer([img], [["Q"]])
    assert [c["max_new_tokens"] for c in stub.calls] == [100, 512]
    assert all(c["min_new_tokens"] == 1 for c in stub.calls)  # the reference's: no empty answer
    fixed = Runner(tmp_path, GenerationSettings(max_new_tokens=9), model=stub)
    fixed.answer([img], [["Q"]], dataset="OCRVQA_TESTCORE", dataset_type="VQA")
    assert stub.calls[-1]["max_new_tokens"] == 9


def test_prompt_set_switch(tmp_path):
    """Default: VLMEvalKit's own dataset prompts (no custom prompt); 'llava': the LLaVA-style suffixes."""
    m, _ = _plugin(tmp_path)
    assert m.prompt_set == "vlmeval"
    assert not any(m.use_custom_prompt(ds) for ds in ("POPE", "MMStar", "TextVQA_VAL", "COCO_VAL"))
    llava, _ = _plugin(tmp_path, prompt_set="llava")
    assert all(llava.use_custom_prompt(ds) for ds in ("POPE", "MMStar", "TextVQA_VAL", "COCO_VAL"))
    text = llava.build_prompt({"index": 1, "question": "Colour?", "A": "red", "B": "blue"}, "MMStar")[-1]["value"]
    assert text == "Colour?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    with pytest.raises(ValueError, match="prompt set 'qwen': expected one of vlmeval, llava"):
        _plugin(tmp_path, prompt_set="qwen")


def test_cli_defaults_are_the_reference_ones():
    from fusion_vlm.cli import build_parser

    for cmd in (["eval", "--checkpoint", "c"], ["sweep", "--checkpoint", "c"]):
        args = build_parser().parse_args([*cmd, "--data", "POPE"])
        assert args.prompt_set == "vlmeval" and args.max_new_tokens is None and args.seed == 0
        args = build_parser().parse_args([*cmd, "--data", "POPE", "--prompt-set", "llava", "--max-new-tokens", "9"])
        assert args.prompt_set == "llava" and args.max_new_tokens == 9


# ---------------------------------------------------------------- the recorded set-up

SETUP_KEYS = {"prompt_set", "max_new_tokens", "judge", "batch_size", "packages", "seed", "n_queries", "mode"}


def test_eval_setup_record(tmp_path):
    import torch
    import transformers

    import fusion_vlm

    eval_setup, package_versions = _settings().eval_setup, _settings().package_versions
    s = eval_setup(mode="vq", n_queries=8, dataset="ChartQA_TEST", dataset_type="VQA", prompt_set="vlmeval",
                   max_new_tokens=None, judge="exact_matching", judge_kwargs={"api_key": "sk-1", "api_base": "u"},
                   batch_size=4, seed=0)
    assert SETUP_KEYS <= set(s)
    assert (s["max_new_tokens"], s["max_new_tokens_source"], s["mode"], s["n_queries"]) == (
        100, "reference rule", "vq", 8)
    assert s["judge_kwargs"] == {"api_key": "<redacted>", "api_base": "u"}
    assert set(s["packages"]) == {"torch", "transformers", "fusion_vlm", "vlmeval", "open_clip"}
    assert s["packages"]["torch"] == torch.__version__
    assert s["packages"]["transformers"] == transformers.__version__
    assert s["packages"]["fusion_vlm"] == fusion_vlm.__version__
    if importlib.util.find_spec("vlmeval") is None:
        assert s["packages"]["vlmeval"] is None
    assert s["packages"]["open_clip"]  # installed as open_clip_torch
    assert json.loads(json.dumps(s)) == s
    user = eval_setup(mode="vq", n_queries=8, dataset="ChartQA_TEST", dataset_type="VQA", prompt_set="llava",
                      max_new_tokens=20, judge="exact_matching", batch_size=4, seed=0)
    assert (user["max_new_tokens"], user["max_new_tokens_source"], user["prompt_set"]) == (20, "user", "llava")
    assert package_versions(("no_such_package_xyz",)) == {"no_such_package_xyz": None}


def test_entry_setup_reads_the_plugin(tmp_path):
    from fusion_vlm.evaluation.registry import ModelEntry, entry_setup

    m, _ = _plugin(tmp_path, use_question=False, batch_size=3, seed=5)
    entry = ModelEntry("FusionVLM_x_Nckpt_vq", str(tmp_path), "vq", None, {})
    s = entry_setup(entry, m, "TextVQA_VAL", "VQA", "exact_matching", None, 3)
    assert (s["prompt_set"], s["max_new_tokens"], s["n_queries"], s["mode"], s["seed"], s["batch_size"]) == (
        "vlmeval", 10, 8, "vq", 5, 3)  # N read from the checkpoint's config.yaml
    assert s["use_question"] is False and s["judge"] == "exact_matching" and s["min_new_tokens"] == 1


def test_reused_predictions_with_other_settings_are_refused(tmp_path):
    from fusion_vlm.evaluation.registry import check_reuse

    pred, summary = tmp_path / "m_POPE.tsv", tmp_path / "POPE.fusion_metrics.json"
    setup = {"prompt_set": "vlmeval", "max_new_tokens": 32, "n_queries": 8}
    check_reuse(summary, pred, setup)  # nothing there yet
    pred.write_text("index\tprediction\n")
    summary.write_text(json.dumps({"setup": {"prompt_set": "llava", "max_new_tokens": 64, "n_queries": 8}}))
    with pytest.raises(ValueError, match=r"prompt_set 'llava' -> 'vlmeval'; max_new_tokens 64 -> 32"):
        check_reuse(summary, pred, setup)
    summary.write_text(json.dumps({"setup": setup}))
    check_reuse(summary, pred, dict(setup))  # same settings: reused


def test_sweep_cells_and_csv_record_the_setup(tmp_path):
    from fusion_vlm.evaluation.sweep import plan_cells, run_sweep, setup_path

    eval_setup, EvalResult = _settings().eval_setup, _settings().EvalResult
    cells = plan_cells({8: "a8", 2: "a2"}, ["POPE", "TextVQA_VAL"], ["vqq"])
    types = {"POPE": "Y/N", "TextVQA_VAL": "VQA"}

    def evaluate(cell, work_dir):
        setup = eval_setup(mode=cell.mode, n_queries=cell.n_queries, dataset=cell.dataset,
                           dataset_type=types[cell.dataset], prompt_set="vlmeval", max_new_tokens=None,
                           judge="exact_matching", batch_size=8, seed=0)
        return EvalResult({f"Overall@{cell.dataset}": 50.0}, setup)

    csv_path = run_sweep(tmp_path, cells, evaluate, log=lambda s: None)
    cell_file = json.loads((tmp_path / "cells" / "vqq_N8" / "TextVQA_VAL.scores.json").read_text())
    assert SETUP_KEYS <= set(cell_file["setup"]) and cell_file["setup"]["max_new_tokens"] == 10
    record = json.loads(setup_path(csv_path).read_text())
    assert setup_path(csv_path).name == "scores.setup.json" and record["csv"] == "scores.csv"
    got = {(e["n_queries"], e["dataset"]): e["max_new_tokens"] for e in record["evaluations"]}
    assert got == {(8, "POPE"): 32, (2, "POPE"): 32, (8, "TextVQA_VAL"): 10, (2, "TextVQA_VAL"): 10}
    assert all(SETUP_KEYS <= set(e) for e in record["evaluations"])


def _fake_setup(**kw):
    return _settings().eval_setup(**{"mode": "vqq", "n_queries": 8, "dataset": "POPE", "dataset_type": "Y/N",
                         "prompt_set": "vlmeval", "max_new_tokens": None, "judge": "exact_matching",
                         "batch_size": 8, "seed": 0, **kw})


def test_eval_command_passes_options_and_writes_setup(tmp_path, monkeypatch, capsys):
    from fusion_vlm.cli import main
    from fusion_vlm.evaluation import registry

    EvalResult = _settings().EvalResult
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("fusion: {n_queries: 8}\n")
    seen = {}

    def fake_run_eval(entries, datasets, work_dir, **kw):
        seen["options"] = [e.options for e in entries]
        seen["batch_size"] = kw["batch_size"]
        return {e.name: {"POPE": EvalResult({"Overall@POPE": 80.0}, _fake_setup(
            prompt_set=e.options["prompt_set"], max_new_tokens=e.options["max_new_tokens"], mode=e.mode))}
            for e in entries}

    monkeypatch.setattr(registry, "run_eval", fake_run_eval)
    work = tmp_path / "w"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", "POPE", "--mode", "vqq", "vq",
                 "--work-dir", str(work), "--batch-size", "2"]) == 0
    assert [(o["prompt_set"], o["max_new_tokens"], o["seed"]) for o in seen["options"]] == [("vlmeval", None, 0)] * 2
    record = json.loads((work / "scores.setup.json").read_text())["evaluations"]
    assert [(e["mode"], e["max_new_tokens"], e["prompt_set"]) for e in record] == [
        ("vqq", 32, "vlmeval"), ("vq", 32, "vlmeval")]
    assert main(["eval", "--checkpoint", str(ckpt), "--data", "POPE", "--work-dir", str(work),
                 "--prompt-set", "llava", "--max-new-tokens", "4", "--seed", "3"]) == 0
    assert [(o["prompt_set"], o["max_new_tokens"], o["seed"]) for o in seen["options"]] == [("llava", 4, 3)]
    record = json.loads((work / "scores.setup.json").read_text())["evaluations"]
    assert [(e["max_new_tokens"], e["max_new_tokens_source"], e["prompt_set"]) for e in record] == [
        (4, "user", "llava")]


def test_sweep_command_passes_options(tmp_path, monkeypatch, capsys):
    from fusion_vlm.cli import main
    from fusion_vlm.evaluation import registry

    EvalResult = _settings().EvalResult
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("fusion: {n_queries: 8}\n")
    seen = {}

    def fake_cell_evaluator(**kw):
        seen.update(kw)
        return lambda cell, work: EvalResult({f"Overall@{cell.dataset}": 1.0}, _fake_setup(
            mode=cell.mode, prompt_set=kw["prompt_set"], max_new_tokens=kw["max_new_tokens"]))

    monkeypatch.setattr(registry, "import_vlmeval", lambda: None)
    monkeypatch.setattr(registry, "cell_evaluator", fake_cell_evaluator)
    out = tmp_path / "s"
    assert main(["sweep", "--checkpoint", str(ckpt), "--data", "POPE", "--out", str(out), "--prompt-set", "llava",
                 "--seed", "2"]) == 0
    assert (seen["prompt_set"], seen["max_new_tokens"], seen["seed"], seen["batch_size"]) == ("llava", None, 2, 8)
    record = json.loads((out / "scores.setup.json").read_text())["evaluations"]
    assert sorted(e["mode"] for e in record) == ["vq", "vqq"] and {e["prompt_set"] for e in record} == {"llava"}
    # finished cells scored with another prompt set are not silently kept
    assert main(["sweep", "--checkpoint", str(ckpt), "--data", "POPE", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 finished cell(s)" in err and "prompt_set 'llava'" in err and "use a new --out" in err
    assert main(["sweep", "--checkpoint", str(ckpt), "--data", "POPE", "--out", str(out), "--prompt-set", "llava",
                 "--max-new-tokens", "32"]) == 0  # 32 is what the rule gave POPE: same settings
