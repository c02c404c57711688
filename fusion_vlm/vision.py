"""Step 2 of the data path: views -> patch tokens, with open_clip's vision tower.

:func:`build_clip` makes the open_clip CLIP model (a named architecture with a
pretrained tag or local weights file, or a custom config for tiny models); the
image position embedding is resized to the view size by open_clip when it loads
the weights, and the text context is then extended by :func:`set_text_context`
(pretrained rows kept, new rows appended, as in the authors' code).
:class:`VisionTower` returns the patch tokens (no CLS) of one
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
    or a local weights file (``.safetensors`` preferred; other files are read with
    ``torch.load(weights_only=True)``); ``None`` gives a random init. Pretrained
    weights are loaded at the checkpoint's own text context (77 for the LAION
    towers), so open_clip does not interpolate them, and the context is then
    changed to ``text_context_length`` by :func:`set_text_context` (the paper's
    77 -> 512: the pretrained position rows stay as they are, new rows are drawn
    from the old table's mean and std). On the ``meta`` device nothing is
    allocated or loaded (for parameter counts of the paper model).
    """
    meta = torch.device(device).type == "meta"
    if meta and cfg.pretrained:
        cfg = VisionConfig(**{**cfg.__dict__, "pretrained": None})
    if cfg.pretrained and not _is_tag_or_file(cfg.model_name, cfg.pretrained):
        raise FileNotFoundError(
            f"vision.pretrained='{cfg.pretrained}': not a file and not an open_clip tag for {cfg.model_name} "
            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(cfg.model_name)) or 'none'})"
        )
    # pretrained weights load at their own context (no interpolation by open_clip); resized afterwards
    context = _pretrained_context(cfg) if cfg.pretrained else cfg.text_context_length
    with torch.device(device) if meta else contextlib.nullcontext():
        if cfg.custom is not None:
            custom = dict(cfg.custom)
            vision_cfg = {**custom.get("vision_cfg", {}), "image_size": image_size}
            text_cfg = {**custom.get("text_cfg", {}), "context_length": context}
            model = open_clip.CLIP(embed_dim=custom["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg)
            if cfg.pretrained:
                open_clip.load_checkpoint(model, cfg.pretrained)
        else:
            model = open_clip.create_model(
                cfg.model_name,
                pretrained=cfg.pretrained,
                force_image_size=image_size,
                force_context_length=context,
                device="cpu" if not meta else device,
            )
    if context != cfg.text_context_length:
        set_text_context(model, cfg.text_context_length)
    return model if meta else model.to(device)


def _is_tag_or_file(model_name: str, pretrained: str) -> bool:
    return Path(pretrained).is_file() or pretrained in open_clip.list_pretrained_tags_by_model(model_name)


def _pretrained_context(cfg: VisionConfig) -> int:
    """Text context of the pretrained weights: the rows of the file's table, else the architecture's context."""
    if Path(cfg.pretrained).is_file():
        rows = checkpoint_text_context(cfg.pretrained)
        if rows:
            return rows
    text_cfg = (cfg.custom or {}).get("text_cfg", {}) if cfg.custom is not None else \
        open_clip.get_model_config(cfg.model_name)["text_cfg"]
    return int(text_cfg.get("context_length", 77))


def checkpoint_text_context(path: str | Path) -> int | None:
    """Rows of the text position table stored in an open_clip checkpoint, or None if it has none.

    Reads only the tensor's shape for ``.safetensors``; other files are opened with
    ``torch.load(weights_only=True, mmap=True)``.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip checkpoint: no mmap
            sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
        shapes = {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for key, shape in shapes.items():
        name = key.removeprefix("module.")
        if name in ("positional_embedding", "text.positional_embedding") and len(shape) == 2:
            return int(shape[0])
    return None


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding the text ``positional_embedding`` and ``attn_mask`` (the CLIP itself or ``model.text``)."""
    for owner in (model, getattr(model, "text", None)):
        if owner is not None and isinstance(getattr(owner, "positional_embedding", None), nn.Parameter):
            return owner
    raise ValueError(f"{type(model).__name__}: no open_clip text position table to resize (a Hugging Face text "
                     f"tower keeps its own context); set vision.text_context_length to the tower's context")


@torch.no_grad()
def set_text_context(model: nn.Module, length: int) -> None:
    """Change the CLIP text context to ``length`` in place, keeping every existing position row bit for bit.

    Growing (the paper's 77 -> 512): a new table float [length, W] whose rows
    0..old-1 are the old rows and whose new rows are drawn from Normal(mean, std)
    of the whole old table (one scalar mean and std, as in the authors' code;
    uses torch's global generator, so ``torch.manual_seed`` makes it repeatable).
    Shrinking keeps rows 0..length-1. The causal mask is rebuilt for the new size.
    """
    if length < 1:
        raise ValueError(f"text context length {length}: must be >= 1")
    owner = _text_tower(model)
    old = owner.positional_embedding
    extra = getattr(owner, "num_pos", old.shape[0]) - getattr(owner, "context_length", old.shape[0])  # a CLS row
    rows = length + extra
    if rows == old.shape[0]:
        return
    new = old.new_empty(rows, old.shape[1])
    keep = min(rows, old.shape[0])
    new[:keep] = old[:keep]
    if rows > old.shape[0]:
        std, mean = torch.std_mean(old.float())
        new[old.shape[0]:].normal_(mean=mean.item(), std=std.item())
    owner.positional_embedding = nn.Parameter(new, requires_grad=old.requires_grad)
    if getattr(owner, "attn_mask", None) is not None:
        mask = torch.full((rows, rows), float("-inf"), dtype=owner.attn_mask.dtype, device=owner.attn_mask.device)
        owner.attn_mask = mask.triu_(1)
    for obj in {id(model): model, id(owner): owner}.values():
        if hasattr(obj, "context_length"):
            obj.context_length = length
    if hasattr(owner, "num_pos"):
        owner.num_pos = rows


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
