"""The token calculator's fusion-vlm entry and the cost model follow ModelConfig and the library's own rules.

Reference: :func:`fusion_vlm.info.token_accounting` (views planner + merge + N' rule of the model itself).
"""

from __future__ import annotations

import json

import pytest
import yaml

from fusion_vlm.cli import main
from fusion_vlm.config import FusionConfig, load_model_config, resolve_config_path
from fusion_vlm.info import token_accounting
from fusion_vlm.tokens import cost
from fusion_vlm.tokens.calculator import count_visual_tokens

SIZES = [(1008, 1008), (1920, 1080), (4000, 300), (224, 224), (300, 900)]
OVERRIDES = ["views.view_size=448", "views.max_local_views=6", "fusion.n_queries=128", "fusion.n_queries_later=4"]


def _same(count, acct):
    d = count.details
    assert d["fusion_vision_tokens"] == acct.vision_tokens
    assert d["tokens_per_view"] == acct.tokens_per_view
    assert (d["grid_rows"], d["grid_cols"]) == acct.grid
    assert d["local_views"] + 1 == acct.n_views
    assert count.total == acct.fused_total
    assert [d["n_queries"]] + [d["n_later"]] * (d["n_questions"] - 1) == acct.fused_per_question


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("k", [1, 3])
def test_paper_config_equals_token_accounting(size, k):
    cfg = load_model_config("paper")
    _same(count_visual_tokens("fusion-vlm", *size, n_questions=k), token_accounting(cfg, *size, n_questions=k))
    _same(count_visual_tokens("fusion-vlm", *size, n_questions=k, n_queries=4),
          token_accounting(cfg, *size, n_questions=k, n_queries=4))


@pytest.mark.parametrize("size", SIZES)
def test_overridden_config_equals_token_accounting(size):
    cfg = load_model_config("paper", OVERRIDES)
    count = count_visual_tokens("fusion-vlm", *size, n_questions=3, config=cfg)
    _same(count, token_accounting(cfg, *size, n_questions=3))
    # 448-px views of 14-px patches: 32x32 -> 16x16 merged + newline; N' = 4 from the config, not min(N, 8)
    assert count.details["tokens_per_view"] == 16 * 16 + 1 and count.total == 128 + 2 * 4
    # a knob overrides the config value it names, the rest still comes from the config
    paper = load_model_config("paper")
    _same(count_visual_tokens("fusion-vlm", *size, view_size=448),
          token_accounting(load_model_config("paper", ["views.view_size=448"]), *size))
    assert count_visual_tokens("fusion-vlm", *size, n_queries=64).details["n_later"] == paper.fusion.later_for(64)


def test_tiny_preset_by_name():
    cfg = load_model_config("tiny")
    _same(count_visual_tokens("fusion-vlm", 640, 480, n_questions=2, config="tiny"),
          token_accounting(cfg, 640, 480, n_questions=2))


def test_bad_view_size_is_a_clear_error():
    with pytest.raises(ValueError, match="view_size=300 must be divisible"):
        count_visual_tokens("fusion-vlm", 640, 480, view_size=300)


def test_cost_model_shapes_follow_the_config():
    assert cost.FUSION_MODULE == cost.fusion_transformer(FusionConfig())
    cfg = load_model_config("paper", ["fusion.num_layers=10", "fusion.hidden_size=512", "fusion.num_heads=8",
                                      "fusion.num_kv_heads=8", "fusion.intermediate_size=2048"])
    f = cost.fusion_transformer(cfg.fusion)
    assert (f.hidden, f.layers, f.heads, f.d_head, f.intermediate) == (512, 10, 8, 64, 2048)
    assert f.weights_per_layer == 4 * 512 * 512 + 3 * 512 * 2048
    assert cost.vision_tokens_per_view(load_model_config("paper", ["views.view_size=448"])) == 32 * 32 + 1
    assert cost.vision_transformer(load_model_config("paper")) == cost.CLIP_VIT_H14
    assert cost.llm_transformer(load_model_config("paper")) == cost.LLAMA2_7B
    tiny = cost.llm_transformer(load_model_config("tiny"))
    assert tiny.hidden == load_model_config("tiny").llm.tiny["hidden_size"]


@pytest.mark.parametrize("overrides", [[], OVERRIDES])
def test_model_speedup_uses_token_accounting(overrides):
    cfg = load_model_config("paper", overrides)
    acct = token_accounting(cfg, 1920, 1080, n_questions=2, n_queries=64)
    rep = cost.model_speedup(cfg, 1920, 1080, n_queries=64, n_questions=2)
    ref = cost.prefill_speedup(64, acct.fused_per_question[1], 2, vision_tokens=acct.vision_tokens,
                               fusion=cost.fusion_transformer(cfg.fusion), vision_width=cfg.vision.width)
    assert rep == ref
    assert rep.fusion_context == 32 + 64 + 32 + 32 + acct.fused_per_question[1]


def test_prefill_speedup_default_later_is_the_config_rule():
    for n in (4, 64):
        explicit = cost.prefill_speedup(n, FusionConfig().later_for(n), n_questions=3)
        assert cost.prefill_speedup(n, n_questions=3) == explicit


def test_cli_config_yaml(tmp_path, capsys):
    cfg_path = tmp_path / "model.yaml"
    data = yaml.safe_load(resolve_config_path("paper").read_text())
    data["views"]["view_size"], data["fusion"]["n_queries"], data["fusion"]["n_queries_later"] = 448, 32, 2
    cfg_path.write_text(yaml.safe_dump(data))
    assert main(["tokens", "--size", "1920x1080", "--model", "fusion-vlm", "--questions", "3", "--json",
                 "--config", str(cfg_path), "--llm", "llama-2-7b"]) == 0
    out = json.loads(capsys.readouterr().out)
    acct = token_accounting(load_model_config(str(cfg_path)), 1920, 1080, n_questions=3)
    row = out["models"][0]
    assert (row["details"]["fusion_vision_tokens"], row["total"]) == (acct.vision_tokens, acct.fused_total)
    assert out["fusion_speedup"]["fusion_context"] == 32 + 32 + 32 * 3 + 2 * 2
    assert main(["tokens", "--size", "64x64", "--config", str(tmp_path / "missing.yaml")]) != 0
