"""Config schema: presets load, overrides apply, invalid values fail naming the field."""

import pytest

from fusion_vlm.config import load_model_config
from fusion_vlm.schema import ConfigError


def test_presets_load_with_paper_numbers():
    paper = load_model_config("paper")
    assert (paper.views.view_size, paper.views.max_local_views) == (336, 9)
    assert (paper.vision.model_name, paper.vision.width, paper.vision.patch_size) == ("ViT-H-14", 1280, 14)
    f = paper.fusion
    assert (f.hidden_size, f.num_layers, f.num_heads, f.intermediate_size) == (1024, 20, 16, 4096)
    assert (f.n_queries, f.later) == (256, 8)
    assert paper.llm.path == "meta-llama/Llama-2-7b-chat-hf"
    assert load_model_config("tiny").llm.tiny is not None


def test_overrides_are_typed_and_nested():
    cfg = load_model_config("tiny", ["fusion.n_queries=2", "fusion.use_question=false", "llm.system_prompt=Hi"])
    assert cfg.fusion.n_queries == 2 and cfg.fusion.later == 2 and cfg.fusion.use_question is False
    assert cfg.llm.system_prompt == "Hi"


@pytest.mark.parametrize("override, field", [
    ("fusion.n_queries=0", "fusion.n_queries"),
    ("fusion.n_queries_later=9", "fusion.n_queries_later"),
    ("views.view_size=100", "views.view_size"),
    ("fusion.bogus=1", "fusion.bogus"),
    ("bogus.x=1", "bogus"),
    ("fusion.n_queries=abc", "fusion.n_queries"),
    ("fusion.use_question=3", "fusion.use_question"),
    ("fusion.n_queries=1000", "fusion.n_queries"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_model_config("tiny", [override])
    assert str(err.value).startswith(field)
    assert "\n" not in str(err.value)


def test_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_model_config("tiny", ["fusion.n_queries"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_model_config("nope.yaml")


def test_float_fields_accept_exponent_without_dot():
    cfg = load_model_config("tiny", ["projector.init_std=3e-3"])
    assert cfg.projector.init_std == 0.003
    with pytest.raises(ConfigError, match="projector.init_std"):
        load_model_config("tiny", ["projector.init_std=small"])
