"""The demo recipe as configuration: configs/demo/*.yaml load, round-trip, equal the recipe the pipeline used
to hard-code, take overrides, and drive the stage configs and the command line."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from fusion_vlm.demo.config import DemoConfig, load_demo_config
from fusion_vlm.demo.pipeline import demo_world, resolve
from fusion_vlm.demo.stages import stage_train_config
from fusion_vlm.demo.world import WorldConfig
from fusion_vlm.errors import ConfigError, UserError
from fusion_vlm.schema import save_config

# The recipe as fusion_vlm/demo/pipeline.py hard-coded it before it moved to configs/demo/ (the reference):
# DemoSize(train_images, test_images, stage0, stage1_steps, stage2_steps, stage3_steps, stage3_fraction,
# micro_batch, lr, n_values), MODEL_OVERRIDES, LR_SCALE and demo_world(); quick's sizes and steps since trimmed
# (1000 / 64 images, stage 1 200 steps, stage 2 80) to keep `--quick` within 6 minutes.
SIZES = {"quick": (1000, 64, "quick", 200, 80, 20, 0.1, 8, 1e-3, (1, 4, 16)),
             "full": (2000, 144, "full", 500, 250, 30, 0.1, 8, 1e-3, (1, 2, 4, 8, 16, 32, 64))}
OLD_OVERRIDES = ["views.max_local_views=4", "views.hd_rule=no_upsize", "fusion.hidden_size=96", "fusion.num_layers=3",
                 "fusion.num_heads=4", "fusion.num_kv_heads=4", "fusion.intermediate_size=192",
                 "loss.freeze_text_encoder=true", "loss.same_answer_positive=true"]
OLD_LR_SCALE = {"contrastive": {}, "generation": {"vision": 0.01, "merge": 0.01, "fusion": 0.01, "projector": 3.0}}
WORLD = WorldConfig(seed=0, max_aspect=2.0, colours=("red", "green", "blue", "yellow", "purple"),
                    shapes=("square", "circle", "triangle", "cross"), heldout=(("red", "triangle"),),
                    test_min_heldout=0, n_shapes=(4, 12), n_glyphs=(1, 3), object_frac=(0.75, 0.95),
                    max_local_views=4, questions=(8, 10), grid=4, skew=1.0, hard_negatives=True,
                    uniform_values=True, local_counts=True)  # both presets' world (that of the shipped stand-ins)


@pytest.mark.parametrize("name", ["quick", "full"])
def test_presets_equal_the_recipe(name):
    cfg = load_demo_config(name)
    train, test, stage0, s1, s2, s3, frac, mb, lr, ns = SIZES[name]
    assert (cfg.name, cfg.train_images, cfg.test_images, cfg.stage0) == (name, train, test, stage0)
    assert (cfg.stage1.steps, cfg.stage2.steps, cfg.stage3.steps) == (s1, s2, s3)
    assert (cfg.stage1.fraction, cfg.stage2.fraction, cfg.stage3.fraction) == (1.0, 1.0, frac)
    assert (cfg.micro_batch, cfg.lr, cfg.n_values) == (mb, lr, ns)
    assert cfg.model_overrides == OLD_OVERRIDES
    assert cfg.stage1.lr_scale == OLD_LR_SCALE["contrastive"]
    assert cfg.stage2.lr_scale == cfg.stage3.lr_scale == OLD_LR_SCALE["generation"]
    assert (cfg.stage1.warmup_ratio, cfg.stage2.warmup_ratio, cfg.stage3.warmup_ratio) == (0.1, 0.03, 0.03)
    assert cfg.world == WORLD and demo_world(0, name) == WORLD
    assert demo_world(3, name) == WorldConfig(**{**asdict(WORLD), "seed": 3})
    assert (cfg.eval.batch_images, cfg.eval.max_new_tokens, cfg.eval.short_new_tokens) == (48, 72, 8)


@pytest.mark.parametrize("name", ["quick", "full"])
def test_yaml_round_trip(tmp_path, name):
    cfg = load_demo_config(name)
    save_config(cfg, tmp_path / "c.yaml")
    again = load_demo_config(tmp_path / "c.yaml")
    assert again == cfg and isinstance(again.world, WorldConfig) and isinstance(again.world.heldout[0], tuple)


def test_overrides_seed_and_bad_input(tmp_path):
    cfg = resolve("quick", seed=5, overrides=["stage1.steps=7", "n_values=[2,8]", "world.questions=[3,4]",
                                              "stage2.lr_scale.projector=2.0"])
    assert (cfg.stage1.steps, cfg.n_values, cfg.world.questions) == (7, (2, 8), (3, 4))
    assert cfg.stage2.lr_scale["projector"] == 2.0 and cfg.stage2.lr_scale["vision"] == 0.01
    assert cfg.seed == cfg.world.seed == 5
    # overrides on a DemoConfig object
    assert resolve(cfg, overrides=["test_images=10"]).test_images == 10
    with pytest.raises(ConfigError, match="stage1.stepz: unknown key"):
        load_demo_config("quick", ["stage1.stepz=3"])
    with pytest.raises(ConfigError, match="n_values="):
        load_demo_config("quick", ["n_values=[4,4]"])
    with pytest.raises(ConfigError, match="stage0='huge'"):
        load_demo_config("quick", ["stage0=huge"])
    with pytest.raises(ConfigError, match="world.seed=3"):
        load_demo_config("quick", ["world.seed=3"])
    with pytest.raises(ConfigError, match="stage3.fraction"):
        load_demo_config("quick", ["stage3.fraction=0"])
    with pytest.raises(UserError, match="demo config 'nope' is neither a file nor a preset"):
        load_demo_config("nope")


def test_train_config_from_a_config_and_from_a_bare_size(tmp_path):
    cfg, data = load_demo_config("quick"), Path(tmp_path)
    s3 = stage_train_config("generation", tmp_path / "s3", data, cfg, cfg.stage3.steps, 0, settings=cfg.stage3, n_queries=4)
    assert (s3.data.fraction, s3.data.fraction_seed, s3.max_steps, s3.n_queries) == (0.1, 0, 20, 4)
    assert s3.optim.lr_scale == OLD_LR_SCALE["generation"] and s3.optim.warmup_ratio == 0.03
    # an object with only micro_batch, lr and n_values takes the full preset's stage-1/2 settings
    bare = SimpleNamespace(micro_batch=3, lr=5e-4, n_values=(1, 2))
    s1 = stage_train_config("contrastive", tmp_path / "s1", data, bare, 9, 1)
    assert (s1.micro_batch_size, s1.optim.lr, s1.n_queries_choices, s1.optim.warmup_ratio) == (3, 5e-4, [1, 2], 0.1)
    assert s1.optim.lr_scale == {} and s1.data.fraction == 1.0
    s2 = stage_train_config("generation", tmp_path / "s2", data, bare, 9, 1)
    assert s2.optim.lr_scale == OLD_LR_SCALE["generation"] and s2.optim.warmup_ratio == 0.03


def test_command_line(monkeypatch, tmp_path):
    from fusion_vlm.commands import demo as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    seen = {}

    def fake_run_demo(out, config, seed, overrides):
        seen.update(out=out, config=config, seed=seed, overrides=overrides)
        (tmp_path / "report.md").write_text("ok")
        return tmp_path / "report.md"

    monkeypatch.setattr("fusion_vlm.demo.pipeline.run_demo", fake_run_demo)
    args = parser.parse_args(["demo", "--quick", "--out", "o", "--set", "stage1.steps=3", "--set", "seed=2"])
    assert args.func(args) == 0
    assert seen == {"out": "o", "config": "quick", "seed": None, "overrides": ["stage1.steps=3", "seed=2"]}
    args = parser.parse_args(["demo", "--config", "my.yaml", "--seed", "4"])
    args.func(args)
    assert (seen["config"], seen["seed"], seen["overrides"]) == ("my.yaml", 4, [])
    args = parser.parse_args(["demo"])
    args.func(args)
    assert seen["config"] == "full"
    with pytest.raises(UserError, match="--quick and --config full disagree"):
        args = parser.parse_args(["demo", "--quick", "--config", "full"])
        args.func(args)


def test_every_field_has_a_comment():
    import inspect

    from fusion_vlm.demo import config as module

    src = inspect.getsource(module)
    for cls in ("StageConfig", "EvalSettings", "DemoConfig"):
        body = src.split(f"class {cls}")[1].split("\n\n\n")[0]
        fields = [ln for ln in body.splitlines() if ln.startswith("    ") and not ln.startswith("        ")
                  and ": " in ln and "=" in ln and not ln.strip().startswith(("def", '"""', "#"))]
        assert fields and all("  # " in ln for ln in fields), (cls, [ln for ln in fields if "  # " not in ln])
    assert DemoConfig.__dataclass_fields__["world"].type in ("WorldConfig", WorldConfig)
