"""Parameter counts and token accounting for a model config and an image size.

:func:`token_accounting` is pure arithmetic on the config (views -> patches ->
merged tokens -> fused tokens -> LLM length); :func:`parameter_counts` counts a
built model (use the ``meta`` device for the paper-scale model: no memory).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from fusion_vlm.config import ModelConfig
from fusion_vlm.fusion import group_sizes
from fusion_vlm.merge import merged_grid, tokens_per_view
from fusion_vlm.views import plan_views


@dataclass
class TokenAccounting:
    """Token counts for one image and ``n_questions`` questions."""

    image_size: tuple[int, int]  # (width, height)
    grid: tuple[int, int]  # local views (rows, cols)
    n_views: int  # local views + 1 global
    patches_per_view: int  # (S/P)^2 before the merge
    vision_tokens_before_merge: int  # n_views * patches_per_view
    tokens_per_view: int  # merged grid + newline
    vision_tokens: int  # entering the fusion module
    fused_per_question: list[int]  # N, N', N', ...
    fused_total: int  # vision tokens the LLM sees
    reduction: float  # vision_tokens / fused_total
    llm_prompt_tokens: int | None = None  # full LLM prompt length (needs the tokenizer)


def token_accounting(cfg: ModelConfig, width: int, height: int, n_questions: int = 1,
                     n_queries: int | None = None, n_queries_later: int | None = None) -> TokenAccounting:
    """Count the tokens of a ``width x height`` image at every step of the data path."""
    if n_questions < 1:
        raise ValueError(f"n_questions={n_questions}: must be >= 1")
    plan = plan_views(width, height, cfg.views.view_size, cfg.views.max_local_views, cfg.views.hd_rule)
    grid = cfg.views.view_size // cfg.vision.patch_size
    per_view = tokens_per_view(grid, cfg.merge)
    n = cfg.fusion.n_queries if n_queries is None else n_queries
    later = cfg.fusion.later_for(n, n_queries_later)
    fused = group_sizes(n_questions, n, later)
    vision = plan.n_views * per_view
    return TokenAccounting(
        image_size=(width, height), grid=(plan.rows, plan.cols), n_views=plan.n_views,
        patches_per_view=grid * grid, vision_tokens_before_merge=plan.n_views * grid * grid,
        tokens_per_view=per_view, vision_tokens=vision, fused_per_question=fused, fused_total=sum(fused),
        reduction=vision / sum(fused),
    )


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """{component: {"total", "trainable"}} for the FusionVLM parts, plus "all" (stage-2 trainability)."""
    parts = {"vision": model.vision.visual, "vision_adapter": model.vision.adapter, "merge": model.merge, "fusion": model.fusion, "projector": model.projector,
             "llm": model.llm, "clip_text": model.text_encoder, "contrastive_head": model.contrastive_head}
    trainable = {id(p) for m in model.trainable_modules("generation").values() for p in m.parameters()}
    out = {}
    for name, module in parts.items():
        params = list(module.parameters())
        out[name] = {"total": sum(p.numel() for p in params),
                     "trainable": sum(p.numel() for p in params if id(p) in trainable)}
    out["all"] = {k: sum(v[k] for v in out.values()) for k in ("total", "trainable")}
    return out


def prompt_length(model: nn.Module, acct: TokenAccounting, question: str = "What is in the image?") -> int:
    """LLM prompt length (template + fused tokens) for ``len(acct.fused_per_question)`` copies of ``question``."""
    from fusion_vlm.language import build_prompt

    turns = [(question, "yes")] * (len(acct.fused_per_question) - 1) + [(question, None)]
    return len(build_prompt(model.tokenizer, turns, acct.fused_per_question,
                            model.config.llm.system_prompt).input_ids)


def merged_side(cfg: ModelConfig) -> int:
    """Side of one view's merged token grid (12 for 336-px views of 14-px patches)."""
    return merged_grid(cfg.views.view_size // cfg.vision.patch_size, cfg.merge)


def as_dict(acct: TokenAccounting) -> dict:
    """JSON-ready form of a :class:`TokenAccounting`."""
    return asdict(acct)
