"""Shared fixtures: a tiny random-initialised FusionVLM and generated images (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny preset, seeded, on the CPU in eval mode (shared: do not train it in a test)."""
    from fusion_vlm.model import FusionVLM

    torch.manual_seed(0)
    model = FusionVLM.from_config("tiny")
    model.eval()
    return model


# a small text LLM for the stage-0 tests (tests/test_demo_*.py)
SMALL_LLM = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with smooth gradients and a few coloured blocks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                    np.full_like(x, int(rng.integers(0, 255)))], axis=-1).astype(np.uint8)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        arr[y0:y0 + height // 5 + 1, x0:x0 + width // 5 + 1] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


@pytest.fixture(scope="session")
def image_factory():
    return make_image


def patch_forward(monkeypatch, on_call):
    """Wrap FusionVLM.forward: ``on_call(n, out)`` may alter the output of the n-th call (1-based)."""
    from fusion_vlm.model import FusionVLM

    original, calls = FusionVLM.forward, {"n": 0}

    def forward(self, batch, stage="generation"):
        out = original(self, batch, stage)
        calls["n"] += 1
        on_call(calls["n"], out)
        return out

    monkeypatch.setattr(FusionVLM, "forward", forward)


POPE_COLORS = ["red", "green", "blue", "yellow"]  # TinyPOPE: "Is the image <colour>?", Yes for green and yellow


@pytest.fixture
def tiny_pope(tmp_path, monkeypatch):
    """LMUData with a 4-image yes/no TSV (one plain image per colour of POPE_COLORS) registered as the local
    VLMEvalKit dataset TinyPOPE; network blocked (vlmeval tests only)."""
    import base64
    import io
    import socket

    import pandas as pd

    from fusion_vlm.evaluation.registry import import_vlmeval

    import_vlmeval()
    from vlmeval.dataset.image_yorn import ImageYORNDataset

    def no_network(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("PRED_FORMAT", "tsv")
    rows = []
    for i, c in enumerate(POPE_COLORS):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), c).save(buf, format="PNG")
        rows.append(dict(index=i, image=base64.b64encode(buf.getvalue()).decode(), question=f"Is the image {c}?",
                         answer="Yes" if i % 2 else "No", category="random"))
    lmu = tmp_path / "LMUData"
    lmu.mkdir()
    pd.DataFrame(rows).to_csv(lmu / "TinyPOPE.tsv", sep="\t", index=False)
    monkeypatch.setitem(ImageYORNDataset.DATASET_URL, "TinyPOPE", "")  # local TSV, no download or checksum
    return lmu


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A save_pretrained directory of the tiny preset with random weights (seed 0)."""
    from fusion_vlm.model import FusionVLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    FusionVLM.from_config("tiny").save_pretrained(path)
    return path
