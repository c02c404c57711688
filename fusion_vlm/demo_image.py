"""A deterministic picture for the demo command (no files, no downloads)."""

from __future__ import annotations

from PIL import Image, ImageDraw


def synthetic_image(width: int = 1008, height: int = 756) -> Image.Image:
    """RGB image: a red square top left, a blue circle bottom right, a green triangle and a letter."""
    img = Image.new("RGB", (width, height), (235, 235, 225))
    draw = ImageDraw.Draw(img)
    s = min(width, height) // 5
    draw.rectangle([s // 2, s // 2, s // 2 + s, s // 2 + s], fill=(220, 30, 30))
    draw.ellipse([width - 2 * s, height - 2 * s, width - s, height - s], fill=(30, 60, 220))
    draw.polygon([(width // 2, height // 3), (width // 2 - s // 2, height // 3 + s),
                  (width // 2 + s // 2, height // 3 + s)], fill=(30, 170, 60))
    draw.text((width - 2 * s, s // 2), "A", fill=(0, 0, 0))
    return img
