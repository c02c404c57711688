"""A small generated LLaVA-format data set for the tiny CPU configs and the tests.

``python -m fusion_vlm.training.tiny_data DIR [N]`` writes ``DIR/train.json``
(LLaVA JSON list) and ``DIR/images/*.png``: coloured shapes with questions
about their colour and position, 1-3 question/answer turns per image.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SIDES = ("left", "right")


def make_record(i: int, rng: random.Random, image_dir: Path) -> dict:
    """One image with a coloured square on the left or right, and 1-3 turns about it."""
    colour, side = rng.choice(sorted(COLOURS)), rng.choice(SIDES)
    w, h = rng.choice([(96, 96), (160, 112), (112, 200), (240, 128)])
    img = Image.new("RGB", (w, h), (245, 245, 245))
    x0 = 4 if side == "left" else w // 2 + 4
    ImageDraw.Draw(img).rectangle([x0, h // 4, x0 + w // 3, 3 * h // 4], fill=COLOURS[colour])
    name = f"images/{i:05d}.png"
    img.save(image_dir.parent / name)
    turns = [("What colour is the square?", f"The square is {colour}."),
             ("Which side is it on?", f"It is on the {side}."),
             ("Describe the image.", f"A {colour} square on the {side} of a light background.")]
    k = rng.randint(1, 3)
    conv = []
    for j, (q, a) in enumerate(turns[:k]):
        conv.append({"from": "human", "value": ("<image>\n" + q) if j == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": f"tiny-{i:05d}", "image": name, "conversations": conv}


def make_tiny_dataset(directory: str | Path, n: int = 16, seed: int = 0) -> Path:
    """Write ``n`` records and their images under ``directory``; returns the JSON file's path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = [make_record(i, rng, directory / "images") for i in range(n)]
    path = directory / "train.json"
    path.write_text(json.dumps(records, indent=1))
    return path


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python -m fusion_vlm.training.tiny_data DIR [N]", file=sys.stderr)
        sys.exit(2)
    print(make_tiny_dataset(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16))
