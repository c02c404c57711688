"""Visual-token calculator: how many LLM tokens an image of a given size costs, per model.

>>> count_visual_tokens("llava-1.5", 1920, 1080).total
576
>>> count_visual_tokens("fusion-vlm", 1008, 1008).details["fusion_vision_tokens"]
1450

The per-model rules live in :mod:`fusion_vlm.tokens.models` (each restates the
transformers 5.23 processor it mirrors); this module is the registry and the
public entry point. Nothing here imports transformers or torch.
"""

from __future__ import annotations

import inspect

from fusion_vlm.tokens import models as _m
from fusion_vlm.tokens.models import TokenCount

__all__ = ["TokenCount", "count_visual_tokens", "list_models", "model_knobs", "model_description",
           "parse_size"]

# name -> (rule function, one-line description with the source of the rule)
MODELS = {
    "llava-1.5": (_m.count_llava15, "fixed 336px resize, 24x24 patches (LlavaProcessor)"),
    "llava-next": (_m.count_llava_next, "AnyRes 336px tiles + unpadding + newlines (LlavaNextProcessor)"),
    "llava-onevision": (_m.count_llava_onevision,
                        "AnyRes 384px tiles, anyres_max_9 shrink + newlines (LlavaOnevisionProcessor)"),
    "qwen2-vl": (_m.count_qwen2_vl, "smart_resize factor 28, 2x2 merge (Qwen2VLImageProcessor)"),
    "qwen2.5-vl": (_m.count_qwen25_vl, "smart_resize factor 28, 2x2 merge (Qwen2VLImageProcessor)"),
    "qwen3-vl": (_m.count_qwen3_vl, "smart_resize factor 32 (patch 16), 2x2 merge (Qwen2VLImageProcessor)"),
    "gemma3": (_m.count_gemma3, "256 per image/crop, optional Pan&Scan (Gemma3ImageProcessor/Processor)"),
    "internlm-xcomposer2-4khd": (_m.count_ixc2_4khd, "HD-55 336px crops + global, 144 each + newlines (ixc_utils)"),
    "phi-3-vision": (_m.count_phi3_vision, "HD-16 336px crops + global, 144 each + newlines (image_processing_phi3_v)"),
    "blip-2": (_m.count_blip2, "32 Q-Former queries (Blip2Processor num_query_tokens)"),
    "instructblip": (_m.count_instructblip, "32 Q-Former queries (InstructBlipProcessor num_query_tokens)"),
    "fusion-vlm": (_m.count_fusion_vlm, "HD-9 views x 145 into the fusion module; N / N' tokens to the LLM"),
}


def list_models() -> list[str]:
    """Names accepted by :func:`count_visual_tokens`, in table order."""
    return list(MODELS)


def _lookup(model: str):
    key = model.strip().lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from: {', '.join(MODELS)}")
    return key, MODELS[key][0]


def model_description(model: str) -> str:
    """One-line description of ``model``'s counting rule and where it comes from."""
    return MODELS[_lookup(model)[0]][1]


def model_knobs(model: str) -> dict[str, object]:
    """The keyword knobs ``model`` accepts, mapped to their defaults."""
    params = inspect.signature(_lookup(model)[1]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def count_visual_tokens(model: str, width: int, height: int, **knobs) -> TokenCount:
    """Visual tokens for one ``width`` x ``height`` (pixels) image in ``model``.

    ``knobs`` are model-specific (see :func:`model_knobs`), e.g. ``pan_and_scan=True``
    for gemma3 or ``n_queries=64, n_later=8, n_questions=3`` for fusion-vlm.
    Returns a :class:`TokenCount` (counts are numbers of tokens). Raises ValueError
    for an unknown model, unknown knob or non-positive size.
    """
    name, fn = _lookup(model)
    for label, val in (("width", width), ("height", height)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{label} must be a positive integer number of pixels, got {val!r}")
    unknown = set(knobs) - set(model_knobs(name))
    if unknown:
        raise ValueError(f"{name} has no knob(s) {sorted(unknown)}; it accepts {sorted(model_knobs(name))}")
    return fn(width, height, **knobs)


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WIDTHxHEIGHT"`` (e.g. ``"1920x1080"``) into positive ints (width, height) in pixels.

    Raises ValueError naming the input when it is malformed or not positive.
    """
    parts = str(text).strip().lower().replace("*", "x").split("x")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        width, height = int(parts[0]), int(parts[1])
        if width > 0 and height > 0:
            return width, height
    raise ValueError(f"invalid size {text!r}: expected WIDTHxHEIGHT with positive integers, e.g. 1920x1080")
