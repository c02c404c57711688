"""Visual-token accounting: per-model token counts (:mod:`.calculator`), FLOP/KV-cache
cost model (:mod:`.cost`) and the tokens-vs-resolution plot (:mod:`.plot`).

Importing this package imports neither torch nor transformers.
"""

from fusion_vlm.tokens.calculator import TokenCount, count_visual_tokens, list_models

__all__ = ["TokenCount", "count_visual_tokens", "list_models"]
