"""``fusion-vlm train`` flags generated from the TrainConfig schema: one flag per field, help from the field's
comment, YAML values checked by the field type, only given flags override the YAML, N' follows min(N, 8)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import typing
from pathlib import Path

import pytest

import fusion_vlm.schema as schema
from fusion_vlm.cli import build_parser, main
from fusion_vlm.config import ModelConfig, ViewsConfig, load_model_config
from fusion_vlm.errors import ConfigError
from fusion_vlm.training.config import DataConfig, TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[1]


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def leaf_paths(cls, prefix=""):
    """Dotted names of the non-dataclass fields, walked here independently of the code under test."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def load(argv):
    """Parse ``fusion-vlm train`` arguments and load the config the command would train."""
    args = build_parser().parse_args(["train", *argv])
    return load_train_config(args.config, schema.overrides_from_namespace(args, TrainConfig))


def resolved_later(cfg: TrainConfig) -> tuple[int, int]:
    """(N, N') of the model the run trains (the run's overrides on the model preset)."""
    f = load_model_config(cfg.model, cfg.model_overrides_all()).fusion
    return f.n_queries, f.later


def test_every_field_has_a_flag_with_help_and_type():
    actions = {s: a for a in train_parser()._actions for s in a.option_strings}
    paths = list(leaf_paths(TrainConfig))
    assert len(paths) > 40 and "optim.lr" in paths and "checkpoint.resume" in paths
    for path in paths:
        flag = "--" + path.replace("_", "-")
        assert flag in actions, flag
        a = actions[flag]
        assert len(a.help) > 10 and a.metavar and a.default is argparse.SUPPRESS, (flag, a.help, a.metavar)
    assert actions["--max-steps"].metavar == "int|null" and actions["--use-question"].metavar == "true|false|null"
    assert actions["--data.files"].metavar == "list[str]" and actions["--optim.lr"].help.startswith("peak learning")


def test_comments_attach_to_their_field():
    notes = schema.field_comments(DataConfig)
    assert notes["allow_outside_image_root"].startswith("accept `image` paths that leave image_root")  # lines above
    assert notes["independent_questions"].endswith("false = one conversation, N then N' slots")  # line below
    assert notes["shuffle"] == "reshuffle the records every epoch (seeded by train.seed + epoch)"
    # the model config has comments continued on the next line too; every one of its fields has a comment
    views = schema.field_comments(ViewsConfig)
    assert views["hd_rule"].endswith("no_upsize: never upsize, mean-colour padding")
    assert views["interpolation"] == "resize kernel of the no_upsize rule: bicubic | bilinear"
    assert all(note for _, _, note, _ in schema.config_fields(ModelConfig))


def test_flag_values_reach_the_config():
    cfg = load(["--config", "tiny_stage1", "--optim.lr", "1.5e-5", "--data.files", "[a.jsonl, b.json]",
                "--checkpoint.resume", "never", "--use-question", "false", "--output-dir", "2024",
                "--optim.betas", "[0.9, 0.95]", "--optim.lr-scale", "{fusion: 0.3}", "--engine.zero-stage", "3",
                "--logging.run-name", "null", "--max-steps", "5"])
    assert cfg.optim.lr == 1.5e-5 and cfg.data.files == ["a.jsonl", "b.json"] and cfg.checkpoint.resume == "never"
    assert cfg.use_question is False and cfg.output_dir == "2024" and cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.lr_scale == {"fusion": 0.3} and cfg.engine.zero_stage == 3 and cfg.max_steps == 5
    assert cfg.logging.run_name is None


def test_unspecified_flags_keep_the_yaml():
    base = load_train_config("tiny_stage1")
    assert base.optim.lr == 3.0e-4 != TrainConfig().optim.lr  # a YAML value that differs from the default
    cfg = load(["--config", "tiny_stage1", "--max-steps", "3"])
    assert cfg == dataclasses.replace(base, max_steps=3)
    args = build_parser().parse_args(["train", "--config", "tiny_stage1", "--max-steps", "3", "--local_rank=1"])
    assert schema.overrides_from_namespace(args, TrainConfig) == {"max_steps": 3}


def test_override_flags_match_key_value_overrides():
    items = ["init_from=null", "data.image_root=/x", "optim.warmup_ratio=0.2", "model_overrides=[llm.load=false]"]
    assert schema.override_flags(items)[:4] == ["--init-from", "null", "--data.image-root", "/x"]
    assert load(["--config", "tiny_stage2", *schema.override_flags(items)]) == load_train_config("tiny_stage2", items)


@pytest.mark.parametrize("argv, message", [
    (["--optim.lr", "abc"], "--optim.lr: expected a number, got 'abc'"),
    (["--max-steps", "two"], "--max-steps: expected an integer, got 'two'"),
    (["--use-question", "maybe"], "--use-question: expected true or false, got 'maybe'"),
    (["--data.files", "[a"], "--data.files '[a': not a YAML value"),
    (["--data.files", "a.json"], "--data.files: expected a list, got 'a.json'"),
    (["--max-steps", "0"], "max_steps=0: must be >= 1"),
    (["--optim.warmup-ratio", "1.5"], "optim.warmup_ratio=1.5: must be in [0, 1)"),
])
def test_bad_values_are_one_line_errors(argv, message, capsys):
    with pytest.raises(ConfigError) as err:
        load(["--config", "tiny_stage1", *argv])
    assert message in str(err.value)
    assert main(["train", "--config", "tiny_stage1", *argv]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("fusion-vlm train: error: ") and message in err_lines[0]


@pytest.mark.parametrize("argv", [["--set", "max_steps=3"], ["--no-question"], ["--resume", "never"],
                                  ["--max-step", "3"], ["--optim.nope", "1"]])
def test_one_way_in(argv, capsys):
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["train", "--config", "tiny_stage1", *argv])
    assert err.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_n_queries_alone_follows_the_paper_rule():
    for name in ("stage2_generation", "stage3_finetune"):
        assert resolved_later(load_train_config(name)) == (256, 8)  # the paper: N = 256, N' = 8
        assert resolved_later(load(["--config", name, "--n-queries", "4"])) == (4, 4)  # min(4, 8)
        assert resolved_later(load_train_config(name, ["n_queries=4"])) == (4, 4)  # the YAML route: no special case
        assert resolved_later(load(["--config", name, "--n-queries", "64"])) == (64, 8)
        assert resolved_later(load(["--config", name, "--n-queries", "64", "--n-queries-later", "2"])) == (64, 2)
        assert resolved_later(load(["--config", name, "--n-queries-later", "4"])) == (256, 4)


def test_help_lists_the_generated_flags(capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert err.value.code == 0
    for text in ("--optim.lr float", "peak learning rate", "--checkpoint.resume str", "--data.files list[str]",
                 "--n-queries-later int|null", "--use-question true|false|null", "data (DataConfig)"):
        assert text in out, text
    assert "--set" not in out and "--no-question" not in out and "local_rank" not in out


def test_sweep_script_commands_parse(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "NS": "64:8 1:1", "OUT": str(tmp_path), "LAUNCH": "train"}
    r = subprocess.run(["bash", "scripts/sweep_stage3.sh", "--seed", "3"], env=env, capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    cmds = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("[dry-run] ")]
    assert len(cmds) == 4
    got = [(c.n_queries, c.use_question, c.seed) for c in (load(argv[1:]) for argv in cmds)]
    assert got == [(64, True, 3), (64, False, 3), (1, True, 3), (1, False, 3)]
