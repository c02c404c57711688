"""Which stand-ins a demo run uses (shipped or trained in the run) and how the report shows them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fusion_vlm.demo import pipeline, stage0
from fusion_vlm.demo.config import load_demo_config
from fusion_vlm.demo.report_sections import standins_section
from fusion_vlm.demo.standins import shipped_standins


@pytest.fixture
def no_training(monkeypatch):
    """Record run_stage0 calls instead of training."""
    calls = []

    def fake(examples, out_dir, preset, seed=0, world=None, **kw):
        calls.append({"preset": preset, "seed": seed, "world": world})
        return {"clip_path": out_dir / "clip.safetensors", "llm_dir": out_dir / "llm"}

    monkeypatch.setattr(stage0, "run_stage0", fake)
    return calls


@pytest.mark.skipif(not shipped_standins()["clip"].is_file(), reason="no shipped stand-ins (fusion-vlm standins make)")
def test_shipped_standins_are_used_for_their_world(tmp_path, no_training):
    cfg = load_demo_config("quick")
    info = pipeline._standins(cfg, [], tmp_path / "stage0")
    assert no_training == []  # nothing trained
    assert info["clip_path"] == shipped_standins()["clip"] and info["llm_dir"] == shipped_standins()["llm"]
    record = json.loads((tmp_path / "stage0" / "standins.json").read_text())
    assert record["probe"] == json.loads(shipped_standins()["probe"].read_text())
    assert record["source"].startswith("shipped")


def test_other_world_or_retrain_trains_in_the_run(tmp_path, no_training):
    cfg = load_demo_config("quick")
    other = replace(cfg, seed=3, world=replace(cfg.world, seed=3))  # another world: the shipped files do not fit
    info = pipeline._standins(other, [], tmp_path / "a")
    assert no_training[-1]["seed"] == 3 and no_training[-1]["preset"] == cfg.stage0
    assert info["clip_path"] == tmp_path / "a" / "clip.safetensors"
    retrain = replace(cfg, standins="retrain")
    pipeline._standins(retrain, [], tmp_path / "b")
    assert len(no_training) == 2 and no_training[-1]["world"] == cfg.world
    assert json.loads((tmp_path / "b" / "standins.json").read_text())["probe"] is None


def test_standins_config_value_is_checked():
    from fusion_vlm.errors import ConfigError

    with pytest.raises(ConfigError, match="standins='download'"):
        load_demo_config("quick", ["standins=download"])


def test_report_section_lists_probes_against_targets(tmp_path):
    path = tmp_path / "standins.json"
    assert standins_section(path) == []
    probe = {"targets": {"colour": 95.0, "shape": 95.0, "shape_local": 95.0, "glyph": 90.0, "llm_scene": 95.0},
             "vision": {"colour": 99.4, "shape": 71.1, "shape_local": 90.3, "glyph": 13.5},
             "vision_random": {"colour": 99.6},
             "llm": {"scene": {"attribute": 76.6, "description": 0.0}}}
    path.write_text(json.dumps({"source": "shipped with the package", "probe": probe}))
    lines = standins_section(path)
    assert "Source: shipped with the package." in lines
    assert "| vision: shape colour (global view) | 99.4 | 99.6 | >= 95.0 |" in lines
    assert "| vision: shape kind (global view) | 71.1 | - | >= 95.0 |" in lines
    assert "| vision: shape kind (local view) | 90.3 | - | >= 95.0 |" in lines
    assert "| vision: glyph character (local view) | 13.5 | - | >= 90.0 |" in lines
    assert "| LLM from scene text: description | 0.0 | - | >= 95.0 |" in lines
