"""Step 3 of the data path: merge each view's patch grid and close it with a newline token.

A stride-2 3x3 convolution (no bias, weights drawn from N(0, 0.02) as in the
authors' code) plus a nearest-neighbour downsampled residual turns a 24x24
grid into 12x12; one learned ``<newline>`` token is appended per view: 145
tokens per 336-px view, 1450 for a full HD-9 image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion_vlm.config import MergeConfig


def merged_grid(grid: int, cfg: MergeConfig) -> int:
    """Side of the merged grid for a ``grid`` x ``grid`` patch grid (24 -> 12 at stride 2)."""
    pad = cfg.kernel_size // 2
    return (grid + 2 * pad - cfg.kernel_size) // cfg.stride + 1


def tokens_per_view(grid: int, cfg: MergeConfig) -> int:
    """Vision tokens one view contributes after the merge (145 for a 24x24 grid)."""
    return merged_grid(grid, cfg) ** 2 + int(cfg.newline)


class TokenMerge(nn.Module):
    """[V, g, g, D] patch tokens -> [V, m*m (+1), D] merged tokens (m = ceil(g / stride))."""

    def __init__(self, width: int, cfg: MergeConfig):
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv2d(width, width, cfg.kernel_size, stride=cfg.stride,
                              padding=cfg.kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight, mean=0.0, std=cfg.init_std)
        self.newline = nn.Parameter(torch.zeros(width)) if cfg.newline else None
        if self.newline is not None:
            nn.init.normal_(self.newline, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Merge: float [V, g, g, D] -> [V, m*m + newline, D], row-major within a view."""
        if tokens.ndim != 4 or tokens.shape[1] != tokens.shape[2]:
            raise ValueError(f"tokens: expected [V, g, g, D], got {tuple(tokens.shape)}")
        x = tokens.permute(0, 3, 1, 2)  # [V, D, g, g]
        y = self.conv(x)
        if self.cfg.residual:
            y = y + F.interpolate(x, size=y.shape[-2:], mode="nearest")
        y = y.flatten(2).transpose(1, 2)  # [V, m*m, D]
        if self.newline is not None:
            nl = self.newline.to(y.dtype).expand(y.shape[0], 1, -1)
            y = torch.cat([y, nl], dim=1)
        return y
