"""scripts/sweep_stage3.sh: where the runs without the question start (VQ_FT_FROM), checked by a dry run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sweep_stage3.sh"


def _run(tmp_path, **env):
    # LAUNCH is a no-op command by default, so nothing can train even if DRY_RUN were ignored
    full = {**os.environ, "OUT": str(tmp_path), "NS": "64:8 1:1", "STAGE2": "s2/final", "LAUNCH": "true", **env}
    return subprocess.run(["bash", str(SCRIPT), "--seed", "1"], env=full, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def _commands(stdout):
    """``{output dir name: argument list}`` of the printed dry-run commands."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("[dry-run] "):
            args = line.split()[1:]
            out[Path(args[args.index("--output-dir") + 1]).name] = args
    return out


def _init(args):
    return args[args.index("--init-from") + 1]


def test_default_starts_both_runs_from_stage2(tmp_path):
    r = _run(tmp_path, DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    assert list(cmds) == ["n64_question", "n64_noquestion", "n1_question", "n1_noquestion"]
    assert {_init(a) for a in cmds.values()} == {"s2/final"}
    assert cmds["n64_noquestion"] == ["true", "--config", "stage3_finetune", "--init-from",
                                      "s2/final", "--n-queries", "64", "--n-queries-later", "8", "--use-question",
                                      "false", "--output-dir", f"{tmp_path}/n64_noquestion", "--seed", "1"]
    assert not any(tmp_path.iterdir())  # a dry run trains nothing


def test_vq_ft_from_stage3_continues_each_n(tmp_path):
    r = _run(tmp_path, DRY_RUN="1", VQ_FT_FROM="stage3")
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    assert _init(cmds["n64_question"]) == "s2/final" and _init(cmds["n1_question"]) == "s2/final"
    assert _init(cmds["n64_noquestion"]) == f"{tmp_path}/n64_question/final"
    assert _init(cmds["n1_noquestion"]) == f"{tmp_path}/n1_question/final"
    order = list(cmds)
    assert order.index("n64_question") < order.index("n64_noquestion")  # the start is trained first


def test_vq_ft_from_stage3_needs_the_question_run(tmp_path):
    r = _run(tmp_path, VQ_FT_FROM="stage3", MODES="noquestion", LAUNCH="echo")
    assert r.returncode == 2 and "VQ_FT_FROM=stage3 needs" in r.stderr and "n64_question/final" in r.stderr
    done = tmp_path / "n64_question" / "final"
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"x")
    r = _run(tmp_path, VQ_FT_FROM="stage3", MODES="noquestion", LAUNCH="echo", NS="64:8")
    assert r.returncode == 0, r.stderr
    launched = [line.split() for line in r.stdout.splitlines() if line.startswith("--config")]
    assert len(launched) == 1 and _init(launched[0]) == str(done)


@pytest.mark.parametrize("value", ["stage1", "Stage3", ""])
def test_bad_vq_ft_from_is_refused(tmp_path, value):
    r = _run(tmp_path, DRY_RUN="1", VQ_FT_FROM=value)
    if value == "":  # empty = unset: the default
        assert r.returncode == 0 and _init(_commands(r.stdout)["n64_noquestion"]) == "s2/final"
    else:
        assert r.returncode == 2 and f"VQ_FT_FROM='{value}': expected stage2 or stage3" in r.stderr
