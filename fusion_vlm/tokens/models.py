"""Per-model visual-token rules, re-derived from each model's own preprocessing code.

Every ``count_*`` function takes the image ``width`` and ``height`` in pixels plus
keyword knobs, and returns a :class:`TokenCount`. The rules restate (they do not
import) the transformers 5.23 processors named in each docstring, so that
``fusion_vlm.tokens`` stays dependency-free and fast (the ``fusion-vlm`` rule is the exception: it calls
the library's own view planner and merge rule, which import torch when it runs); ``tests/test_tokens_calculator.py``
checks them against those processors. Geometry helpers (:func:`smart_resize`,
:func:`select_best_resolution`, :func:`anyres_features`, :func:`pan_and_scan_crops`,
:func:`hd_grid`) are public so that other code can reuse the exact rules.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

# LLaVA-NeXT (llava-hf/llava-v1.6-*) and LLaVA-OneVision grid pinpoints, (height, width) in pixels.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))


@dataclass(frozen=True)
class TokenCount:
    """Visual tokens one image costs in a model's LLM context.

    ``image_tokens`` are the feature tokens that stand for the image (patch, crop,
    query or fused tokens); ``special_tokens`` maps each special/marker token name
    (newline, begin/end of image, separators) to its count; ``total`` is their sum.
    ``details`` holds model-specific integers (grid, resized size, crops, and for
    fusion-vlm the fusion-module input length); ``note`` says how it was computed.
    """

    model: str
    image_tokens: int
    special_tokens: dict[str, int]
    total: int
    note: str
    details: dict[str, int] = field(default_factory=dict)


def _count(model: str, image: int, specials: dict[str, int], note: str, **details: int) -> TokenCount:
    return TokenCount(model, image, dict(specials), image + sum(specials.values()), note, dict(details))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL ``smart_resize``: (height, width) in px -> resized (height, width), multiples of ``factor``.

    Rounds each side to the nearest multiple of ``factor``, then rescales (aspect kept)
    into [min_pixels, max_pixels]. Raises ValueError when the aspect ratio exceeds 200,
    as transformers does. Source: transformers/models/qwen2_vl/image_processing_qwen2_vl.py.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """AnyRes grid choice: the (height, width) pinpoint keeping most of the image with least waste.

    Source: transformers/image_processing_utils.py ``select_best_resolution``.
    """
    best, best_eff, best_waste = None, 0, float("inf")
    for res_h, res_w in pinpoints:
        scale = min(res_w / width, res_h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = res_w * res_h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (res_h, res_w), eff, waste
    return best


def anyres_features(height: int, width: int, side: int, scale_h: int, scale_w: int,
                    max_num_patches: int | None = None) -> tuple[int, int, str]:
    """Unpadded AnyRes feature grid -> (feature tokens, newline tokens, note).

    ``side`` is the per-tile feature side (24 for CLIP-336/14, 27 for SigLIP-384/14).
    The tiled grid (side*scale_h x side*scale_w) loses the rows/columns that only
    covered padding; with ``max_num_patches`` (OneVision's anyres_max_N) a grid larger
    than 1.1x of N tiles is shrunk by floor-division. Source: ``_get_unpadded_features``
    in transformers/models/llava_next and llava_onevision processing_*.py.
    """
    cur_h, cur_w = side * scale_h, side * scale_w
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    feats, rows, note = cur_h * cur_w, cur_h, f"unpadded {cur_h}x{cur_w}"
    if max_num_patches is not None:
        ratio = math.sqrt(cur_h * cur_w / (max_num_patches * side**2))
        if ratio > 1.1:
            rows, cols = int(cur_h // ratio), int(cur_w // ratio)
            feats = rows * cols
            note += f" -> pooled {rows}x{cols} (anyres_max_{max_num_patches})"
    return feats, rows, note


def pan_and_scan_crops(height: int, width: int, min_crop_size: int = 256, max_num_crops: int = 4,
                       min_ratio_to_activate: float = 1.2) -> tuple[int, int]:
    """Gemma 3 Pan&Scan crop grid (rows, cols) of the original image; (0, 0) when not activated.

    Source: ``pan_and_scan_batched`` in transformers/models/gemma3/image_processing_gemma3.py.
    """
    long, short = max(width, height), min(width, height)
    if long / short < min_ratio_to_activate:
        return 0, 0
    n = min(int(math.floor(long / min_crop_size)), int(math.floor(long / short + 0.5)))
    n = min(max_num_crops, max(2, n))
    rows, cols = (1, n) if width >= height else (n, 1)
    if min(int(math.ceil(width / cols)), int(math.ceil(height / rows))) < min_crop_size:
        return 0, 0
    return rows, cols


def hd_grid(width: int, height: int, hd_num: int, tile: int = 336) -> tuple[int, int]:
    """HD-N tiling of InternLM-XComposer2-4KHD / Phi-3-Vision -> (cols, rows) of ``tile`` px crops.

    The long side is put horizontally; the largest ``scale`` with
    scale * ceil(scale / ratio) <= hd_num gives width scale*tile, the height
    int(width/ratio) is padded up to a multiple of ``tile``. Sources: ``HD_transform``
    and ``padding_336`` in Phi-3-Vision's image_processing_phi3_v.py and IXC2-4KHD's
    ixc_utils.py. Rows are clamped to >= 1 (the originals would produce an empty
    resize for aspect ratios beyond scale*tile).
    """
    long, short = (width, height) if width >= height else (height, width)
    ratio = long / short
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_long = int(scale * tile)
    n_short = max(1, math.ceil(int(new_long / ratio) / tile))
    return (scale, n_short) if width >= height else (n_short, scale)


def count_llava15(width: int, height: int, *, image_size: int = 336, patch_size: int = 14) -> TokenCount:
    """LLaVA-1.5: every image resized to image_size^2 -> (image_size/patch_size)^2 tokens (576)."""
    side = image_size // patch_size
    return _count("llava-1.5", side * side, {}, f"fixed resize to {image_size}x{image_size}: {side}x{side} patches",
                  resized_w=image_size, resized_h=image_size)


def _count_anyres(name: str, width: int, height: int, tile: int, base: int, pinpoints, max_num_patches) -> TokenCount:
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    side = int(math.sqrt(base))
    feats, newlines, note = anyres_features(height, width, side, best_h // tile, best_w // tile, max_num_patches)
    return _count(name, base + feats, {"image_newline": newlines},
                  f"{best_h // tile}x{best_w // tile} (rows x cols) grid of {tile}px tiles = {best_w}x{best_h}, {note}, "
                  f"+ {base} base", grid_rows=best_h // tile, grid_cols=best_w // tile, resized_w=best_w,
                  resized_h=best_h)


def count_llava_next(width: int, height: int, *, image_size: int = 336, patch_size: int = 14,
                     grid_pinpoints=LLAVA_NEXT_PINPOINTS) -> TokenCount:
    """LLaVA-NeXT (v1.6): AnyRes grid + unpadding + one newline per feature row + 576 base tokens.

    Matches ``LlavaNextProcessor._get_number_of_features`` with the llava-hf v1.6
    settings (patch 14, CLS added then dropped by vision_feature_select_strategy="default").
    """
    side = image_size // patch_size
    return _count_anyres("llava-next", width, height, image_size, side * side, grid_pinpoints, None)


def count_llava_onevision(width: int, height: int, *, image_size: int = 384, base_tokens: int = 729,
                          grid_pinpoints=ONEVISION_PINPOINTS, max_num_patches: int = 9) -> TokenCount:
    """LLaVA-OneVision: AnyRes over 384px tiles (up to 6x6), anyres_max_9 shrink, newlines, 729 base tokens.

    Matches ``LlavaOnevisionProcessor._get_number_of_features`` (single-image path,
    vision_feature_select_strategy="full").
    """
    return _count_anyres("llava-onevision", width, height, image_size, base_tokens, grid_pinpoints, max_num_patches)


def _count_qwen(name: str, width: int, height: int, patch_size: int, merge_size: int, min_pixels: int,
                max_pixels: int) -> TokenCount:
    rh, rw = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    gh, gw = rh // patch_size, rw // patch_size
    return _count(name, gh * gw // merge_size**2, {"vision_start": 1, "vision_end": 1},
                  f"smart_resize to {rw}x{rh}: {gh}x{gw} patches of {patch_size}px, merged {merge_size}x{merge_size}",
                  resized_w=rw, resized_h=rh, grid_h=gh, grid_w=gw)


def count_qwen2_vl(width: int, height: int, *, patch_size: int = 14, merge_size: int = 2,
                   min_pixels: int = 3136, max_pixels: int = 12845056) -> TokenCount:
    """Qwen2-VL: smart_resize(factor 28) then grid_h*grid_w/4 tokens + vision start/end.

    Pixel limits are the released Qwen2-VL-*-Instruct preprocessor_config values; the
    bare ``Qwen2VLImageProcessor()`` class default max_pixels is 28*28*1280 = 1003520.
    """
    return _count_qwen("qwen2-vl", width, height, patch_size, merge_size, min_pixels, max_pixels)


def count_qwen25_vl(width: int, height: int, *, patch_size: int = 14, merge_size: int = 2,
                    min_pixels: int = 3136, max_pixels: int = 12845056) -> TokenCount:
    """Qwen2.5-VL: same image path as Qwen2-VL (Qwen2VLImageProcessor, released pixel limits)."""
    return _count_qwen("qwen2.5-vl", width, height, patch_size, merge_size, min_pixels, max_pixels)


def count_qwen3_vl(width: int, height: int, *, patch_size: int = 16, merge_size: int = 2,
                   min_pixels: int = 65536, max_pixels: int = 16777216) -> TokenCount:
    """Qwen3-VL: Qwen2VLImageProcessor with patch 16 (factor 32) and its released pixel limits."""
    return _count_qwen("qwen3-vl", width, height, patch_size, merge_size, min_pixels, max_pixels)


def count_gemma3(width: int, height: int, *, pan_and_scan: bool = False, min_crop_size: int = 256,
                 max_num_crops: int = 4, min_ratio_to_activate: float = 1.2,
                 tokens_per_image: int = 256) -> TokenCount:
    """Gemma 3: 896px SigLIP + 4x4 pooling -> 256 tokens per image/crop, each wrapped in <boi>...<eoi>.

    With ``pan_and_scan`` the Gemma3Processor defaults (off, 256, 4, 1.2) pick the crop
    grid; the image costs (crops + 1) x (256 + 2). The "\\n\\n" and the
    "Here is the original image ..." text the processor adds around crops is not counted.
    """
    rows, cols = pan_and_scan_crops(height, width, min_crop_size, max_num_crops, min_ratio_to_activate) \
        if pan_and_scan else (0, 0)
    crops = rows * cols
    views = crops + 1
    note = f"{views} view(s) x {tokens_per_image}" + (f" (Pan&Scan {rows}x{cols} crops + original)" if crops else "")
    return _count("gemma3", views * tokens_per_image, {"start_of_image": views, "end_of_image": views}, note,
                  crops=crops)


def _count_hd(name: str, width: int, height: int, hd_num: int) -> TokenCount:
    cols, rows = hd_grid(width, height, hd_num)
    views = cols * rows + 1
    return _count(name, views * 144, {"newline": 12 * (rows + 1), "glb_sub_separator": 1},
                  f"HD-{hd_num}: {cols}x{rows} crops of 336px + global view, 144 each, 12 newlines per crop row",
                  grid_cols=cols, grid_rows=rows, resized_w=cols * 336, resized_h=rows * 336)


def count_phi3_vision(width: int, height: int, *, num_crops: int = 16) -> TokenCount:
    """Phi-3-Vision: (rows*cols + 1)*144 + 1 + (rows + 1)*12 (``calc_num_image_tokens``, HD-16)."""
    return _count_hd("phi-3-vision", width, height, num_crops)


def count_ixc2_4khd(width: int, height: int, *, hd_num: int = 55) -> TokenCount:
    """InternLM-XComposer2-4KHD: the same HD rule and token layout as Phi-3-Vision; model card uses hd_num=55."""
    return _count_hd("internlm-xcomposer2-4khd", width, height, hd_num)


def count_blip2(width: int, height: int, *, num_query_tokens: int = 32) -> TokenCount:
    """BLIP-2: 32 Q-Former query outputs, independent of the image size (224px input)."""
    return _count("blip-2", num_query_tokens, {}, f"{num_query_tokens} Q-Former queries")


def count_instructblip(width: int, height: int, *, num_query_tokens: int = 32) -> TokenCount:
    """InstructBLIP: 32 instruction-aware Q-Former query outputs."""
    return _count("instructblip", num_query_tokens, {}, f"{num_query_tokens} Q-Former queries")


def _model_config(config):
    """A :class:`fusion_vlm.config.ModelConfig` from a ModelConfig, a preset name or a YAML path (cached by name)."""
    from fusion_vlm.config import ModelConfig

    if isinstance(config, ModelConfig):
        return config
    return _load_preset(str(config))


@functools.lru_cache(maxsize=8)
def _load_preset(name: str):
    from fusion_vlm.config import load_model_config

    return load_model_config(name)


def count_fusion_vlm(width: int, height: int, *, n_queries: int | None = None, n_later: int | None = None,
                     n_questions: int = 1, hd_num: int | None = None, hd_rule: str | None = None,
                     view_size: int | None = None, config="paper",
                     view_grid: Callable[[int, int], tuple[int, int]] | None = None) -> TokenCount:
    """This model: fusion input (local views + 1) x tokens per view; the LLM sees N + N' x (questions - 1).

    Every rule comes from the model config (``config``: a ``ModelConfig``, a preset name such as
    ``"paper"`` or a YAML path) and the library's own functions, so the count is the one
    :func:`fusion_vlm.info.token_accounting` gives: local-view grid from
    :func:`fusion_vlm.views.plan_views` (``views.view_size``, ``views.max_local_views``, ``views.hd_rule``),
    tokens per view from :func:`fusion_vlm.merge.tokens_per_view` (145 for 336-px views of 14-px patches),
    N' from :meth:`fusion_vlm.config.FusionConfig.later_for` (min(N, 8) in the paper config). The knobs
    ``n_queries``, ``n_later``, ``hd_num``, ``hd_rule``, ``view_size`` override the config's values (None:
    the config's). ``view_grid(width, height) -> (cols, rows)`` replaces the planner. ``details`` carries
    ``fusion_vision_tokens``, ``tokens_per_view`` and the per-question slots.
    """
    from fusion_vlm.merge import tokens_per_view
    from fusion_vlm.views import plan_views

    cfg = _model_config(config)
    n_queries = cfg.fusion.n_queries if n_queries is None else n_queries
    hd_num = cfg.views.max_local_views if hd_num is None else hd_num
    hd_rule = cfg.views.hd_rule if hd_rule is None else hd_rule
    view_size = cfg.views.view_size if view_size is None else view_size
    for knob, val in (("n_queries", n_queries), ("n_questions", n_questions), ("hd_num", hd_num),
                      ("view_size", view_size)):
        if val < 1:
            raise ValueError(f"{knob} must be >= 1, got {val}")
    patch = cfg.vision.patch_size
    if view_size % patch:
        raise ValueError(f"view_size={view_size} must be divisible by the vision patch size {patch}")
    later = cfg.fusion.later_for(n_queries, n_later)
    if later < 1:
        raise ValueError(f"n_later must be >= 1, got {n_later}")
    if view_grid is None:
        plan = plan_views(width, height, view_size, hd_num, hd_rule)
        cols, rows = plan.cols, plan.rows
    else:
        cols, rows = view_grid(width, height)
    views = cols * rows + 1
    per_view = tokens_per_view(view_size // patch, cfg.merge)
    fusion_in = views * per_view
    llm = n_queries + later * (n_questions - 1)
    return _count("fusion-vlm", llm, {},
                  f"fusion input {views} views x {per_view} = {fusion_in} ({cols}x{rows} local + global); "
                  f"LLM gets N={n_queries}" + (f" + {n_questions - 1} x N'={later}" if n_questions > 1 else ""),
                  fusion_vision_tokens=fusion_in, tokens_per_view=per_view, local_views=cols * rows,
                  grid_cols=cols, grid_rows=rows, n_queries=n_queries, n_later=later, n_questions=n_questions)
