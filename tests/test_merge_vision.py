"""Vision tower vs open_clip's own forward; merge shapes and the residual; token counts."""

import open_clip
import torch

from fusion_vlm.config import MergeConfig, load_model_config
from fusion_vlm.merge import TokenMerge, merged_grid, tokens_per_view
from fusion_vlm.vision import VisionTower, build_clip


def test_vision_tokens_equal_open_clip_forward():
    cfg = load_model_config("tiny").vision
    torch.manual_seed(0)
    clip = build_clip(cfg, image_size=112)
    clip.eval()
    x = torch.randn(3, 3, 112, 112)
    clip.visual.output_tokens = True
    _, ref = clip.visual(x)  # open_clip: tokens after ln_post, CLS removed
    tower = VisionTower(clip.visual, cfg, out_width=cfg.width)  # same width: no adapter
    ours = tower(x)
    assert ours.shape == (3, 8, 8, 64)
    torch.testing.assert_close(ours.reshape(3, 64, 64), ref)


def test_vision_penultimate_layer_and_adapter():
    cfg = load_model_config("tiny", ["vision.layer=-2"]).vision
    clip = build_clip(cfg, image_size=112).eval()
    x = torch.randn(2, 3, 112, 112)
    tower = VisionTower(clip.visual, cfg, out_width=48)
    inter = clip.visual.forward_intermediates(x, indices=[0], intermediates_only=True, output_fmt="NLC")
    expected = tower.adapter(inter["image_intermediates"][0].reshape(2, 8, 8, 64))
    torch.testing.assert_close(tower(x), expected)
    assert tower(x).shape == (2, 8, 8, 48)


def test_open_clip_vit_h_config_is_the_paper_tower():
    cfg = open_clip.get_model_config("ViT-H-14")["vision_cfg"]
    assert (cfg["width"], cfg["patch_size"], cfg["layers"]) == (1280, 14, 32)


def test_merge_shapes_and_counts():
    cfg = MergeConfig()
    assert merged_grid(24, cfg) == 12 and tokens_per_view(24, cfg) == 145
    assert 10 * tokens_per_view(24, cfg) == 1450
    merge = TokenMerge(16, cfg)
    out = merge(torch.randn(5, 24, 24, 16))
    assert out.shape == (5, 145, 16)
    torch.testing.assert_close(out[:, -1], merge.newline.expand(5, 16))  # newline closes every view
    assert merge.conv.bias is None and merge.conv.stride == (2, 2) and merge.conv.kernel_size == (3, 3)


def test_merge_is_conv_plus_nearest_residual():
    cfg = MergeConfig()
    merge = TokenMerge(4, cfg)
    x = torch.randn(2, 6, 6, 4)
    with torch.no_grad():
        merge.conv.weight.zero_()
    out = merge(x)[:, :-1].reshape(2, 3, 3, 4)
    torch.testing.assert_close(out, x[:, ::2, ::2])  # zero conv: only the nearest-neighbour residual
    no_res = TokenMerge(4, MergeConfig(residual=False, newline=False))
    assert no_res(x).shape == (2, 9, 4)
