"""The user's path in one test: train -> save -> load -> generate returns the trained answers.

Two generated images (a red square on the left, a blue one on the right), one question, a short answer
each. The tiny model trains through the real training entry point (``fusion_vlm.training.loop.train``:
DeepSpeed ZeRO-2 on the CPU, frozen LLM, the stage-2 generation loss), the loop exports ``final/`` with
``save_pretrained``, and a fresh ``FusionVLM.from_pretrained`` object -- and ``fusion-vlm generate`` on
that directory -- must answer each image with exactly its trained answer (greedy, stopping at EOS).
The same model before training must not.

The random tiny LLM is frozen, as in the paper's stages 2-3; with its default init (std 0.02) its logits
hardly depend on the input (see tests/test_training_run.py), so it gets ``initializer_range=0.2``, with
which 80 steps at lr 3e-3 take the loss from ~4.3 to ~0.2 (both answers right from about step 60).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image, ImageDraw

from fusion_vlm.model import FusionVLM

pytest.importorskip("deepspeed")

QUESTION = "What colour is the square?"
ANSWERS = {"left_red": "red", "right_blue": "blue"}
LLM_INIT = "llm.tiny.initializer_range=0.2"  # a random LLM that the visual path can steer
STEPS = 80


def square_image(side: str, colour: tuple[int, int, int]) -> Image.Image:
    """A 112 x 112 light image with a coloured square on the ``side`` half."""
    img = Image.new("RGB", (112, 112), (245, 245, 245))
    x0 = 8 if side == "left" else 60
    ImageDraw.Draw(img).rectangle([x0, 28, x0 + 44, 84], fill=colour)
    return img


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The two images on disk and a LLaVA-format JSON with one question/answer turn each."""
    root = tmp_path_factory.mktemp("overfit")
    (root / "images").mkdir()
    images = {"left_red": square_image("left", (220, 30, 30)), "right_blue": square_image("right", (40, 60, 220))}
    records = []
    for name, img in images.items():
        img.save(root / "images" / f"{name}.png")
        records.append({"id": name, "image": f"images/{name}.png",
                        "conversations": [{"from": "human", "value": "<image>\n" + QUESTION},
                                          {"from": "gpt", "value": ANSWERS[name]}]})
    (root / "train.json").write_text(json.dumps(records))
    return root, images


@pytest.fixture(scope="module")
def trained(world):
    """Train 80 steps on the two records (one batch of both); returns the TrainResult."""
    from fusion_vlm.training.config import load_train_config
    from fusion_vlm.training.loop import train

    root, _ = world
    cfg = load_train_config("tiny_stage2", [
        f"data.files=[{root / 'train.json'}]", f"data.image_root={root}", f"output_dir={root / 'run'}",
        "init_from=null", f"max_steps={STEPS}", "epochs=1000", "micro_batch_size=2", "grad_accum=1",
        "data.shuffle=false", "optim.lr=0.003", "optim.warmup_ratio=0.0", "optim.schedule=constant",
        "checkpoint.every=0", "logging.progress_bar=false", "logging.wandb_mode=disabled",
        f"model_overrides=[{LLM_INIT}]"])
    return train(cfg)


def answers_of(model: FusionVLM, images: dict) -> dict[str, str]:
    """Greedy answer of ``model`` to QUESTION for each named image (room for more tokens than any answer)."""
    names = list(images)
    out = model.generate([images[n] for n in names], [[QUESTION]] * len(names), max_new_tokens=12)
    return {n: a[0] for n, a in zip(names, out)}


def test_untrained_model_does_not_give_the_answers(world):
    _, images = world
    torch.manual_seed(0)
    untrained = FusionVLM.from_config("tiny", overrides=[LLM_INIT]).eval()
    got = answers_of(untrained, images)
    assert all(got[n] != ANSWERS[n] for n in ANSWERS), got


def test_trained_answers_survive_save_and_load(world, trained, tmp_path):
    _, images = world
    assert trained.steps == STEPS and trained.final_dir is not None
    assert trained.losses[STEPS] < 0.5 * trained.losses[1], trained.losses  # it learned (behaviour, not quality)

    loaded = FusionVLM.from_pretrained(trained.final_dir).eval()  # a fresh object from the exported files
    assert answers_of(loaded, images) == ANSWERS

    # a second round trip through the user's own save_pretrained keeps the answers
    loaded.save_pretrained(tmp_path / "again")
    again = FusionVLM.from_pretrained(tmp_path / "again").eval()
    assert answers_of(again, images) == ANSWERS


def test_generate_command_gives_the_trained_answer(world, trained, capsys):
    from fusion_vlm.cli import main

    root, _ = world
    for name, answer in ANSWERS.items():
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(trained.final_dir), "--image",
                     str(root / "images" / f"{name}.png"), "--question", QUESTION, "--max-new-tokens", "12"]) == 0
        printed = capsys.readouterr().out
        assert re.findall(r"^A: (.*)$", printed, flags=re.M) == [answer], printed
