"""Small numbers from the authors' code: merge conv weights ~ N(0, 0.02), fusion RMSNorm eps 1e-6."""

import torch

from fusion_vlm.config import FusionConfig, MergeConfig, load_model_config
from fusion_vlm.fusion import FusionModule
from fusion_vlm.merge import TokenMerge


def test_merge_conv_weights_are_normal_0_02_without_bias():
    torch.manual_seed(0)
    merge = TokenMerge(16, MergeConfig())  # fan-in 144: torch's default init would have std 0.048
    w = merge.conv.weight.detach()
    assert merge.conv.bias is None
    assert abs(w.mean().item()) < 0.002 and abs(w.std().item() / 0.02 - 1) < 0.05
    assert w.abs().max().item() > 3 * 0.02  # normal tails: a uniform init never exceeds its bound (~1.7 std)
    torch.manual_seed(0)
    again = TokenMerge(16, MergeConfig())
    assert torch.equal(again.conv.weight, merge.conv.weight)  # seeded
    wide = TokenMerge(16, MergeConfig(init_std=0.1)).conv.weight
    assert abs(wide.std().item() / 0.1 - 1) < 0.05


def test_fusion_rms_norm_eps_is_1e_6_by_default_and_in_the_paper_config():
    assert FusionConfig().rms_norm_eps == 1e-6
    assert load_model_config("paper").fusion.rms_norm_eps == 1e-6
    assert load_model_config("paper").merge.init_std == 0.02
    cfg = load_model_config("tiny").fusion
    fusion = FusionModule(cfg)
    eps = {m.variance_epsilon for m in fusion.decoder.modules() if hasattr(m, "variance_epsilon")}
    assert eps == {1e-6}
