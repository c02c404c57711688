"""The paper's (reference) HD rule: grid, token counts, padding colours and the global view.

The expected pixels come from a plain transcription of the authors' pipeline written here with
torchvision's PIL transforms: ``HD_transform`` (transpose portrait images, resize, white padding of the
short side), ``image_expand2square`` (LANCZOS down to the view size, black square) and the processor's
``ToTensor`` + ``Normalize`` + bicubic interpolation of the global square.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TVF
from PIL import Image

from fusion_vlm.cli import main
from fusion_vlm.config import load_model_config
from fusion_vlm.info import token_accounting
from fusion_vlm.tokens.models import count_fusion_vlm
from fusion_vlm.views import CLIP_MEAN, CLIP_STD, ViewProcessor, plan_views


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_views(img: Image.Image, s: int = 336, hd_num: int = 9) -> torch.Tensor:
    """The authors' views, transcribed: float [1 + n_local, 3, s, s], global first."""
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    # HD_transform
    im, trans = img, False
    if im.width < im.height:
        im, trans = im.transpose(Image.TRANSPOSE), True
    ratio = im.width / im.height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * s)
    new_h = int(new_w / ratio)
    im = TVF.resize(im, [new_h, new_w])
    tar = int(np.ceil(new_h / s) * s)
    top = int((tar - new_h) / 2)
    im = TVF.pad(im, [0, top, 0, tar - new_h - top], fill=[255, 255, 255])
    if trans:
        im = im.transpose(Image.TRANSPOSE)
    hd = to_tensor(im)
    h, w = hd.shape[1:]
    local = hd.reshape(3, h // s, s, w // s, s).permute(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
    # image_expand2square(img, s)
    width, height = img.size
    square = img
    if width != height:
        edge = s
        if width > height:
            if width > edge:
                square = img.resize((edge, int(height * edge / width)), Image.LANCZOS)
            else:
                edge = width
        else:
            if height > edge:
                square = img.resize((int(width * edge / height), edge), Image.LANCZOS)
            else:
                edge = height
        canvas = Image.new(square.mode, (edge, edge))
        canvas.paste(square, ((edge - square.width) // 2, (edge - square.height) // 2))
        square = canvas
    glob = torch.nn.functional.interpolate(to_tensor(square)[None], size=(s, s), mode="bicubic")
    return torch.cat([glob, local])


@pytest.mark.parametrize("size,grid", [((640, 480), (3, 3)), ((336, 336), (3, 3)), ((224, 224), (3, 3)),
                                       ((1008, 1008), (3, 3)), ((1920, 1080), (2, 3)), ((1080, 1920), (3, 2)),
                                       ((4000, 300), (1, 9)), ((100, 50), (2, 4)), ((1, 10000), (9, 1))])
def test_reference_grid(size, grid):
    """Hand-worked grids: s * ceil(s / r) <= 9 picks 3 for 4:3 and 1:1 (upsizing small images), 3 for 16:9
    (3 * ceil(3 / 1.78) = 6; 4 * ceil(4 / 1.78) = 12), 9 for 13:1, 4 for 2:1 (4 * 2 = 8)."""
    plan = plan_views(*size)
    assert (plan.rows, plan.cols) == grid
    assert plan.padded == (grid[1] * 336, grid[0] * 336)
    assert max(plan.resized) == max(grid) * 336


@pytest.mark.parametrize("size", [(640, 480), (336, 336), (224, 224)])
def test_reference_token_count_is_1450_everywhere(size):
    """The paper's "10 x 576" patches: 10 views x 145 merged tokens for a 4:3 or square image of any size."""
    cfg = load_model_config("paper")
    acct = token_accounting(cfg, *size)
    assert (acct.n_views, acct.vision_tokens_before_merge, acct.vision_tokens) == (10, 5760, 1450)
    assert count_fusion_vlm(*size).details["fusion_vision_tokens"] == 1450


def test_no_upsize_rule_is_an_explicit_option():
    assert plan_views(224, 224, rule="no_upsize").n_views == 2
    assert plan_views(640, 480, rule="no_upsize").n_views == 5
    cfg = load_model_config("paper", ["views.hd_rule=no_upsize"])
    assert token_accounting(cfg, 224, 224).vision_tokens == 290


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (224, 224), (1008, 1008), (700, 300), (300, 700),
                                  (200, 100), (120, 90)])
def test_pixels_match_reference_transcription(size):
    img = noise(*size, seed=size[0] + size[1])
    views, plan = ViewProcessor()(img)
    expected = reference_views(img)
    assert views.shape == expected.shape == (plan.n_views, 3, 336, 336)
    torch.testing.assert_close(views, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("size", [(160, 100), (100, 160), (50, 50)])
def test_pixels_match_reference_small_views(size):
    """The rule scales with the view size (tiny configs): 112-px views, HD-4."""
    img = noise(*size, seed=3)
    views, plan = ViewProcessor(view_size=112, max_local_views=4)(img)
    torch.testing.assert_close(views, reference_views(img, s=112, hd_num=4), atol=2e-5, rtol=0)


def test_padding_colours():
    """White around the local grid, black around the global view (after normalisation)."""
    white = (torch.tensor(1.0) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    img = noise(640, 360)  # 16:9 -> 3 cols x 2 rows; resized 1008 x 567, padded to 672: 52 rows on top
    views, plan = ViewProcessor()(img)
    assert (plan.rows, plan.cols, plan.resized) == (2, 3, (1008, 567))
    top = (672 - 567) // 2
    for v in (1, 2, 3):  # first row of local views: white band on top, image below
        torch.testing.assert_close(views[v, :, :top, :], white[:, None, None].expand(3, top, 336))
        assert not torch.allclose(views[v, :, top, :], white[:, None].expand(3, 336))
    # global view: 640x360 -> LANCZOS 336x189, centred on a black 336 square: 73 black rows on top
    g_top = (336 - 189) // 2
    torch.testing.assert_close(views[0, :, :g_top, :], black[:, None, None].expand(3, g_top, 336))
    assert not torch.allclose(views[0, :, g_top, :], black[:, None].expand(3, 336))


def test_info_and_tokens_commands_agree(capsys):
    assert main(["info", "--config", "paper", "--device", "meta", "--image-size", "640x480", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"]["n_views"] == 10 and info["tokens"]["vision_tokens"] == 1450
    assert main(["tokens", "--size", "224x224", "--model", "fusion-vlm", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["models"]
    assert entry["details"]["fusion_vision_tokens"] == 1450 and entry["details"]["local_views"] == 9
