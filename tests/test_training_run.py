"""End-to-end training on the CPU through DeepSpeed (gloo, ZeRO-2) with the tiny model.

Runs in-process (DeepSpeed's import and process group are paid once). Covers the
three stages through ``fusion-vlm train``, the frozen LLM, the optimizer's
parameter set, exact resume, overfitting and a data set full of bad records.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fusion_vlm.cli import main
from fusion_vlm.training.batches import ResumableBatchSampler
from fusion_vlm.training.config import load_train_config
from fusion_vlm.training.loop import train
from fusion_vlm.training.metrics import read_metrics
from fusion_vlm.training.tiny_data import make_tiny_dataset
from conftest import make_image

pytest.importorskip("deepspeed")
QUIET = ["--logging.progress-bar", "false", "--logging.wandb-mode", "disabled"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_data")
    return make_tiny_dataset(root, n=12, seed=0), root


def data_args(tiny_data):
    path, root = tiny_data
    return ["--data.files", f"[{path}]", "--data.image-root", str(root)]


def cfg_for(name, tiny_data, out, *overrides):
    path, root = tiny_data
    return load_train_config(name, [f"data.files=[{path}]", f"data.image_root={root}", f"output_dir={out}",
                                    "logging.progress_bar=false", "logging.wandb_mode=disabled", *overrides])


def test_three_stages_through_the_cli(tiny_data, tmp_path, capsys):
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    assert main(["train", "--config", "tiny_stage1", "--output-dir", str(s1), "--max-steps", "2",
                 "--micro-batch-size", "3", *data_args(tiny_data), *QUIET]) == 0
    rows = read_metrics(s1 / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all("contrastive" in r and "identity" in r for r in rows)
    assert all(r["samples"] == 3 and r["tokens"] > 0 and r["lr"] > 0 for r in rows)

    assert main(["train", "--config", "tiny_stage2", "--output-dir", str(s2), "--init-from", str(s1 / "final"),
                 "--max-steps", "2", *data_args(tiny_data), *QUIET]) == 0
    rows = read_metrics(s2 / "metrics.jsonl")
    assert len(rows) == 2 and all("generation" in r and r["samples"] == 4 for r in rows)  # 2 per micro x 2 accum
    before, after = load_file(str(s1 / "final/llm.safetensors")), load_file(str(s2 / "final/llm.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # frozen LLM
    w1, w2 = load_file(str(s1 / "final/model.safetensors")), load_file(str(s2 / "final/model.safetensors"))
    changed = [k for k in w1 if not torch.equal(w1[k], w2[k])]
    assert any(k.startswith("fusion.") for k in changed) and any(k.startswith("projector.") for k in changed)
    assert not any(k.startswith("text_encoder.") for k in changed)  # not trained in stage 2

    capsys.readouterr()
    assert main(["train", "--config", "tiny_stage3", "--output-dir", str(s3), "--init-from", str(s2 / "final"),
                 "--n-queries", "4", "--use-question", "false", *data_args(tiny_data), *QUIET]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["stopped"] is None  # 6 of 12 records / (2 x 2) = one pass, 1 step
    from fusion_vlm.model import FusionVLM

    model = FusionVLM.from_pretrained(s3 / "final")
    f = model.config.fusion
    assert (f.n_queries, f.later, f.use_question) == (4, 4, False)
    saved = load_file(str(s3 / "final/model.safetensors"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())


@pytest.mark.parametrize("on", [True, False])
def test_engine_deterministic_holds_for_the_run_only(tiny_data, tmp_path, monkeypatch, on):
    from fusion_vlm.model import FusionVLM

    seen, forward = [], FusionVLM.forward

    def spy(self, *args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FusionVLM, "forward", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    train(cfg_for("tiny_stage1", tiny_data, tmp_path / "run", "max_steps=2", "checkpoint.every=0",
                  f"engine.deterministic={str(on).lower()}"))
    assert len(seen) >= 2 and set(seen) == {on}  # every training forward ran with the setting
    assert not torch.are_deterministic_algorithms_enabled()  # and it is restored afterwards


def test_optimizer_holds_only_trainable_parameters(tiny_data, tmp_path):
    result = train(cfg_for("tiny_stage2", tiny_data, tmp_path / "run", "init_from=null", "max_steps=1",
                           "checkpoint.every=0"))
    from fusion_vlm.model import FusionVLM

    model = FusionVLM.from_config("tiny")
    trainable = model.set_stage("generation")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(result.optimizer_params) == names and not any(n.startswith("llm.") for n in names)
    n_trainable = sum(p.numel() for p in trainable)
    # AdamW keeps exp_avg + exp_avg_sq for the trainable partition only (ZeRO may pad a little)
    assert 2 * n_trainable <= result.optimizer_state_numel < 2 * n_trainable + 4096
    assert sum(p.numel() for p in model.llm.parameters()) > 4096
    # the DeepSpeed checkpoint (our own torch.save'd file) holds no frozen LLM weights either
    state = torch.load(result.checkpoint / "ds/mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert state["module"] and not any(k.startswith("llm.") for k in state["module"])


def test_a_finished_run_frees_its_engine(tiny_data, tmp_path):
    """The demo and the sweeps train many runs in one process: each run's engine, model and optimizer
    state must go when it ends (DeepSpeed's hooks keep them alive unless the engine is destroyed)."""
    import gc

    def engines():
        gc.collect()
        return sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects())

    before = engines()
    for i in range(2):
        train(cfg_for("tiny_stage2", tiny_data, tmp_path / f"run{i}", "init_from=null", "max_steps=1",
                      "checkpoint.every=0"))
    assert engines() == before


def test_lr_scale_sets_each_modules_step_size(tiny_data, tmp_path):
    """AdamW's first step moves every weight with a non-zero gradient by exactly its group's lr (no decay),
    so after one step the largest change is lr * scale in the fusion module and lr elsewhere."""
    from fusion_vlm.model import FusionVLM

    torch.manual_seed(0)
    FusionVLM.from_config("tiny").save_pretrained(tmp_path / "init")
    result = train(cfg_for("tiny_stage2", tiny_data, tmp_path / "run", f"init_from={tmp_path / 'init'}",
                           "max_steps=1", "checkpoint.every=0", "optim.lr=0.001", "optim.warmup_ratio=0.0",
                           "optim.schedule=constant", "optim.lr_scale={fusion: 0.25}"))
    before = load_file(tmp_path / "init/model.safetensors")
    after = load_file(result.final_dir / "model.safetensors")
    step = {k: (after[k] - before[k]).abs().max().item() for k in before if k in after}
    fusion = max(v for k, v in step.items() if k.startswith("fusion."))
    other = max(v for k, v in step.items() if not k.startswith("fusion."))
    assert fusion == pytest.approx(0.25e-3, rel=1e-3) and other == pytest.approx(1e-3, rel=1e-3), (fusion, other)


def test_lr_scale_typo_is_refused(tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"optim.lr_scale: prefix\(es\) \['fuson'\] match no trained parameter"):
        train(cfg_for("tiny_stage2", tiny_data, tmp_path / "run", "init_from=null", "max_steps=1",
                      "optim.lr_scale={fuson: 0.5}"))


@pytest.mark.parametrize("choices, independent", [([], False), ([1, 2, 8], False), ([1, 2, 8], True)],
                         ids=["fixed_n", "drawn_n", "drawn_n_independent_questions"])
def test_resume_is_exact(tiny_data, tmp_path, choices, independent):
    common = ["stage=generation", "init_from=null", "max_steps=4", "checkpoint.every=2", "micro_batch_size=2",
              "grad_accum=2", "optim.warmup_ratio=0.25", f"n_queries_choices={choices}",
              f"data.independent_questions={str(independent).lower()}"]
    full = train(cfg_for("tiny_stage2", tiny_data, tmp_path / "full", *common))
    first = train(cfg_for("tiny_stage2", tiny_data, tmp_path / "split", *common, "stop_at_step=2"))
    assert first.stopped == "stop_at_step" and first.steps == 2 and first.final_dir is None
    second = train(cfg_for("tiny_stage2", tiny_data, tmp_path / "split", *common))
    assert second.steps == 4 and sorted(second.losses) == [3, 4]  # resumed at step 3
    split = {**first.losses, **second.losses}
    assert sorted(split) == sorted(full.losses) == [1, 2, 3, 4]
    for step in full.losses:
        assert split[step] == pytest.approx(full.losses[step], rel=1e-5, abs=1e-6), step
    events = [json.loads(x) for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e["step"] == 2 for e in events)
    kept = sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*"))
    assert kept == ["checkpoint-0000002", "checkpoint-0000004"] and not list((tmp_path / "split").glob(".tmp-*"))
    if choices:  # each step logs the mean N of its 2 micro-batches: the sampler's draws (6 micro-batches/epoch)
        draws = [ResumableBatchSampler(12, 2, seed=0, epoch=e, n_choices=choices).n_for_batch(b)
                 for e in (0, 1) for b in range(6)]
        want = [(draws[2 * k] + draws[2 * k + 1]) / 2 for k in range(4)]
        for run in ("full", "split"):
            assert [r["n_queries"] for r in read_metrics(tmp_path / run / "metrics.jsonl")] == want, run
        assert len(set(draws[:8])) > 1


def test_drawn_n_beyond_max_queries_is_refused(tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"\[100\] exceed fusion.max_queries=64"):
        train(cfg_for("tiny_stage2", tiny_data, tmp_path / "x", "init_from=null", "n_queries_choices=[1,100]"))


def test_loss_falls_when_overfitting_a_fixed_batch(tiny_data, tmp_path):
    """One fixed batch of 4 images: stage 1 (contrastive + identity) and stage 2 (generation) losses drop.

    The tiny LLM is random with lm_head std 0.02, so its logits are nearly uniform whatever the fused tokens
    are (the generation loss plateaus at ~ln(vocab), in plain PyTorch too); for the generation check the
    random LLM gets a larger init (initializer_range 0.5) so that the visual path can steer it.
    """
    path, root = tiny_data
    f = tmp_path / "four.json"
    f.write_text(json.dumps(json.loads(path.read_text())[:4]))
    fixed = [f"data.files=[{f}]", "micro_batch_size=4", "grad_accum=1", "data.shuffle=false",
             "optim.warmup_ratio=0.0", "optim.schedule=constant", "checkpoint.every=0"]
    losses = train(cfg_for("tiny_stage1", tiny_data, tmp_path / "fit1", *fixed, "max_steps=8",
                           "optim.lr=0.0003")).losses
    # half the early level (mean of steps 1-2: step 1 alone moves with the random init, 4.4 to 9.0 seen)
    assert min(losses[6], losses[7], losses[8]) < 0.25 * (losses[1] + losses[2]), losses
    losses = train(cfg_for("tiny_stage2", tiny_data, tmp_path / "fit2", *fixed, "init_from=null", "max_steps=20",
                           "optim.lr=0.001", "model_overrides=[llm.tiny.initializer_range=0.5]")).losses
    # 20 steps, not fewer: the early losses move with float summation order (one embedding lookup for all
    # questions or one per question gave 10.27 against 9.94 at step 12), the fall over 20 steps does not.
    # lr 1e-3: at 3e-3 this random LLM's loss fell to 10.2 by step 12, then climbed back to 11.9 (seen)
    assert min(losses[18], losses[19], losses[20]) < 0.85 * losses[1], losses


def test_bad_records_are_skipped_and_counted(tiny_data, tmp_path):
    path, root = tiny_data
    good = json.loads(path.read_text())[:4]
    make_image(64, 64).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ok = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    bad = [{"id": "missing", "image": "nope.png", "conversations": ok},
           {"id": "corrupt", "image": "corrupt.jpg", "conversations": ok},
           {"id": "empty", "image": "ok.png", "conversations": [ok[0], {"from": "gpt", "value": ""}]},
           {"id": "nohuman", "image": "ok.png", "conversations": [ok[1]]},
           {"id": "order", "image": "ok.png", "conversations": [ok[1], ok[0]]},
           {"id": "long", "image": "ok.png", "conversations": [ok[0], {"from": "gpt", "value": "x" * 3000}]},
           {"id": "textonly", "conversations": ok}]
    lines = [json.dumps({**g, "image": str(root / g["image"])}) for g in good] + [json.dumps(b) for b in bad]
    lines.insert(2, "{this is not json")
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(lines) + "\n")
    cfg = cfg_for("tiny_stage2", tiny_data, tmp_path / "mixed", "init_from=null", f"data.files=[{f}]",
                  f"data.image_root={tmp_path}", "data.allow_outside_image_root=true", "data.max_skip_fraction=0.9",
                  "epochs=1", "micro_batch_size=2",
                  "grad_accum=1", "checkpoint.every=0")
    result = train(cfg)
    assert result.stopped is None and result.final_dir is not None
    assert result.skips == {"records": 12, "skipped": 8, "by_reason": {
        "bad_record": 1, "empty_answer": 1, "missing_image": 1, "no_human_turn": 1, "no_image": 1,
        "too_long": 1, "turn_order": 1, "unreadable_image": 1}}
    summary = json.loads((tmp_path / "mixed/train_summary.json").read_text())
    assert summary["skips"] == result.skips


def test_wrong_image_root_aborts_with_a_clear_message(tiny_data, tmp_path, capsys):
    code = main(["train", "--config", "tiny_stage2", "--output-dir", str(tmp_path / "x"), "--init-from", "null",
                 *data_args(tiny_data), "--data.image-root", str(tmp_path / "wrong"), *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and "12 of 12 samples skipped" in err and "image_root" in err


def test_zero3_matches_zero2_and_exports(tiny_data, tmp_path):
    common = ["init_from=null", "max_steps=2", "checkpoint.every=0", "micro_batch_size=2", "grad_accum=1"]
    z2 = train(cfg_for("tiny_stage2", tiny_data, tmp_path / "z2", *common))
    z3 = train(cfg_for("tiny_stage2", tiny_data, tmp_path / "z3", *common,
                       "engine.deepspeed_config=configs/deepspeed/zero3.json"))
    assert z3.losses == pytest.approx(z2.losses, rel=1e-4)
    assert set(z3.optimizer_params) == set(z2.optimizer_params) and z2.optimizer_params
    from fusion_vlm.model import FusionVLM

    model = FusionVLM.from_pretrained(tmp_path / "z3/final")
    saved = load_file(str(tmp_path / "z2/final/model.safetensors"))
    assert all(v.shape == model.state_dict()[k].shape for k, v in saved.items())


def test_bf16_path_runs_on_cpu(tiny_data, tmp_path):
    """The GPU precision path (DeepSpeed bf16 + fp32 master weights), exercised on the CPU."""
    common = ["init_from=null", "max_steps=2", "checkpoint.every=0", "micro_batch_size=2", "grad_accum=1"]
    fp32 = train(cfg_for("tiny_stage2", tiny_data, tmp_path / "fp32", *common))
    bf16 = train(cfg_for("tiny_stage2", tiny_data, tmp_path / "bf16", *common, "engine.precision=bf16"))
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2) and bf16.nonfinite_steps == 0
    weights = load_file(str(tmp_path / "bf16/final/model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}


@pytest.mark.slow
def test_two_cpu_ranks_with_torchrun(tiny_data, tmp_path):
    """Two gloo ranks through train/train.py: sharded data, gathered skip counts, per-rank checkpoint state."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path, root = tiny_data
    (root / "corrupt.png").write_bytes(b"garbage")
    lines = path.read_text()
    recs = json.loads(lines) + [{"id": "corrupt", "image": "corrupt.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           str(repo / "train/train.py"), "--config", "tiny_stage2", "--output-dir", str(tmp_path / "w2"),
           "--max-steps", "2", "--init-from", "null", "--data.files", f"[{f}]",
           "--data.image-root", str(root), "--logging.progress-bar", "false"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=repo)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])
    assert summary["steps"] == 2 and summary["skips"]["by_reason"] == {"unreadable_image": 1}
    ck = tmp_path / "w2/checkpoint-0000002"
    assert (ck / "rank00000.json").is_file() and (ck / "rank00001.json").is_file()
    rows = read_metrics(tmp_path / "w2/metrics.jsonl")
    # 2 ranks x micro-batch 2 x accumulation 2 = 8 samples per step, less the corrupt one when it came up
    assert all(r["samples"] in (7, 8) for r in rows) and sum(r["samples"] for r in rows) in (15, 16)


def test_a_world_of_one_needs_no_free_port():
    """A world of one (not launched, or launched as one rank) meets in an in-memory store: a MASTER_PORT
    that another process holds (or two runs racing for one port) cannot fail it with EADDRINUSE."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}  # taken: a TCP rendezvous on it fails
        code = ("import torch.distributed as dist\n"
                "from fusion_vlm.training.engine import setup_distributed\n"
                "r = setup_distributed('cpu')\n"
                "import torch; t = torch.ones(1); dist.all_reduce(t)\n"
                "print(r, dist.get_backend(), float(t))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(0, 1, 0) gloo 1.0"
