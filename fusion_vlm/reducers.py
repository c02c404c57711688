"""Baseline token reducers: the merged vision tokens go to the LLM without the fusion module.

``ModelConfig.reducer`` picks what sits between the token merge and the projector:

* ``fusion`` -- the paper's question-fused query slots (:mod:`fusion_vlm.fusion`);
* ``all`` -- every merged token of the image (the LLaVA-style ceiling): T = views x (grid^2 + newline);
* ``avgpool`` -- 1-D adaptive average pooling of the image's flattened token sequence [T, H] to N tokens.
  Over the whole sequence, not per view: N can be smaller than the number of views (N = 1, 2, 4 with up
  to 10 views), which per-view pooling cannot give; the order (global view, local views row-major, each
  closed by its newline token) is kept, so token i averages a contiguous stretch of about T / N tokens;
* ``random`` -- N of the T tokens drawn without replacement, kept in their original order: drawn anew for
  every question group at every training step (torch's global generator, seeded by the run), and at
  evaluation from one permutation per image seeded by the content of its views (:func:`image_seed`), so an
  image gets the same tokens whatever the batch, and its N' tokens are a subset of its N tokens.

The reducer never sees the question. Later questions of a conversation get N' tokens by the same rule
(``all``: all T tokens again, so every user turn still opens with the image's tokens). A request above T
gives T tokens (:func:`group_counts`). Each baseline has its own projector (the model's ``projector``, width
H -> LLM width, started fresh) and is trained in the generation stage with everything but the projector
frozen; the contrastive stage needs the fusion module.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from fusion_vlm.config import REDUCERS, ModelConfig
from fusion_vlm.fusion import FusionOutput, group_sizes
from fusion_vlm.merge import tokens_per_view

BASELINES = REDUCERS[1:]
SHARED_PREFIXES = ("vision.", "merge.", "text_encoder.", "contrastive_head.", "logit_scale")  # kept by a baseline


def check_reducer(reducer: str) -> str:
    """``reducer`` if it is one of :data:`REDUCERS`, else a one-line ``ValueError``."""
    if reducer not in REDUCERS:
        raise ValueError(f"reducer={reducer!r}: expected one of {', '.join(REDUCERS)}")
    return reducer


def group_counts(reducer: str, n_vision: int, n_groups: int, n_queries: int, n_later: int) -> list[int]:
    """Tokens given to each of ``n_groups`` question groups of an image with ``n_vision`` (T) merged tokens.

    ``fusion``: [N, N', N', ...]; ``all``: [T, T, ...]; ``avgpool`` / ``random``: [min(N, T), min(N', T), ...].
    """
    check_reducer(reducer)
    sizes = group_sizes(n_groups, n_queries, n_later)
    if reducer == "fusion":
        return sizes
    if reducer == "all":
        return [n_vision] * n_groups
    return [min(k, n_vision) for k in sizes]


def vision_tokens(cfg: ModelConfig, n_views: int) -> int:
    """Merged tokens T of an image with ``n_views`` views: views x (merged grid^2 + newline)."""
    return n_views * tokens_per_view(cfg.views.view_size // cfg.vision.patch_size, cfg.merge)


def image_seed(pixel_values: torch.Tensor) -> int:
    """A 63-bit seed from the content of one image's views float [V, 3, S, S] (same views -> same seed)."""
    digest = hashlib.sha1(pixel_values.detach().cpu().contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def avg_pool(vision: torch.Tensor, n: int) -> torch.Tensor:
    """1-D adaptive average pooling over the token sequence: float [T, H] -> [min(n, T), H].

    Output token i is the mean of tokens floor(i T / n) .. ceil((i + 1) T / n) - 1 (torch's adaptive rule).
    """
    k = min(n, vision.shape[0])
    return F.adaptive_avg_pool1d(vision.t()[None], k)[0].t()


def random_pick(vision: torch.Tensor, n: int, generator: torch.Generator | None = None,
                order: torch.Tensor | None = None) -> torch.Tensor:
    """N distinct tokens in their original order: float [T, H] -> [min(n, T), H].

    ``order`` (long [T], a permutation) fixes the draw: its first ``n`` entries, sorted; otherwise a
    fresh permutation from ``generator`` (None: torch's global generator).
    """
    t = vision.shape[0]
    if order is None:
        order = torch.randperm(t, generator=generator)
    idx = order[: min(n, t)].sort().values.to(vision.device)
    return vision[idx]


def reduce_tokens(reducer: str, vision: torch.Tensor, n: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """One group's tokens from one image's merged tokens float [T, H]: [T, H] (all) or [min(n, T), H].

    ``order``: the image's fixed permutation long [T] for ``random`` (evaluation); None draws anew.
    """
    if reducer == "all":
        return vision
    if reducer == "avgpool":
        return avg_pool(vision, n)
    if reducer == "random":
        return random_pick(vision, n, order=order)
    raise ValueError(f"reducer={reducer!r}: not a baseline reducer (expected one of {', '.join(BASELINES)})")


def reduce_batch(reducer: str, vision: list[torch.Tensor], n_groups: list[int], n_queries: int, n_later: int,
                 independent: bool = False, seeds: list[int] | None = None) -> FusionOutput:
    """The baseline's tokens of a batch, in the fusion module's output form.

    ``vision[b]``: float [T_b, H], the merged tokens of sample b (views flattened in order, newlines
    included); ``n_groups[b]``: its question groups. Group g gets ``group_counts`` tokens (``independent``:
    every group N). ``seeds[b]`` (evaluation, from :func:`image_seed`): ``random`` draws from one
    permutation per image seeded by it; None (training): a fresh draw per group. Returns
    ``FusionOutput(groups)`` with ``groups[b][g]`` float [k_g, H].
    """
    check_reducer(reducer)
    if len(vision) != len(n_groups):
        raise ValueError(f"got {len(vision)} vision sequences but {len(n_groups)} question counts")
    if seeds is not None and len(seeds) != len(vision):
        raise ValueError(f"got {len(seeds)} seeds for {len(vision)} images")
    groups = []
    for b, (v, g) in enumerate(zip(vision, n_groups)):
        order = None
        if reducer == "random" and seeds is not None:
            order = torch.randperm(v.shape[0], generator=torch.Generator().manual_seed(seeds[b]))
        sizes = group_sizes(g, n_queries, n_queries if independent else n_later)
        groups.append([reduce_tokens(reducer, v, k, order) for k in sizes])
    return FusionOutput(groups)


def transfer_shared(source: torch.nn.Module, target: torch.nn.Module) -> list[str]:
    """Copy the vision tower, merge, CLIP text tower and contrastive head of ``source`` into ``target``.

    For starting a baseline (``target``, no fusion module) from a stage-1 FusionVLM (``source``): the keys
    under :data:`SHARED_PREFIXES` must exist in both with the same shapes (a one-line ``ValueError``
    otherwise); the projector and the LLM are left as ``target`` has them. Returns the copied keys.
    """
    src, dst = source.state_dict(), target.state_dict()
    keys = [k for k in src if k.startswith(SHARED_PREFIXES)]
    missing = [k for k in keys if k not in dst]
    shapes = [k for k in keys if k in dst and dst[k].shape != src[k].shape]
    if missing or shapes or not keys:
        raise ValueError(f"cannot transfer the vision weights: missing in the target {missing[:3]}, "
                         f"shape mismatch {shapes[:3]}, {len(keys)} keys in the source")
    target.load_state_dict({k: src[k] for k in keys}, strict=False)
    return keys
