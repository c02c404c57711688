"""Visual-token calculator vs transformers' own processors (built offline) and hand counts; CLI."""

from __future__ import annotations

import json

import pytest
import torch

from fusion_vlm.cli import main
from fusion_vlm.tokens import models as rules
from fusion_vlm.tokens.calculator import count_visual_tokens, list_models, model_knobs, parse_size

transformers = pytest.importorskip("transformers")

SIZES = [(1, 1), (2, 3), (14, 14), (27, 29), (336, 336), (337, 335), (672, 336), (1008, 1008), (1920, 1080),
         (1080, 1920), (4000, 300), (300, 4000), (17, 1234), (1234, 17), (641, 479), (799, 1333), (3000, 2999),
         (5000, 5000), (100, 1300), (2304, 384)]
QWEN = {  # name -> (patch, min_pixels, max_pixels) as in the released preprocessor configs
    "qwen2-vl": (14, 3136, 12845056), "qwen2.5-vl": (14, 3136, 12845056), "qwen3-vl": (16, 65536, 16777216)}


def _image(width, height):
    return torch.zeros(3, height, width, dtype=torch.uint8)


@pytest.fixture(scope="module")
def llava_next():
    proc = object.__new__(transformers.LlavaNextProcessor)  # counting needs no tokenizer
    proc.image_processor = transformers.LlavaNextImageProcessor(size={"shortest_edge": 336},
                                                                crop_size={"height": 336, "width": 336})
    proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy = 14, 1, "default"
    return proc


@pytest.fixture(scope="module")
def onevision():
    proc = object.__new__(transformers.LlavaOnevisionProcessor)
    proc.image_processor = transformers.LlavaOnevisionImageProcessor()
    proc.num_image_tokens, proc.vision_aspect_ratio, proc.vision_feature_select_strategy = 729, "anyres_max_9", "full"
    return proc


# ---- hand-computed counts -------------------------------------------------------------------------------

def test_fixed_counts():
    assert count_visual_tokens("llava-1.5", 1920, 1080).total == 576
    g = count_visual_tokens("gemma3", 1920, 1080)
    assert (g.image_tokens, g.special_tokens, g.total) == (256, {"start_of_image": 1, "end_of_image": 1}, 258)
    assert count_visual_tokens("blip-2", 640, 480).total == 32 == transformers.Blip2Config().num_query_tokens
    assert count_visual_tokens("instructblip", 9, 9).total == 32 == transformers.InstructBlipConfig().num_query_tokens


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_fusion_vlm_counts(k):
    c = count_visual_tokens("fusion-vlm", 1008, 1008, n_questions=k)
    assert c.details["fusion_vision_tokens"] == 1450 == (9 + 1) * (12 * 12 + 1)
    assert c.total == c.image_tokens == 256 + 8 * (k - 1)
    assert count_visual_tokens("fusion-vlm", 1008, 1008, n_queries=4, n_questions=k).total == 4 * k  # N' = N < 8
    assert count_visual_tokens("fusion-vlm", 1008, 1008, n_queries=64, n_later=16, n_questions=k).total == \
        64 + 16 * (k - 1)


def test_fusion_vlm_grids_and_view_grid_argument():
    assert count_visual_tokens("fusion-vlm", 4000, 300).details["fusion_vision_tokens"] == 1450  # 9x1 + global
    c = count_visual_tokens("fusion-vlm", 1920, 1080)  # 3x2 local views + global
    assert (c.details["grid_cols"], c.details["grid_rows"], c.details["fusion_vision_tokens"]) == (3, 2, 7 * 145)
    c = count_visual_tokens("fusion-vlm", 50, 50, view_grid=lambda w, h: (2, 1))
    assert c.details["fusion_vision_tokens"] == 3 * 145


def test_hd_rule_phi3_layout():
    # Phi-3-Vision calc_num_image_tokens: (rows*cols + 1)*144 + 1 + (rows + 1)*12 on the HD-16 padded image
    assert count_visual_tokens("phi-3-vision", 1008, 1008).total == 17 * 144 + 1 + 5 * 12  # 4x4 crops
    assert count_visual_tokens("phi-3-vision", 1920, 1080).total == 16 * 144 + 1 + 4 * 12  # 5 cols x 3 rows
    assert count_visual_tokens("phi-3-vision", 4000, 300).total == 14 * 144 + 1 + 2 * 12  # 13 x 1
    assert count_visual_tokens("phi-3-vision", 300, 4000).total == 14 * 144 + 1 + 14 * 12  # 1 x 13, transposed
    assert rules.hd_grid(1920, 1080, 55) == (9, 6) and rules.hd_grid(1080, 1920, 55) == (6, 9)


# ---- against transformers --------------------------------------------------------------------------------

@pytest.mark.parametrize("pinpoints", [rules.LLAVA_NEXT_PINPOINTS, rules.ONEVISION_PINPOINTS])
def test_select_best_resolution_matches(pinpoints):
    from transformers.image_processing_utils import select_best_resolution
    for w, h in SIZES:
        assert rules.select_best_resolution(h, w, pinpoints) == tuple(select_best_resolution((h, w), pinpoints))


def test_llava_next_matches_processor(llava_next):
    assert [list(p) for p in rules.LLAVA_NEXT_PINPOINTS] == llava_next.image_processor.image_grid_pinpoints
    for w, h in SIZES:
        expected = llava_next._get_number_of_features(h, w, 336, 336) - 1  # strategy "default" drops CLS
        assert count_visual_tokens("llava-next", w, h).total == expected, (w, h)


def test_llava_next_tiles_match_real_images(llava_next):
    for w, h in [(1920, 1080), (300, 900), (500, 500)]:
        out = llava_next.image_processor(images=[_image(w, h)], return_tensors="pt")
        d = count_visual_tokens("llava-next", w, h).details
        assert out["pixel_values"].shape[1] == 1 + d["grid_rows"] * d["grid_cols"]


def test_onevision_matches_processor(onevision):
    assert [list(p) for p in rules.ONEVISION_PINPOINTS] == onevision.image_processor.image_grid_pinpoints
    for w, h in SIZES:
        assert count_visual_tokens("llava-onevision", w, h).total == \
            onevision._get_number_of_features(h, w, 384, 384), (w, h)


@pytest.mark.parametrize("name", list(QWEN))
def test_qwen_matches_image_processor(name):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    patch, lo, hi = QWEN[name]
    proc = transformers.Qwen2VLImageProcessor(min_pixels=lo, max_pixels=hi, patch_size=patch)
    for w, h in SIZES:
        c = count_visual_tokens(name, w, h)
        assert (c.details["resized_h"], c.details["resized_w"]) == smart_resize(h, w, patch * 2, lo, hi)
        assert c.image_tokens == proc.get_number_of_image_patches(h, w) // 4, (w, h)
        assert c.special_tokens == {"vision_start": 1, "vision_end": 1}
    for w, h in [(17, 1234), (641, 479), (1920, 1080)]:  # one pass through the real pixel path
        grid = proc(images=[_image(w, h)], return_tensors="pt")["image_grid_thw"][0]
        assert count_visual_tokens(name, w, h).image_tokens == int(grid.prod()) // 4


def test_qwen_class_defaults_and_aspect_limit():
    proc = transformers.Qwen2VLImageProcessor()  # bare class: max_pixels 28*28*1280
    for w, h in SIZES:
        assert count_visual_tokens("qwen2-vl", w, h, max_pixels=1003520).image_tokens == \
            proc.get_number_of_image_patches(h, w) // 4
    with pytest.raises(ValueError, match="aspect ratio"):
        count_visual_tokens("qwen3-vl", 1, 250)


@pytest.mark.parametrize("knobs", [{}, {"min_crop_size": 128, "max_num_crops": 8, "min_ratio_to_activate": 1.5}])
def test_gemma3_pan_and_scan_matches_image_processor(knobs):
    defaults = {"min_crop_size": 256, "max_num_crops": 4, "min_ratio_to_activate": 1.2, **knobs}
    proc = transformers.Gemma3ImageProcessor(
        do_pan_and_scan=True, size={"height": 32, "width": 32},  # output size does not affect the crop count
        pan_and_scan_min_crop_size=defaults["min_crop_size"], pan_and_scan_max_num_crops=defaults["max_num_crops"],
        pan_and_scan_min_ratio_to_activate=defaults["min_ratio_to_activate"])
    for w, h in SIZES:
        crops = int(proc(images=[_image(w, h)], return_tensors="pt")["num_crops"][0])
        c = count_visual_tokens("gemma3", w, h, pan_and_scan=True, **knobs)
        assert c.details["crops"] == crops, (w, h)
        assert c.total == (crops + 1) * 258
    assert count_visual_tokens("gemma3", 4000, 300).total == 258  # Pan&Scan is off by default


# ---- API and CLI ------------------------------------------------------------------------------------------

def test_api_errors_and_listing():
    assert {"llava-1.5", "qwen3-vl", "gemma3", "fusion-vlm"} <= set(list_models())
    assert model_knobs("gemma3")["pan_and_scan"] is False
    for bad in [lambda: count_visual_tokens("nope", 1, 1), lambda: count_visual_tokens("gemma3", 0, 5),
                lambda: count_visual_tokens("gemma3", 5, 5, n_queries=3),
                lambda: count_visual_tokens("fusion-vlm", 5, 5, n_queries=0)]:
        with pytest.raises(ValueError):
            bad()
    assert parse_size("1920x1080") == (1920, 1080)


def test_cli_json_matches_library(capsys):
    assert main(["tokens", "--size", "1920x1080", "--json", "--questions", "3", "--pan-and-scan"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["width"], out["height"]) == (1920, 1080)
    assert [r["model"] for r in out["models"]] == list_models()
    for row in out["models"]:
        knobs = {"n_questions": 3} if row["model"] == "fusion-vlm" else \
            {"pan_and_scan": True} if row["model"] == "gemma3" else {}
        lib = count_visual_tokens(row["model"], 1920, 1080, **knobs)
        assert (row["image_tokens"], row["special_tokens"], row["total"], row["details"]) == \
            (lib.image_tokens, lib.special_tokens, lib.total, lib.details)


@pytest.mark.parametrize("size", ["10x", "0x5", "axb", "1920"])
def test_cli_bad_size(size, capsys):
    assert main(["tokens", "--size", size]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and repr(size) in err


def test_cli_table_and_plot(tmp_path, capsys):
    out_png = tmp_path / "tokens.png"
    assert main(["tokens", "--size", "1008x1008", "--model", "llava-1.5", "fusion-vlm", "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "llava-1.5" in text and "1450 vision tokens" in text and "qwen3-vl" not in text
    assert out_png.stat().st_size > 10_000
