"""Prompt building, message conversion and score naming for evaluation; runs without VLMEvalKit."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from fusion_vlm.evaluation import prompts
from fusion_vlm.evaluation.messages import concat_images, message_to_inputs, messages_to_batch, split_message
from fusion_vlm.evaluation.results import display_name, extract_metrics
from fusion_vlm.evaluation.runner import read_requests

# ---------------------------------------------------------------- prompts


def test_appendix_f_prompts_verbatim():
    assert prompts.DESCRIBE_PROMPT == "Please describe the image in full detail."
    assert prompts.READ_TEXT_PROMPT == "Please read all text from the image."
    assert prompts.build_prompt("caption", {"question": float("nan")}) == prompts.DESCRIBE_PROMPT
    assert prompts.build_prompt("caption", {"question": " Describe briefly. "}) == "Describe briefly."


def test_yorn_prompt_adds_suffix_once():
    assert prompts.build_prompt("yorn", {"question": "Is there a dog?"}) == "Is there a dog?\nPlease answer yes or no."
    mme = "Is this a cat? Please answer yes or no."
    assert prompts.build_prompt("yorn", {"question": mme}) == mme


def test_mcq_prompt_letters_hint_and_skips_empty_options():
    rec = {"index": 3, "question": "What colour is the car?", "hint": "Look closely.",
           "A": "red", "B": "blue", "C": float("nan"), "D": "", "E": "green"}
    assert prompts.build_prompt("mcq", rec) == (
        "Hint: Look closely.\nWhat colour is the car?\nA. red\nB. blue\nE. green\n"
        "Answer with the option's letter from the given choices directly.")
    no_hint = dict(rec, hint=None)
    assert prompts.build_prompt("mcq", no_hint).startswith("What colour is the car?\nA. red")


def test_mcq_without_options_errors_but_record_kind_falls_back():
    with pytest.raises(ValueError, match="no options"):
        prompts.build_prompt("mcq", {"question": "Why?"})
    assert prompts.record_kind("mcq", {"question": "Why?"}) == "vqa"
    assert prompts.record_kind("mcq", {"question": "Why?", "A": "x", "B": "y"}) == "mcq"


def test_vqa_prompt_and_errors():
    assert prompts.build_prompt("vqa", {"question": "What is written? "}) == (
        "What is written?\nAnswer the question using a single word or phrase.")
    with pytest.raises(ValueError, match="no question"):
        prompts.build_prompt("vqa", {"index": 7, "question": float("nan")})
    with pytest.raises(ValueError, match="unknown prompt kind"):
        prompts.build_prompt("essay", {"question": "x"})


@pytest.mark.parametrize("dtype,name,kind", [
    ("Y/N", "POPE", "yorn"), ("MCQ", "MMStar", "mcq"), ("MCQ_MMMU_Pro", "x", "mcq"), ("VQA", "TextVQA_VAL", "vqa"),
    ("Caption", "COCO_VAL", "caption"), (None, "HallusionBench", "yorn"), (None, "AI2D_TEST", "mcq"),
    (None, "COCO_VAL", "caption"), (None, "OCRBench", "vqa"), (None, "SomethingElse", "vqa"),
])
def test_dataset_kind(dtype, name, kind):
    assert prompts.dataset_kind(dtype, name) == kind


def test_paper_benchmarks_are_the_fifteen():
    assert len(prompts.PAPER_BENCHMARKS) == 15


# ---------------------------------------------------------------- messages


def test_split_message_joins_text_in_order(tmp_path):
    msg = [{"type": "text", "value": "Hint: x"}, {"type": "image", "value": "a.png"},
           {"type": "text", "value": " Question? "}]
    images, text = split_message(msg)
    assert images == ["a.png"] and text == "Hint: x\nQuestion?"
    with pytest.raises(ValueError, match="unsupported type 'video'"):
        split_message([{"type": "video", "value": "v.mp4"}])
    with pytest.raises(ValueError, match="part 0"):
        split_message([{"value": "no type"}])


def test_message_to_inputs_loads_rgb_image(tmp_path):
    path = tmp_path / "g.png"
    Image.new("L", (30, 20), 128).save(path)
    image, text = message_to_inputs([{"type": "image", "value": str(path)}, {"type": "text", "value": "Q?"}])
    assert image.mode == "RGB" and image.size == (30, 20) and text == "Q?"


def test_message_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no image"):
        message_to_inputs([{"type": "text", "value": "Q?"}])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        message_to_inputs([{"type": "image", "value": str(tmp_path / "missing.png")}, {"type": "text", "value": "Q"}])
    img = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="no text"):
        message_to_inputs([{"type": "image", "value": img}])
    with pytest.raises(ValueError, match="2 images"):
        message_to_inputs([{"type": "image", "value": img}] * 2 + [{"type": "text", "value": "Q"}], "error")
    with pytest.raises(ValueError, match="multi_image"):
        message_to_inputs([{"type": "image", "value": img}], "average")


def test_multi_image_concat_and_first():
    a, b = Image.new("RGB", (10, 20), "red"), Image.new("RGB", (5, 10), "blue")
    msg = [{"type": "image", "value": a}, {"type": "image", "value": b}, {"type": "text", "value": "Q"}]
    joined, _ = message_to_inputs(msg)
    assert joined.size == (20, 20)  # b scaled to height 20 -> width 10
    assert joined.getpixel((2, 2)) == (255, 0, 0) and joined.getpixel((15, 10)) == (0, 0, 255)
    first, _ = message_to_inputs(msg, "first")
    assert first.size == (10, 20)
    assert concat_images([a]) is a


def test_messages_to_batch_shapes():
    img = Image.new("RGB", (8, 8))
    images, questions = messages_to_batch([[{"type": "image", "value": img}, {"type": "text", "value": f"Q{i}"}]
                                           for i in range(3)])
    assert len(images) == 3 and questions == [["Q0"], ["Q1"], ["Q2"]]


# ---------------------------------------------------------------- VLMEvalKit results -> paper names


class FakeFrame:
    """The bits of a pandas DataFrame that extract_metrics uses."""

    def __init__(self, rows):
        self.rows = rows
        self.columns = list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, col):
        return [r[col] for r in self.rows]

    @property
    def iloc(self):
        return [type("Row", (), {"to_dict": lambda s, r=r: dict(r)})() for r in self.rows]


def test_display_name_matches_paper_csv():
    assert display_name("AI2D_TEST") == "AI2D TEST" and display_name("SEEDBench2_Plus") == "SEEDBench2 Plus"


def test_extract_mme_hallusion_pope():
    mme = FakeFrame([{"perception": 1202.635, "reasoning": 258.571, "OCR": 100.0}])
    got = extract_metrics("MME", mme, "yorn")
    assert got["Overall@MME"] == pytest.approx(1461.206) and got["Cognition@MME"] == pytest.approx(258.571)
    hb = FakeFrame([{"split": "VD", "aAcc": 1, "fAcc": 1, "qAcc": 1},
                    {"split": "Overall", "aAcc": 50.683, "fAcc": 22.254, "qAcc": 17.143}])
    got = extract_metrics("HallusionBench", hb, "yorn")
    assert got["Overall@HallusionBench"] == pytest.approx(30.027, abs=1e-3) and got["aAcc@HallusionBench"] == 50.683
    pope = FakeFrame([{"split": "adversarial", "Overall": 1.0, "acc": 1, "precision": 1, "recall": 1},
                      {"split": "Overall", "Overall": 86.977, "acc": 87.0, "precision": 87.3, "recall": 86.6}])
    assert extract_metrics("POPE", pope, "yorn")["Overall@POPE"] == 86.977


def test_extract_mcq_scaled_to_percent_vqa_not():
    mcq = FakeFrame([{"split": "none", "Overall": 0.41192, "cat": 0.3}])
    assert extract_metrics("AI2D_TEST", mcq, "mcq") == {"Overall@AI2D TEST": pytest.approx(41.192)}
    vqa = FakeFrame([{"Overall": 52.998}])
    assert extract_metrics("TextVQA_VAL", vqa, "vqa") == {"Overall@TextVQA VAL": 52.998}


def test_extract_ocrbench_and_coco_dicts():
    assert extract_metrics("OCRBench", {"Final Score": 493, "Final Score Norm": 49.3}, "vqa") == {
        "Final Score@OCRBench": 493.0}
    coco = {"Bleu": [40.892, 20, 15, 10.282], "ROUGE_L": 34.858, "CIDEr": 12.897}
    assert extract_metrics("COCO_VAL", coco, "caption") == {
        "BLEU-1@COCO VAL": 40.892, "BLEU-4@COCO VAL": 10.282, "ROUGE-L@COCO VAL": 34.858, "CIDEr@COCO VAL": 12.897}


def test_extract_errors():
    with pytest.raises(ValueError, match="no known score"):
        extract_metrics("X", {"foo": 1}, "vqa")
    with pytest.raises(ValueError, match="NaN"):
        extract_metrics("X", {"Overall": math.nan}, "vqa")


# ---------------------------------------------------------------- requests JSONL, laziness


def test_read_requests(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"image": "a.png", "questions": ["Q1", "Q2"]}) + "\n\n"
                 + json.dumps({"image": "/abs/b.png", "question": "Q3"}) + "\n")
    recs = [r for _, r in read_requests(f)]
    assert recs[0]["image"] == str(tmp_path / "a.png") and recs[0]["questions"] == ["Q1", "Q2"]
    assert recs[1]["image"] == "/abs/b.png" and recs[1]["questions"] == ["Q3"]
    f.write_text(json.dumps({"image": "a.png", "questions": []}) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl:1: needs 'questions'"):
        list(read_requests(f))
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"r.jsonl:1: not JSON"):
        list(read_requests(f))


def test_evaluation_modules_do_not_import_vlmeval():
    code = ("import sys, ssl; before = ssl._create_default_https_context\n"
            "import fusion_vlm.evaluation.registry, fusion_vlm.evaluation.vlmeval_model, fusion_vlm.evaluation.sweep\n"
            "import fusion_vlm.cli; fusion_vlm.cli.build_parser()\n"
            "assert 'vlmeval' not in sys.modules, 'vlmeval imported eagerly'\n"
            "assert 'torch' not in sys.modules, 'torch imported eagerly'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_entry_names_and_grid(tmp_path):
    from fusion_vlm.evaluation.registry import entry_name, grid_entries

    ckpt = tmp_path / "stage3 n64"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("fusion: {n_queries: 64}\n")
    assert entry_name(ckpt, 64, "vq") == "FusionVLM_stage3-n64_N64_vq"
    entries = grid_entries([ckpt], [8, 64], ["vqq", "vq"], max_new_tokens=5)
    assert [(e.n_queries, e.mode, e.use_question) for e in entries] == [
        (8, "vqq", True), (8, "vq", False), (64, "vqq", True), (64, "vq", False)]
    assert entries[1].kwargs() == {"n_queries": 8, "use_question": False, "max_new_tokens": 5}
    with pytest.raises(ValueError, match="unknown mode"):
        grid_entries([ckpt], [8], ["qv"])
    with pytest.raises(FileNotFoundError, match="not a FusionVLM checkpoint"):
        grid_entries([tmp_path], [8], ["vqq"])


@pytest.mark.skipif(importlib.util.find_spec("vlmeval") is not None, reason="vlmeval is installed here")
def test_eval_without_vlmeval_fails_with_one_line(tmp_path, capsys):
    from fusion_vlm.cli import main

    ckpt = tmp_path / "c"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("fusion: {n_queries: 8}\n")
    assert main(["eval", "--checkpoint", str(ckpt), "--data", "POPE"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "install_eval.sh" in err[0]


class StubModel:
    """Records generate calls; answers 'Yes' to everything."""

    def __init__(self):
        self.calls = []

    def eval(self):
        return self

    def generate(self, images, questions, **kw):
        self.calls.append((len(images), questions, kw))
        return [["Yes"] * len(q) for q in questions]


def test_vlmeval_mixin_prompt_and_batched_generation(tmp_path):
    from fusion_vlm.evaluation.vlmeval_model import FusionVLMEvalMixin

    class Wrapped(FusionVLMEvalMixin):
        def dump_image(self, line, dataset):
            path = tmp_path / f"{line['index']}.png"
            Image.new("RGB", (16, 16)).save(path)
            return [str(path)]

    stub = StubModel()
    m = Wrapped()
    m._setup(tmp_path, n_queries=4, use_question=False, max_new_tokens=7, batch_size=2, model=stub,
             prompt_set="llava")
    m.dataset_types.update({"MyMCQ": "MCQ", "MyYN": "Y/N", "MyVQA": "MCQ"})
    assert m.use_custom_prompt("MyMCQ") and m.use_custom_prompt("MyYN") and not m.use_custom_prompt(None)
    msg = m.build_prompt({"index": 1, "question": "Colour?", "A": "red", "B": "blue"}, dataset="MyMCQ")
    assert msg[0] == {"type": "image", "value": str(tmp_path / "1.png")}
    assert msg[1]["value"].endswith("B. blue\nAnswer with the option's letter from the given choices directly.")
    assert m.build_prompt({"index": 2, "question": "Dog?"}, "MyYN")[1]["value"] == "Dog?\nPlease answer yes or no."
    # an 'MCQ'-typed custom set without options is open-ended
    assert m.build_prompt({"index": 3, "question": "Why?"}, "MyVQA")[1]["value"].endswith("single word or phrase.")
    answers = m.generate_batch([msg] * 3, "MyMCQ")
    assert answers == ["Yes"] * 3
    assert [c[0] for c in stub.calls] == [2, 1]  # batch_size=2
    kw = stub.calls[0][2]
    assert kw["n_queries"] == 4 and kw["use_question"] is False and kw["max_new_tokens"] == 7
    assert stub.calls[0][1][0] == [msg[1]["value"]]
    assert m.generate_inner(msg, "MyMCQ") == "Yes"
