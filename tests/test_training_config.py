"""Training configs, command-line shortcuts, the memory plan, converters and the sweep script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion_vlm.cli import build_parser
from fusion_vlm.schema import ConfigError, overrides_from_namespace
from fusion_vlm.training.config import TrainConfig, load_train_config
from fusion_vlm.training.engine import deepspeed_config, lr_factor

ROOT = Path(__file__).resolve().parent.parent


def test_paper_stage_hyperparameters():
    s1, s2, s3 = (load_train_config(n) for n in ("stage1_contrastive", "stage2_generation", "stage3_finetune"))
    assert (s1.stage, s1.micro_batch_size, s1.grad_accum, s1.max_steps, s1.optim.warmup_ratio) == \
        ("contrastive", 32, 1, 1000, 0.1)
    assert (s2.stage, s2.micro_batch_size, s2.grad_accum, s2.epochs, s2.optim.warmup_ratio) == \
        ("generation", 5, 64, 2.0, 0.03)
    assert (s3.micro_batch_size, s3.grad_accum, s3.epochs, s3.data.fraction, s3.init_from) == \
        (5, 64, 1.0, 0.1, "runs/stage2_generation/final")
    for c in (s1, s2, s3):
        assert c.optim.lr == 2e-5 and c.optim.schedule == "cosine" and c.model == "paper"
    assert (s2.n_queries, s2.n_queries_later) == (256, None)  # N' = min(256, 8) = 8 (tests/test_cli_schema.py)
    for name in ("tiny_stage1", "tiny_stage2", "tiny_stage3"):
        t = load_train_config(name)
        assert t.model == "tiny" and t.engine.device == "cpu"


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="optim.warmup_ratio"):
        load_train_config("tiny_stage1", ["optim.warmup_ratio=1.5"])
    with pytest.raises(ConfigError, match="data.nope"):
        load_train_config("tiny_stage1", ["data.nope=1"])
    with pytest.raises(ConfigError, match="stage"):
        load_train_config("tiny_stage1", ["stage=pretrain"])
    with pytest.raises(ConfigError, match=r"optim.lr_scale.fusion=-1: must be a number > 0"):
        load_train_config("tiny_stage1", ["optim.lr_scale.fusion=-1"])
    assert load_train_config("tiny_stage1", ["optim.lr_scale.fusion=0.3"]).optim.lr_scale == {"fusion": 0.3}
    with pytest.raises(FileNotFoundError, match="no_such_preset"):
        load_train_config("no_such_preset")
    with pytest.raises(ConfigError, match=r"n_queries_choices=0: every value must be an integer >= 1"):
        load_train_config("tiny_stage1", ["n_queries_choices=[4,0]"])
    with pytest.raises(ConfigError, match=r"n_queries_later=4: must be null when n_queries_choices is set"):
        load_train_config("tiny_stage1", ["n_queries_choices=[4,8]", "n_queries_later=4"])
    assert load_train_config("tiny_stage1", ["n_queries_choices=[1,4]"]).n_queries_choices == [1, 4]


def test_stage3_command_line_sets_n_and_question():
    args = build_parser().parse_args(["train", "--config", "stage3_finetune", "--n-queries", "4", "--use-question",
                                      "false", "--output-dir", "o", "--checkpoint.resume", "never"])
    cfg = load_train_config(args.config, overrides_from_namespace(args, TrainConfig))
    assert (cfg.n_queries, cfg.n_queries_later, cfg.use_question, cfg.output_dir) == (4, None, False, "o")
    assert cfg.checkpoint.resume == "never"
    assert cfg.model_overrides_all() == ["fusion.n_queries=4", "fusion.n_queries_later=null",
                                         "fusion.use_question=false"]
    args = build_parser().parse_args(["train", "--config", "stage3_finetune", "--n-queries", "768",
                                      "--n-queries-later", "8", "--local_rank=3"])
    cfg = load_train_config(args.config, overrides_from_namespace(args, TrainConfig))
    assert (cfg.n_queries, cfg.n_queries_later, cfg.use_question) == (768, 8, True)


def test_deepspeed_config_and_schedule():
    cfg = load_train_config("stage2_generation")
    ds = deepspeed_config(cfg, world=8, device="cuda", torch_optimizer=False)
    assert ds["train_batch_size"] == 2560 and ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 2e-5
    ds = deepspeed_config(load_train_config("tiny_stage1", ["engine.deepspeed_config=configs/deepspeed/zero3.json"]),
                          world=1, device="cpu", torch_optimizer=True)
    assert ds["zero_optimization"]["stage"] == 3 and not ds["bf16"]["enabled"] and "optimizer" not in ds
    f = [lr_factor(s, 100, 0.1, "cosine") for s in range(100)]
    assert f[0] < f[5] < f[9] <= 1.0 and f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5, abs=0.02)
    assert f[99] < 0.01 and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_memory_estimate_for_the_paper_config():
    from fusion_vlm.config import load_model_config
    from fusion_vlm.model import FusionVLM
    from fusion_vlm.training.memory import estimate_memory as estimate

    mcfg = load_model_config("paper")
    tcfg = load_train_config("stage2_generation")
    meta = FusionVLM(mcfg, device="meta")

    def estimate_memory(*args):
        return estimate(*args, model=meta)

    est = estimate_memory(mcfg, tcfg, 5, 2, 8, True)
    assert 8.0e9 < est.params_total < 8.3e9 and 1.0e9 < est.params_trainable < 1.1e9
    assert est.weights == pytest.approx(est.params_total * 2 / 2**30)
    assert est.optimizer_states == pytest.approx(est.params_trainable * 16 / 8 / 2**30)
    assert est.activations_checkpointing < est.activations_no_checkpointing / 5
    assert est.total == pytest.approx(est.weights + est.gradients + est.optimizer_states + est.activations
                                      + est.overhead)
    assert est.fits(40) and not estimate_memory(mcfg, tcfg, 5, 2, 8, False).fits(40)
    z3 = estimate_memory(mcfg, tcfg, 5, 3, 8, True)
    assert z3.weights == pytest.approx(est.weights / 8)
    assert estimate_memory(mcfg, tcfg, 10, 2, 8, True).activations > 1.9 * est.activations


def _run(script, *args, env=None):
    return subprocess.run([sys.executable if script.endswith(".py") else "bash", str(ROOT / script), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_convert_svit(tmp_path):
    src = tmp_path / "svit.json"
    src.write_text(json.dumps([
        {"image_id": 7, "conversations": [{"from": "user", "value": "What is <st>this<ed> [1, 2, 3, 4]?"},
                                          {"from": "gpt", "value": "A cat."}]},
        {"image_id": 8, "conversations": [{"topic": "t", "conversation": [{"from": "user", "value": "Q"},
                                                                          {"from": "gpt", "value": "A"}]},
                                          {"topic": "u", "qas": [{"from": "user", "value": "Q2"},
                                                                 {"from": "gpt", "value": "A2"}]}]},
        {"conversations": []}, {"image_id": 9, "conversations": [{"from": "gpt", "value": "A"}]}]))
    out = tmp_path / "o.jsonl"
    r = _run("scripts/convert_svit.py", str(src), "-o", str(out), "--strip-markers")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert (stats["converted"], stats["no_image_id"], stats["bad_turns"]) == (3, 1, 1)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[0] == {"id": "7", "image": "VG_100K/7.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this [1, 2, 3, 4]?"}, {"from": "gpt", "value": "A cat."}]}
    assert [r["id"] for r in recs[1:]] == ["8_0", "8_1"]
    from fusion_vlm.training.data import parse_record

    assert parse_record(recs[1], "/img")["questions"] == ["Q"]
    assert _run("scripts/convert_svit.py", str(tmp_path / "missing.json"), "-o", str(out)).returncode == 2


def test_convert_docdownstream(tmp_path):
    rows = [{"image": ["./imgs/DocVQA/a.png"], "messages": [
                {"role": "user", "content": "<|image|>What is the date?"}, {"role": "assistant", "content": "1999"},
                {"role": "user", "content": "And the name?"}, {"role": "assistant", "content": "Bob"}],
             "task_name": "qa_sft", "dataset_name": "DocVQA"},
            {"image": ["a.png", "b.png"], "messages": [], "dataset_name": "X"}]
    src = tmp_path / "train.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    out = tmp_path / "o.json"
    r = _run("scripts/convert_docdownstream.py", str(src), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in json.loads(r.stdout).items() if k != "output"} == \
        {"converted": 1, "multi_image": 1, "bad_json": 1}
    rec = json.loads(out.read_text())[0]
    assert rec["id"] == "DocVQA-1" and rec["image"] == "imgs/DocVQA/a.png"
    assert rec["conversations"][0] == {"from": "human", "value": "<image>\nWhat is the date?"}
    assert [t["from"] for t in rec["conversations"]] == ["human", "gpt", "human", "gpt"]


def test_sweep_script_covers_the_paper_list(tmp_path):
    done = tmp_path / "n8_question/final"
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"x")
    env = {**os.environ, "LAUNCH": "echo", "OUT": str(tmp_path)}
    r = _run("scripts/sweep_stage3.sh", "--seed", "1", env=env)
    assert r.returncode == 0, r.stderr
    runs = [line.split() for line in r.stdout.splitlines() if line.startswith("--config")]
    pairs = [(a[a.index("--n-queries") + 1], a[a.index("--n-queries-later") + 1], a[a.index("--use-question") + 1])
             for a in runs]
    expected = [(n, p, q) for n, p in [("768", "8"), ("512", "8"), ("384", "8"), ("256", "8"), ("128", "8"),
                                       ("64", "8"), ("32", "8"), ("16", "8"), ("8", "8"), ("1", "1")]
                for q in ("true", "false") if (n, q) != ("8", "true")]
    assert pairs == expected and all(a[-2:] == ["--seed", "1"] for a in runs)
    assert "n8_question done, skipping" in r.stdout


def test_deterministic_algorithms_block_restores_the_setting(monkeypatch):
    import torch.utils.deterministic

    from fusion_vlm.training.engine import deterministic_algorithms

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # off: nothing touched
    with pytest.raises(KeyError):
        with deterministic_algorithms(True):
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.utils.deterministic.fill_uninitialized_memory  # no NaN fill of every new tensor
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
            raise KeyError("inside")
    assert not torch.are_deterministic_algorithms_enabled()  # restored on the way out of an error too
    assert torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    try:
        with deterministic_algorithms(True):
            pass
        assert torch.are_deterministic_algorithms_enabled()  # a setting that was on stays on
    finally:
        torch.use_deterministic_algorithms(False)
