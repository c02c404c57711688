"""`fusion-vlm info`: hand-computed token counts and the paper model's parameter counts on the meta device."""

import json

import pytest

from fusion_vlm.cli import main
from fusion_vlm.config import load_model_config
from fusion_vlm.info import token_accounting


@pytest.mark.parametrize("size, views, vision", [
    ((1008, 1008), 10, 1450), ((336, 336), 10, 1450), ((640, 480), 10, 1450), ((1920, 1080), 7, 1015),
    ((4000, 300), 10, 1450), ((1, 1), 10, 1450),
])
def test_paper_token_accounting(size, views, vision):
    acct = token_accounting(load_model_config("paper"), *size, n_questions=3)
    assert acct.n_views == views and acct.vision_tokens == vision == views * 145
    assert acct.vision_tokens_before_merge == views * 576
    assert acct.fused_per_question == [256, 8, 8] and acct.fused_total == 272


def test_info_paper_on_meta_device(capsys):
    assert main(["info", "--config", "configs/model/paper.yaml", "--device", "meta",
                 "--image-size", "1008x1008", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"]["vision_tokens"] == 1450
    params = out["parameters"]
    assert params["vision"]["total"] == pytest.approx(632.0e6, rel=0.01)  # ViT-H/14 at 336 px
    assert params["llm"]["total"] == 6_738_415_616 and params["llm"]["trainable"] == 0  # Llama-2-7B, frozen
    assert params["vision_adapter"]["total"] == 1280 * 1024 + 1024
    assert params["projector"]["total"] == 1024 * 4096


def test_info_rejects_bad_size(capsys):
    assert main(["info", "--image-size", "10x", "--no-params"]) == 2
    err = capsys.readouterr().err
    assert "--image-size '10x'" in err and err.count("\n") == 1


def test_info_cost_model_matches_the_calculator(capsys):
    from fusion_vlm.tokens.cost import prefill_speedup

    assert main(["info", "--config", "paper", "--no-params", "--llm", "llama-2-7b", "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    assert cost["speedup"] == pytest.approx(prefill_speedup(256, vision_width=1280).speedup)
    assert cost["kv_mib_fusion"] < cost["kv_mib_baseline"]
