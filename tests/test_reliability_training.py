"""Training reliability: wandb stays off the network, non-finite steps are visible and never exported,
image paths stay inside data.image_root (DeepSpeed on the CPU, tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion_vlm.cli import main
from fusion_vlm.config import CONFIG_DIR
from fusion_vlm.schema import override_flags
from fusion_vlm.training.config import LoggingConfig, TrainConfig, load_train_config
from fusion_vlm.training.data import SkipCounter, SkipSample, load_llava, parse_record
from fusion_vlm.training.loop import NonFiniteLossError, train
from fusion_vlm.training.metrics import MetricsLogger, read_metrics
from fusion_vlm.training.tiny_data import make_tiny_dataset
from conftest import make_image, patch_forward

QUICK = ["init_from=null", "logging.progress_bar=false", "micro_batch_size=2", "grad_accum=1", "checkpoint.every=0",
         "optim.warmup_ratio=0.0"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_data")
    return make_tiny_dataset(root, n=8, seed=2), root


def cfg_for(tiny_data, out, *overrides):
    path, root = tiny_data
    return load_train_config("tiny_stage2", [f"data.files=[{path}]", f"data.image_root={root}",
                                             f"output_dir={out}", *QUICK, *overrides])


# ----------------------------------------------------------------------------- wandb: offline means offline
def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PYTHONPATH"] = str(CONFIG_DIR.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_default_logging_never_imports_wandb(tmp_path):
    assert TrainConfig().logging.wandb_mode == "disabled"
    for yaml in sorted((CONFIG_DIR / "train").glob("*.yaml")):
        assert load_train_config(yaml).logging.wandb_mode == "disabled", yaml.name
    r = _python("import sys\n"
                "from fusion_vlm.training.config import TrainConfig\n"
                "from fusion_vlm.training.metrics import MetricsLogger\n"
                "m = MetricsLogger('out', TrainConfig().logging, 2)\n"
                "m.log(1, {'loss': 1.0}); m.close()\n"
                "print('wandb' in sys.modules)", tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_wandb_offline_opens_no_connection(tmp_path):
    """Every outbound connection attempt of the Python side is recorded until the process ends (wandb 0.31
    probed its server for telemetry at exit in offline mode: a DNS lookup and a 10 s timeout without a network)."""
    pytest.importorskip("wandb")
    code = """
import atexit, json, socket, sys
attempts = []
atexit.register(lambda: open('attempts.json', 'w').write(json.dumps(attempts)))  # runs after wandb's own hooks
real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
def getaddrinfo(host, *a, **k):
    attempts.append(("dns", host)); raise socket.gaierror("no network in this test")
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        attempts.append(("connect", address)); raise OSError("no network in this test")
    return real_connect(self, address)
socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
from fusion_vlm.training.config import LoggingConfig
from fusion_vlm.training.metrics import MetricsLogger
m = MetricsLogger('out', LoggingConfig(wandb_mode='offline', progress_bar=False), 2)
m.log(1, {'loss': 1.0}); m.log(2, {'loss': 0.5}); m.close()
"""
    r = _python(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "attempts.json").read_text()) == []
    runs = list((tmp_path / "out/wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((tmp_path / "out").rglob("*"))
    assert "wandb sync" in r.stderr


# ----------------------------------------------------------------------------- non-finite steps
@pytest.mark.parametrize("lr", ["1000.0", "1.0e30"])
def test_diverged_run_stops_and_exports_nothing(tiny_data, tmp_path, lr, capsys):
    path, root = tiny_data
    out = tmp_path / "run"
    code = main(["train", "--config", "tiny_stage2", "--output-dir", str(out), "--max-steps", "10",
                 *override_flags([f"data.files=[{path}]", f"data.image_root={root}", *QUICK, f"optim.lr={lr}"])])
    err = capsys.readouterr().err
    assert code == 2 and not (out / "final").exists()
    line = [x for x in err.splitlines() if x.startswith("fusion-vlm train: error:")]
    assert len(line) == 1 and "in a row had a NaN/Inf loss or gradient" in line[0], err[-2000:]
    rows = read_metrics(out / "metrics.jsonl")
    # step 1 applies a huge update, every later step overflows: skipped and shown as skipped in the rows
    assert rows[0]["skipped_step"] is False and all(r["skipped_step"] for r in rows[1:])
    assert [r["skipped_steps"] for r in rows] == list(range(len(rows)))
    assert len(rows) == 7  # 10 steps: stopped after 6 skipped in a row (more than half the run)


def test_skipped_only_training_is_not_exported(tiny_data, tmp_path, monkeypatch):
    """Skips that are never 6 in a row but more than half of the run: no export."""
    patch_forward(monkeypatch, lambda n, out: out.__setitem__("loss", out["loss"] * float("nan"))
                  if n in (1, 3, 5, 6) else None)
    with pytest.raises(NonFiniteLossError, match=r"4 of 6 optimizer steps .* were skipped \(2 applied\)"):
        train(cfg_for(tiny_data, tmp_path / "run", "max_steps=6"))
    assert not (tmp_path / "run/final").exists()


def test_skipped_steps_show_in_rows_summary_and_bar(tiny_data, tmp_path, monkeypatch, capsys):
    patch_forward(monkeypatch, lambda n, out: out.__setitem__("loss", out["loss"] * float("nan"))
                  if n == 2 else None)
    result = train(cfg_for(tiny_data, tmp_path / "run", "max_steps=4"))
    assert (result.steps, result.nonfinite_steps, result.applied_steps) == (4, 1, 3) and result.final_dir
    summary = json.loads((tmp_path / "run/train_summary.json").read_text())
    assert (summary["nonfinite_steps"], summary["applied_steps"]) == (1, 3)
    assert "[train] 1 of 4 optimizer steps were skipped" in capsys.readouterr().err
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "run/metrics.jsonl")] == [0, 1, 1, 1]

    logger = MetricsLogger(tmp_path / "bar", LoggingConfig(progress_bar=True), total_steps=3)
    logger.log(1, {"loss": 5.5, "skipped_step": False, "skipped_steps": 0})
    assert "skipped" not in logger.bar.postfix
    logger.log(2, {"loss": 5.4, "skipped_step": True, "skipped_steps": 1})
    assert "loss=skipped" in logger.bar.postfix and "skipped=1" in logger.bar.postfix
    logger.close()


def test_nonfinite_weights_are_never_exported(tmp_path):
    from fusion_vlm.model import FusionVLM
    from fusion_vlm.training.loop import _export

    class Engine:
        def zero_optimization_stage(self):
            return 2

    model = FusionVLM.from_config("tiny")
    name, param = next((n, p) for n, p in model.named_parameters() if n.startswith("projector"))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=f"first: {name}"):
        _export(model, Engine(), tmp_path / "final", 0)
    assert not (tmp_path / "final").exists()


# ----------------------------------------------------------------------------- image paths inside image_root
def _rec(i, image):
    return {"id": f"r{i}", "image": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                              {"from": "gpt", "value": "a"}]}


def test_image_paths_stay_inside_image_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    make_image(32, 32).save(root / "sub/in.png")
    make_image(32, 32).save(outside / "out.png")
    (root / "link_out.png").symlink_to(outside / "out.png")
    (root / "link_in.png").symlink_to(root / "sub/in.png")
    records = [_rec(0, "sub/in.png"), _rec(1, str(root / "sub/in.png")), _rec(2, "sub/../sub/in.png"),
               _rec(3, "link_in.png"),  # inside: relative, absolute inside, harmless .., symlink inside
               _rec(4, "../secret/out.png"), _rec(5, str(outside / "out.png")), _rec(6, "link_out.png"),
               _rec(7, "/etc/hostname")]  # outside: .., absolute, symlink out, absolute elsewhere
    f = tmp_path / "d.json"
    f.write_text(json.dumps(records))
    counter = SkipCounter(max_fraction=1.0, log_first=0)
    ds = load_llava([str(f)], str(root), counter)
    assert ds["id"] == ["r0", "r1", "r2", "r3"]
    assert counter.summary()["by_reason"] == {"outside_image_root": 4}
    with pytest.raises(SkipSample, match=r"outside data.image_root .*allow_outside_image_root=true"):
        parse_record(records[6], str(root))
    allowed = SkipCounter(max_fraction=1.0, log_first=0)
    ds = load_llava([str(f)], str(root), allowed, allow_outside_root=True)
    assert len(ds) == 8 - (not os.path.isfile("/etc/hostname")) and allowed.skipped == len(records) - len(ds)
    assert TrainConfig().data.allow_outside_image_root is False


def test_training_counts_refused_paths(tiny_data, tmp_path):
    path, root = tiny_data
    make_image(48, 48).save(tmp_path / "elsewhere.png")
    records = json.loads(path.read_text()) + [_rec(99, str(tmp_path / "elsewhere.png"))]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(records))
    result = train(cfg_for(tiny_data, tmp_path / "run", f"data.files=[{f}]", "max_steps=1"))
    assert result.skips["by_reason"] == {"outside_image_root": 1}
    result = train(cfg_for(tiny_data, tmp_path / "run2", f"data.files=[{f}]", "max_steps=1",
                           "data.allow_outside_image_root=true"))
    assert result.skips["skipped"] == 0
