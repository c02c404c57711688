"""Pixels of the synthetic world: canvas, shapes and glyphs (no fonts downloaded).

Everything here is a pure function of its arguments (sizes, colours, boxes), so
:mod:`fusion_vlm.demo.world` can sample a scene and then draw it. Glyphs use
Pillow's built-in scalable default font (``ImageFont.load_default(size=...)``,
shipped inside Pillow), drawn with a stroke so they stay legible when small.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fusion_vlm.views import plan_views

# name -> RGB; far apart so that the nearest palette colour identifies a pixel
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 200, 30),
    "purple": (145, 55, 185),
}
SHAPES = ("square", "circle", "triangle", "star", "cross")
GLYPH_RGB = (25, 25, 25)
REGIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")


def nearest_colour(rgb: tuple[int, int, int]) -> str:
    """Name of the palette colour closest (squared RGB distance) to ``rgb``."""
    return min(PALETTE, key=lambda n: sum((a - b) ** 2 for a, b in zip(PALETTE[n], rgb)))


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Ten vertices of a five-pointed star of outer radius r, point up."""
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
               rgb: tuple[int, int, int]) -> None:
    """Fill ``shape`` inscribed in the square ``box`` (x0, y0, x1, y1); the box centre is always inside it."""
    x0, y0, x1, y1 = box
    cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "star":
        draw.polygon(_star(cx, cy + 0.05 * s, s / 2), fill=rgb)
    elif shape == "cross":
        t = s / 6
        draw.rectangle((cx - t, y0, cx + t, y1), fill=rgb)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def font_size_for(cap_height: float) -> int:
    """Font size whose capital letters are about ``cap_height`` pixels tall."""
    top, bottom = _font(100).getbbox("H")[1::2]
    return max(4, round(cap_height * 100 / (bottom - top)))


def draw_glyph(draw: ImageDraw.ImageDraw, char: str, centre: tuple[float, float], cap_height: float) -> None:
    """Draw ``char`` (upper-cased) centred at ``centre`` with capitals ``cap_height`` px tall, dark grey."""
    size = font_size_for(cap_height)
    stroke = max(1, size // 14)
    draw.text(centre, char.upper(), font=_font(size), fill=GLYPH_RGB, anchor="mm", stroke_width=stroke,
              stroke_fill=GLYPH_RGB)


def glyph_box(char: str, centre: tuple[float, float], cap_height: float) -> tuple[int, int, int, int]:
    """Pixel bounding box (x0, y0, x1, y1) that :func:`draw_glyph` covers for the same arguments."""
    size = font_size_for(cap_height)
    x0, y0, x1, y1 = _font(size).getbbox(char.upper(), anchor="mm", stroke_width=max(1, size // 14))
    return (int(centre[0] + x0), int(centre[1] + y0), int(centre[0] + x1), int(centre[1] + y1))


def blank_canvas(width: int, height: int, rgb: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A plain RGB canvas and a drawing context on it."""
    img = Image.new("RGB", (width, height), rgb)
    return img, ImageDraw.Draw(img)


def image_size(rng: np.random.Generator, min_side: int, max_side: int, min_long: int,
               max_aspect: float) -> tuple[int, int]:
    """Random (width, height): aspect log-uniform in [1, max_aspect], either orientation, sides in range."""
    ratio = math.exp(rng.uniform(0.0, math.log(max_aspect)))
    lo = max(min_long, math.ceil(min_side * ratio))
    long = int(rng.integers(min(lo, max_side), max_side + 1))
    short = max(min_side, min(long, round(long / ratio)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def glyph_cap_height(width: int, height: int, local_px: float, view_size: int, max_local_views: int,
                     hd_rule: str = "no_upsize") -> float:
    """Image-pixel capital height that becomes ``local_px`` pixels in the image's HD local views."""
    plan = plan_views(width, height, view_size, max_local_views, hd_rule)
    return local_px * width / plan.resized[0]


def draw_scene(rng: np.random.Generator, width: int, height: int, objects, cap_height: float,
               colour_jitter: int) -> Image.Image:
    """Draw ``objects`` (world objects: kind, box, shape, colour, char) on a random light background.

    Shapes get their palette colour +- ``colour_jitter`` per channel; glyphs are drawn so that they
    cover exactly their stored ``box`` (see :func:`glyph_box`).
    """
    bg = tuple(int(v) for v in rng.integers(215, 250, 3))
    img, draw = blank_canvas(width, height, bg)
    for o in objects:
        if o.kind == "shape":
            jitter = rng.integers(-colour_jitter, colour_jitter + 1, 3)
            rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(PALETTE[o.colour], jitter))
            draw_shape(draw, o.shape, o.box, rgb)
        else:
            b = glyph_box(o.char, (0, 0), cap_height)  # the box is the drawing centre + these offsets
            draw_glyph(draw, o.char, (o.box[0] - b[0], o.box[1] - b[1]), cap_height)
    return img
