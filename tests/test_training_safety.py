"""NaN/Inf steps, SIGTERM, atomic checkpoints and RNG state (DeepSpeed on the CPU, tiny model)."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from conftest import patch_forward

from fusion_vlm.cli import main
from fusion_vlm.training import checkpoint as ckpt
from fusion_vlm.training.config import load_train_config
from fusion_vlm.training.loop import NonFiniteLossError, train
from fusion_vlm.training.metrics import read_metrics
from fusion_vlm.training.tiny_data import make_tiny_dataset

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_data")
    return make_tiny_dataset(root, n=8, seed=1), root


def cfg_for(tiny_data, out, *overrides):
    path, root = tiny_data
    return load_train_config("tiny_stage2", [
        f"data.files=[{path}]", f"data.image_root={root}", f"output_dir={out}", "init_from=null",
        "logging.progress_bar=false", "logging.wandb_mode=disabled", "micro_batch_size=2", "grad_accum=1",
        "checkpoint.every=0", *overrides])


def test_nonfinite_steps_are_skipped_then_abort(tiny_data, tmp_path, monkeypatch):
    def nan_on_2_and_3(n, out):
        if n in (2, 3):
            out["loss"] = out["loss"] * float("nan")

    patch_forward(monkeypatch, nan_on_2_and_3)
    result = train(cfg_for(tiny_data, tmp_path / "a", "max_steps=4", "max_nonfinite_in_a_row=3"))
    assert result.steps == 4 and result.nonfinite_steps == 2
    rows = read_metrics(tmp_path / "a/metrics.jsonl")
    assert [r["skipped_step"] for r in rows] == [False, True, True, False]
    assert rows[1]["lr"] == rows[2]["lr"] == rows[3]["lr"]  # the schedule does not advance on skipped steps
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "a/final/model.safetensors")).values())

    monkeypatch.undo()
    patch_forward(monkeypatch, lambda n, out: out.__setitem__("loss", out["loss"] * float("inf")))
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        train(cfg_for(tiny_data, tmp_path / "b", "max_steps=6", "max_nonfinite_in_a_row=3"))


def test_sigterm_saves_a_checkpoint_and_exits(tiny_data, tmp_path, monkeypatch, capsys):
    def term_on_2(n, out):
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    patch_forward(monkeypatch, term_on_2)
    path, root = tiny_data
    code = main(["train", "--config", "tiny_stage2", "--output-dir", str(tmp_path / "run"), "--init-from", "null",
                 "--data.files", f"[{path}]", "--data.image-root", str(root), "--grad-accum", "1",
                 "--max-steps", "5", "--logging.progress-bar", "false"])
    assert code == 143
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stopped"] == "signal" and summary["steps"] == 2 and summary["final"] is None
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2]
    assert signal.getsignal(signal.SIGTERM) is not None  # handler restored
    monkeypatch.undo()
    result = train(cfg_for(tiny_data, tmp_path / "run", "max_steps=5"))
    assert result.steps == 5 and sorted(result.losses) == [3, 4, 5] and result.final_dir is not None


def test_checkpoint_listing_ignores_incomplete_and_rng_round_trip(tmp_path):
    (tmp_path / "checkpoint-0000004").mkdir()
    (tmp_path / "checkpoint-0000004" / ckpt.STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-0000009").mkdir()  # no trainer_state.json: incomplete
    (tmp_path / ".tmp-checkpoint-0000012").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-0000004"
    assert ckpt.resolve_resume("never", tmp_path) is None
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere").name == "checkpoint-0000004"
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        ckpt.resolve_resume(str(tmp_path / "nothing"), tmp_path)
    meta, tensors = ckpt.rng_state()
    json.dumps(meta)  # JSON-safe
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(meta, tensors)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
