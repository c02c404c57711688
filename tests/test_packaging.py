"""The wheel carries the configs: installed outside the source tree, the presets still resolve (slow: builds a wheel)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_runs_outside_the_tree(tmp_path):
    src, dist = tmp_path / "src", tmp_path / "dist"  # build from a copy: setuptools writes build/ beside the sources
    shutil.copytree(ROOT / "fusion_vlm", src / "fusion_vlm", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", src / "configs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("fusion_vlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in ("model/paper.yaml", "model/tiny.yaml", "train/stage2_generation.yaml", "deepspeed/zero2.json",
                "llm/Llama-2-7b-chat-hf.json"):
        assert f"fusion_vlm/configs/{rel}" in names, rel

    # a fresh venv outside the source tree: the wheel installed there, the dependencies seen through a .pth line
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    target = next((venv / "lib").glob("python3*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    (target / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # a plain path line: no editable hook
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    code = ("import json, fusion_vlm, sys; from fusion_vlm.cli import main; "
            "print(json.dumps({'file': fusion_vlm.__file__})); "
            "sys.exit(main(['info', '--config', 'paper', '--device', 'meta', '--image-size', '640x480', '--json']))")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, rest = proc.stdout.split("\n", 1)
    assert json.loads(first)["file"].startswith(str(target))  # the installed copy, not the source tree
    info = json.loads(rest)
    assert info["tokens"]["vision_tokens"] == 1450 and info["parameters"]["llm"]["total"] > 6e9
