"""Resume survives a damaged checkpoint: verification, fallback to the newest intact one, one-line errors.

One short run (DeepSpeed on the CPU, tiny model) leaves checkpoints at steps 2 and 4; each test copies it,
damages checkpoint 4 in one way and resumes. The reference is an undamaged resume from checkpoint 2.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from fusion_vlm.cli import main
from fusion_vlm.errors import CheckpointError
from fusion_vlm.schema import override_flags
from fusion_vlm.training import checkpoint as ckpt
from fusion_vlm.training.config import LoggingConfig, load_train_config
from fusion_vlm.training.loop import train
from fusion_vlm.training.metrics import MetricsLogger, read_metrics
from fusion_vlm.training.tiny_data import make_tiny_dataset

pytest.importorskip("deepspeed")
COMMON = ["init_from=null", "max_steps=5", "checkpoint.every=2", "checkpoint.keep_last=3", "micro_batch_size=2",
          "grad_accum=1", "logging.progress_bar=false", "logging.wandb_mode=disabled"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(config overrides, base output with checkpoints 2 and 4, losses of steps 3-5 resumed from checkpoint 2)."""
    root = tmp_path_factory.mktemp("resume_data")
    path = make_tiny_dataset(root, n=8, seed=3)
    work = tmp_path_factory.mktemp("resume_runs")
    common = [f"data.files=[{path}]", f"data.image_root={root}", *COMMON]
    base = work / "base"
    first = train(load_train_config("tiny_stage2", [*common, f"output_dir={base}", "stop_at_step=4"]))
    assert first.steps == 4 and [s for s, _ in ckpt.list_checkpoints(base)] == [2, 4]
    ref = work / "ref"
    shutil.copytree(base, ref)
    shutil.rmtree(ref / "checkpoint-0000004")
    reference = train(load_train_config("tiny_stage2", [*common, f"output_dir={ref}"]))
    assert sorted(reference.losses) == [3, 4, 5]
    return common, base, reference.losses


def _truncate(p, keep=0.5):
    os.truncate(p, int(p.stat().st_size * keep))


def _zero_fill(p):
    p.write_bytes(b"\0" * p.stat().st_size)


DAMAGE = {
    "truncated_engine_file": ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", _truncate),
    "zero_filled_model_states": ("ds/mp_rank_00_model_states.pt", _zero_fill),
    "missing_ds_folder": ("ds", shutil.rmtree),
    "truncated_safetensors": ("rank00000.safetensors", lambda p: _truncate(p, 0.9)),
    "corrupt_trainer_state_json": ("trainer_state.json", lambda p: p.write_text('{"step": 4, "epo')),
    "corrupt_rank_json": ("rank00000.json", lambda p: p.write_text(p.read_text()[:-20])),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(runs, tmp_path, kind, capsys):
    common, base, reference = runs
    out = tmp_path / "run"
    shutil.copytree(base, out)
    name, damage = DAMAGE[kind]
    damage(out / "checkpoint-0000004" / name)
    capsys.readouterr()
    result = train(load_train_config("tiny_stage2", [*common, f"output_dir={out}"]))
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "skipping damaged checkpoint" in line]
    assert len(warning) == 1 and f"checkpoint-0000004/{name}" in warning[0], err
    assert result.steps == 5 and sorted(result.losses) == [3, 4, 5]  # resumed at step 2
    assert result.losses == pytest.approx(reference, rel=1e-6, abs=1e-7)
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert [e["checkpoint"] for e in events if e["event"] == "resume"] == [str(out / "checkpoint-0000002")]
    # steps 3 and 4 were logged by the first run and again after the resume: read_metrics keeps the last
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows[2:]] == pytest.approx([result.losses[s] for s in (3, 4, 5)], rel=1e-9)
    ckpt.verify_checkpoint(out / "checkpoint-0000004")  # redone and saved again, intact


def test_no_intact_checkpoint_is_a_one_line_error(runs, tmp_path, capsys):
    common, base, _ = runs
    out = tmp_path / "run"
    shutil.copytree(base, out)
    _zero_fill(out / "checkpoint-0000004/ds/mp_rank_00_model_states.pt")
    (out / "checkpoint-0000002/trainer_state.json").write_text("{not json")
    capsys.readouterr()
    code = main(["train", "--config", "tiny_stage2", "--output-dir", str(out),
                 *override_flags(common)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("fusion-vlm train: error:")]
    assert len(line) == 1 and "no intact checkpoint" in line[0] and "mp_rank_00_model_states.pt" in line[0], err
    # a named damaged checkpoint is not replaced by another one
    with pytest.raises(CheckpointError, match=r"checkpoint-0000002/trainer_state.json: trainer state is not valid"):
        ckpt.find_resume(str(out / "checkpoint-0000002"), out)


def test_checkpoints_without_manifest_are_checked_as_far_as_possible(runs, tmp_path, capsys):
    """Checkpoints written before manifests: intact ones resume; damaged DeepSpeed archives fail their CRC."""
    common, base, reference = runs
    out = tmp_path / "run"
    shutil.copytree(base, out)
    for c in ("checkpoint-0000002", "checkpoint-0000004"):
        (out / c / ckpt.MANIFEST).unlink()
        assert ckpt.verify_checkpoint(out / c)["step"] == int(c[-7:])
    optim = out / "checkpoint-0000004/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with optim.open("r+b") as f:  # same size, 4 KiB flipped in the middle of a tensor record
        f.seek(optim.stat().st_size // 2)
        block = f.read(4096)
        f.seek(optim.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        ckpt.verify_checkpoint(out / "checkpoint-0000004")
    result = train(load_train_config("tiny_stage2", [*common, f"output_dir={out}"]))
    assert "skipping damaged checkpoint checkpoint-0000004" in capsys.readouterr().err
    assert result.losses == pytest.approx(reference, rel=1e-6, abs=1e-7)
    assert (out / "checkpoint-0000004" / ckpt.MANIFEST).is_file()  # saved again, now with a manifest


def test_manifest_lists_every_file_with_size_and_sha256(runs):
    _, base, _ = runs
    c = base / "checkpoint-0000004"
    files = json.loads((c / ckpt.MANIFEST).read_text())["files"]
    on_disk = sorted(str(p.relative_to(c)) for p in c.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST)
    assert sorted(files) == on_disk and "ds/mp_rank_00_model_states.pt" in files
    import hashlib

    for rel, entry in files.items():
        data = (c / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_read_metrics_keeps_last_row_per_step_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"event": "checkpoint", "step": 2}\n'
                    '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')  # crashed while writing step 4
    logger = MetricsLogger(tmp_path, LoggingConfig(progress_bar=False), total_steps=4, start_step=2)
    logger.event("resume", step=2)
    logger.log(3, {"loss": 1.5})
    logger.log(4, {"loss": 0.5})
    logger.close()
    rows = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 0.5)]
    assert '{"event": "resume", "step": 2}' in path.read_text().splitlines()  # not glued to the torn line
