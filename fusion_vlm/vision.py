"""Step 2 of the data path: views -> patch tokens, with open_clip's vision tower.

:func:`build_clip` makes the open_clip CLIP model (a named architecture with a
pretrained tag or local weights file, or a custom config for tiny models); the
position embedding is resized to the view size by open_clip when it loads the
weights. :class:`VisionTower` returns the patch tokens (no CLS) of one
transformer block and adapts their width to the fusion module. The CLIP text
tower of the same model is kept for the stage-1 contrastive loss.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import open_clip
import torch
from torch import nn

from fusion_vlm.config import VisionConfig


def build_clip(cfg: VisionConfig, image_size: int, device: str | torch.device = "cpu") -> nn.Module:
    """Build the open_clip CLIP model for ``image_size``-pixel views and a ``text_context_length`` text tower.

    ``cfg.pretrained`` is an open_clip tag (downloaded through open_clip's cache)
    or a local weights file; ``None`` gives a random init. On the ``meta`` device
    nothing is allocated or loaded (for parameter counts of the paper model).
    """
    meta = torch.device(device).type == "meta"
    if meta and cfg.pretrained:
        cfg = VisionConfig(**{**cfg.__dict__, "pretrained": None})
    if cfg.pretrained and not _is_tag_or_file(cfg.model_name, cfg.pretrained):
        raise FileNotFoundError(
            f"vision.pretrained='{cfg.pretrained}': not a file and not an open_clip tag for {cfg.model_name} "
            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(cfg.model_name)) or 'none'})"
        )
    with torch.device(device) if meta else contextlib.nullcontext():
        if cfg.custom is not None:
            custom = dict(cfg.custom)
            vision_cfg = {**custom.get("vision_cfg", {}), "image_size": image_size}
            text_cfg = {**custom.get("text_cfg", {}), "context_length": cfg.text_context_length}
            model = open_clip.CLIP(embed_dim=custom["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg)
            if cfg.pretrained:
                open_clip.load_checkpoint(model, cfg.pretrained)
        else:
            model = open_clip.create_model(
                cfg.model_name,
                pretrained=cfg.pretrained,
                force_image_size=image_size,
                force_context_length=cfg.text_context_length,
                device="cpu" if not meta else device,
            )
    return model if meta else model.to(device)


def _is_tag_or_file(model_name: str, pretrained: str) -> bool:
    return Path(pretrained).is_file() or pretrained in open_clip.list_pretrained_tags_by_model(model_name)


class VisionTower(nn.Module):
    """open_clip ViT -> patch tokens of one block, adapted to the fusion width.

    Input ``pixel_values`` float [V, 3, S, S] (normalised views); output
    float [V, S/P, S/P, D_out] with P the patch size and D_out the fusion width.
    """

    def __init__(self, visual: nn.Module, cfg: VisionConfig, out_width: int):
        super().__init__()
        self.visual = visual
        self.layer = cfg.layer
        self.num_blocks = len(visual.transformer.resblocks)
        if not -self.num_blocks <= cfg.layer < self.num_blocks:
            raise ValueError(f"vision.layer={cfg.layer}: the tower has {self.num_blocks} blocks")
        width = visual.conv1.out_channels
        patch = visual.conv1.kernel_size[0]
        if width != cfg.width:
            raise ValueError(f"vision.width={cfg.width}: the open_clip tower has width {width}")
        if patch != cfg.patch_size:
            raise ValueError(f"vision.patch_size={cfg.patch_size}: the open_clip tower has patch size {patch}")
        self.patch_size = patch
        self.width = width
        self.adapter = nn.Linear(width, out_width) if width != out_width else nn.Identity()
        if cfg.grad_checkpointing:
            visual.set_grad_checkpointing(True)

    @property
    def block_index(self) -> int:
        """Index (0-based) of the block whose output is returned."""
        return self.layer % self.num_blocks

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens: float [V, 3, S, S] -> [V, S/P, S/P, D_out] (CLS dropped)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values: expected [V, 3, S, S], got {tuple(pixel_values.shape)}")
        size = pixel_values.shape[-1]
        if size % self.patch_size or pixel_values.shape[-2] != size:
            raise ValueError(f"pixel_values: views must be square multiples of {self.patch_size} px, got "
                             f"{tuple(pixel_values.shape[-2:])}")
        dtype = self.visual.conv1.weight.dtype
        out = self.visual.forward_intermediates(
            pixel_values.to(dtype),
            indices=[self.block_index],
            stop_early=True,
            normalize_intermediates=self.layer == -1,
            intermediates_only=True,
            output_fmt="NLC",
        )
        tokens = out["image_intermediates"][0]  # [V, g*g, W]
        grid = size // self.patch_size
        tokens = tokens.reshape(tokens.shape[0], grid, grid, self.width)
        return self.adapter(tokens)
