"""Image -> HD-N global + local views (the first step of the data path).

An image becomes ``1 + rows * cols`` square views of ``view_size`` pixels
(HD-9 by default, Section 4.2 / Appendix C of the paper): one *global* view of
the whole image and a grid of *local* views of an aspect-preserving resize.
:func:`plan_views` is the pure geometry; :class:`ViewProcessor` produces the
normalised float tensors; :func:`load_image` (re-exported from
:mod:`fusion_vlm.images`) decodes files.

Two rules (``ViewsConfig.hd_rule``):

``reference`` (the paper's; the authors' ``HD_transform``)
    The largest scale s with ``s * ceil(s / r) <= max_local_views`` (r = long /
    short, float maths as in the reference) fixes the grid *whatever the image
    size*: the long side is resized to ``s * view_size`` (small images are
    upsized), the short side to ``int(long_r / r)``, with PIL's bilinear
    filter on the landscape orientation (portrait images are transposed and
    back); the short side is padded to a multiple of ``view_size``, centred
    (floor) in **white**.  So 640x480, 336x336 and 224x224 all give 3 x 3 local
    views: 10 views, 1450 vision tokens.  Global view: a square image is used
    as it is; otherwise, if its long side exceeds ``view_size``, it is resized
    with LANCZOS to long side ``view_size`` (short side ``int(short * ratio)``)
    and pasted, centred (floor), on a **black** square of its long side; the
    normalised square is then bicubic-interpolated (no antialiasing) to
    ``view_size``.

``no_upsize``
    The same grid rule capped at ``ceil(long / view_size)`` columns (a small
    image is never upsized beyond its need), short side rounded; one
    antialiased resize (``interpolation``); padding in the mean colour, which
    is exactly 0 after normalisation; the global view is the resized canvas
    scaled down by the grid factor.  Only the band of output pixels whose
    kernel reaches the image is computed.  Cheaper for small images; not the
    paper's rule.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from fusion_vlm.config import CLIP_MEAN, CLIP_STD
from fusion_vlm.images import DEFAULT_MAX_PIXELS, ImageError, ImageSource, load_image, to_rgb

__all__ = ["HD_RULES", "ImageError", "ViewPlan", "ViewProcessor", "load_image", "plan_views", "to_rgb"]

HD_RULES = ("reference", "no_upsize")  # see the module docstring

# interpolation name -> (torchvision mode, half-width of the kernel in output pixels when downsampling)
INTERPOLATIONS = {
    "bicubic": (TF.InterpolationMode.BICUBIC, 2),
    "bilinear": (TF.InterpolationMode.BILINEAR, 1),
}


@dataclass(frozen=True)
class ViewPlan:
    """Geometry of one image's views; sizes are (width, height) in pixels.

    ``resized``: the aspect-preserving resize of the image; ``padded``: the
    canvas it is centred on, ``(cols * view_size, rows * view_size)``; local
    views are the ``rows x cols`` grid of that canvas, read row-major.
    """

    rows: int
    cols: int
    resized: tuple[int, int]
    padded: tuple[int, int]
    n_local: int = field(init=False)
    n_views: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_local", self.rows * self.cols)
        object.__setattr__(self, "n_views", self.rows * self.cols + 1)

    @property
    def view_size(self) -> int:
        """Side of one view in pixels."""
        return self.padded[0] // self.cols

    @property
    def offset(self) -> tuple[int, int]:
        """(x, y) of the resized image's top-left corner inside the padded canvas (centred, floor)."""
        return (self.padded[0] - self.resized[0]) // 2, (self.padded[1] - self.resized[1]) // 2


def _check_positive(**values: int) -> None:
    """Raise ValueError naming the first argument that is not an integer >= 1."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


def _ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def _hd_columns(long: int, short: int, max_local_views: int) -> int:
    """Largest c >= 1 with c * ceil(c / r) <= max_local_views, r = long / short (exact integer maths)."""
    c = 1
    while (c + 1) * _ceil_div((c + 1) * short, long) <= max_local_views:
        c += 1
    return c


def _reference_scale(long: int, short: int, max_local_views: int) -> int:
    """The reference's grid scale: largest s >= 1 with s * ceil(s / r) <= max_local_views, r = long / short
    (Python floats, as the authors' ``HD_transform`` computes it)."""
    ratio = long / short
    s = 1
    while (s + 1) * math.ceil((s + 1) / ratio) <= max_local_views:
        s += 1
    return s


def plan_views(width: int, height: int, view_size: int = 336, max_local_views: int = 9,
               rule: str = "reference") -> ViewPlan:
    """Plan the HD-N views of a ``width x height`` image (pure function, no pixels).

    On the long side, with r = long / short >= 1:

    * ``rule="reference"`` (the paper's): c = the largest s with ``s * ceil(s / r) <= max_local_views``;
      long side ``c * view_size``, short side ``max(1, int(c * view_size / r))`` -- small images are
      upsized, so every 4:3 or square image fills the 3 x 3 grid of HD-9;
    * ``rule="no_upsize"``: c = min(that s by exact integer maths, ``max(1, ceil(long / view_size))``);
      short side ``max(1, round(c * view_size / r))`` (half up).

    Then the short side is padded (centred) to ``rows * view_size``, ``rows = ceil(short / view_size)``.
    The returned rows / cols follow the image's own orientation (a portrait image gets ``c`` rows);
    always ``rows * cols <= max_local_views``.  E.g. with the reference rule 640x480, 336x336 and
    1008x1008 -> 3x3 (10 views); 1920x1080 -> 2 rows x 3 cols; 1x10000 -> 9 rows x 1 col.
    """
    _check_positive(width=width, height=height, view_size=view_size, max_local_views=max_local_views)
    if rule not in HD_RULES:
        raise ValueError(f"rule must be one of {HD_RULES}, got {rule!r}")
    long, short = max(width, height), min(width, height)
    if rule == "reference":
        c = _reference_scale(long, short, max_local_views)
        long_r = c * view_size
        short_r = max(1, int(long_r / (long / short)))
    else:
        c = min(_hd_columns(long, short, max_local_views), max(1, _ceil_div(long, view_size)))
        long_r = c * view_size
        short_r = max(1, (2 * long_r * short + long) // (2 * long))
    n_short = _ceil_div(short_r, view_size)
    if width >= height:
        return ViewPlan(n_short, c, (long_r, short_r), (long_r, n_short * view_size))
    return ViewPlan(c, n_short, (short_r, long_r), (n_short * view_size, long_r))


def _influenced(offset: int, length: int, scale: int, size: int, half: int) -> tuple[int, int]:
    """Output indices [lo, hi) of a ``size * scale -> size`` antialiased resize that read any input
    pixel in [offset, offset + length); mirrors torch's kernel support (center +- half * scale)."""
    if scale == 1:
        return offset, offset + length
    index = np.arange(size)
    centre = (index + 0.5) * scale
    first = np.floor(centre - half * scale + 0.5).clip(0, None)
    stop = np.floor(centre + half * scale + 0.5).clip(None, size * scale)
    hit = np.flatnonzero((first < offset + length) & (stop > offset))
    return int(hit[0]), int(hit[-1]) + 1


def _fill(region: np.ndarray, colour: np.ndarray) -> None:
    """Fill uint8 [h, w, 3] with colour [3] (one row by broadcast, then whole-row copies: fast)."""
    if region.size:
        region[0] = colour
        region[1:] = region[0]


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Share a uint8 [H, W, 3] array (possibly read-only, e.g. PIL's buffer) as a tensor; only ever read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we never write to it
        return torch.from_numpy(array)


def _resize_hwc(image: torch.Tensor, width: int, height: int, mode: TF.InterpolationMode) -> np.ndarray:
    """Antialiased uint8 resize of [H, W, 3] to [height, width, 3] (numpy view, may share memory)."""
    if image.shape[0] != height or image.shape[1] != width:
        chw = TF.resize(image.permute(2, 0, 1), [height, width], interpolation=mode, antialias=True)
        image = chw.permute(1, 2, 0)
    return image.contiguous().numpy()


class ViewProcessor:
    """Image -> normalised HD-N views: float32 [n_views, 3, view_size, view_size], global view first.

    ``hd_rule`` picks the reference (paper) or the never-upsize rule (module docstring); ``interpolation``
    is the resize kernel of the ``no_upsize`` rule (the reference rule uses the reference's kernels).  The
    keyword arguments match ``ViewsConfig`` (``ViewProcessor(**asdict(cfg))``).
    """

    def __init__(
        self,
        view_size: int = 336,
        max_local_views: int = 9,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        interpolation: str = "bicubic",
        hd_rule: str = "reference",
    ) -> None:
        if hd_rule not in HD_RULES:
            raise ValueError(f"hd_rule must be one of {HD_RULES}, got {hd_rule!r}")
        self.hd_rule = hd_rule
        _check_positive(view_size=view_size, max_local_views=max_local_views, max_image_pixels=max_image_pixels)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        mean_a, std_a = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        if mean_a.shape != (3,) or std_a.shape != (3,) or not (std_a > 0).all():
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean={mean!r}, std={std!r}")
        self.view_size, self.max_local_views, self.max_image_pixels = view_size, max_local_views, max_image_pixels
        self.mean, self.std, self.interpolation = tuple(mean_a.tolist()), tuple(std_a.tolist()), interpolation
        self._mode, self._half = INTERPOLATIONS[interpolation]
        self._scale = (1.0 / (255.0 * std_a)).astype(np.float32).reshape(3, 1, 1)
        self._bias = (-mean_a / std_a).astype(np.float32).reshape(3, 1, 1)
        self._pad = np.rint(mean_a * 255.0).astype(np.uint8)

    def __repr__(self) -> str:
        return (
            f"ViewProcessor(view_size={self.view_size}, max_local_views={self.max_local_views}, "
            f"max_image_pixels={self.max_image_pixels}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation!r}, hd_rule={self.hd_rule!r})"
        )

    def plan(self, width: int, height: int) -> ViewPlan:
        """The :class:`ViewPlan` this processor uses for a ``width x height`` image."""
        return plan_views(width, height, self.view_size, self.max_local_views, self.hd_rule)

    def __call__(self, image: ImageSource) -> tuple[torch.Tensor, ViewPlan]:
        """Views of one image (anything :func:`load_image` accepts).

        Returns (float32 [V, 3, S, S] with V = plan.n_views, S = view_size, [global, local row-major], plan).
        """
        img = load_image(image, max_pixels=self.max_image_pixels)
        plan = self.plan(*img.size)
        if self.hd_rule == "reference":
            return self._reference_views(img, plan), plan
        resized = _resize_hwc(_as_tensor(np.asarray(img)), *plan.resized, self._mode)
        out = torch.empty(plan.n_views, 3, self.view_size, self.view_size)
        self._local_views(out.numpy()[1:], resized, plan)
        self._global_view(out.numpy()[0], resized, plan)
        return out, plan

    def process_batch(self, images: Sequence[ImageSource]) -> tuple[list[torch.Tensor], list[ViewPlan]]:
        """Views of several images: (list of float32 [V_i, 3, S, S], list of ViewPlan)."""
        results = [self(image) for image in images]
        return [views for views, _ in results], [plan for _, plan in results]

    def _normalise(self, dst: np.ndarray, src: np.ndarray) -> None:
        """dst (float32 [..., 3, h, w]) = (src / 255 - mean) / std, src uint8 broadcastable to dst."""
        dst[...] = src  # the uint8 -> float32 cast does the strided gather in one pass
        np.multiply(dst, self._scale, out=dst)
        np.add(dst, self._bias, out=dst)

    def _canvas(self, resized: np.ndarray, height: int, width: int, y: int, x: int) -> np.ndarray:
        """uint8 [height, width, 3] filled with the pad colour, ``resized`` pasted at (y, x)."""
        if (height, width) == resized.shape[:2]:
            return resized
        canvas = np.empty((height, width, 3), np.uint8)
        h, w = resized.shape[:2]
        for region in (canvas[:y], canvas[y + h :], canvas[y : y + h, :x], canvas[y : y + h, x + w :]):
            _fill(region, self._pad)
        canvas[y : y + h, x : x + w] = resized
        return canvas

    def _local_views(self, dst: np.ndarray, resized: np.ndarray, plan: ViewPlan) -> None:
        """Write the rows x cols local views into dst (float32 [rows * cols, 3, S, S])."""
        s, (x0, y0), (w, h) = self.view_size, plan.offset, plan.resized
        canvas = self._canvas(resized, plan.padded[1], plan.padded[0], y0, x0)
        grid = dst.reshape(plan.rows, plan.cols, 3, s, s)
        self._normalise(grid, canvas.reshape(plan.rows, s, plan.cols, s, 3).transpose(0, 2, 4, 1, 3))
        # the pad band is < S wide, so it lies in the first / last row (column) of views
        grid[0, :, :, :y0] = 0.0
        grid[-1, :, :, y0 + h - (plan.rows - 1) * s :] = 0.0
        grid[:, 0, :, :, :x0] = 0.0
        grid[:, -1, :, :, x0 + w - (plan.cols - 1) * s :] = 0.0

    def _global_view(self, dst: np.ndarray, resized: np.ndarray, plan: ViewPlan) -> None:
        """Write the global view into dst (float32 [3, S, S]): the resized image centred on a square
        of side c * S (c = max(rows, cols)) in the pad colour, resized to S.  Only the band of output
        pixels whose kernel reaches the image is computed; the remaining pure padding is 0."""
        s, (w, h) = self.view_size, plan.resized
        c = max(plan.rows, plan.cols)
        side = c * s
        gx, gy = (side - w) // 2, (side - h) // 2
        ylo, yhi = _influenced(gy, h, c, s, self._half)
        xlo, xhi = _influenced(gx, w, c, s, self._half)
        margin = self._half if c > 1 else 0  # rows kept around the band so its edges see full kernels
        by0, by1 = max(0, ylo - margin), min(s, yhi + margin)
        bx0, bx1 = max(0, xlo - margin), min(s, xhi + margin)
        band = self._canvas(resized, (by1 - by0) * c, (bx1 - bx0) * c, gy - by0 * c, gx - bx0 * c)
        small = _resize_hwc(_as_tensor(band), bx1 - bx0, by1 - by0, self._mode)
        dst[...] = 0.0
        inner = small[ylo - by0 : yhi - by0, xlo - bx0 : xhi - bx0].transpose(2, 0, 1)
        self._normalise(dst[:, ylo:yhi, xlo:xhi], inner)

    # ------------------------------------------------------------------ the reference (paper) rule
    def _reference_views(self, img: Image.Image, plan: ViewPlan) -> torch.Tensor:
        """The authors' HD transform + global view: float32 [V, 3, S, S], [global, local row-major]."""
        s = self.view_size
        out = torch.empty(plan.n_views, 3, s, s)
        # local grid: landscape orientation, PIL bilinear resize, white centred padding of the short side
        portrait = img.width < img.height
        land = img.transpose(Image.Transpose.TRANSPOSE) if portrait else img
        long_r, short_r = max(plan.resized), min(plan.resized)
        land = land.resize((long_r, short_r), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (long_r, _ceil_div(short_r, s) * s), (255, 255, 255))
        canvas.paste(land, (0, (canvas.height - short_r) // 2))
        if portrait:
            canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
        grid = np.asarray(canvas).reshape(plan.rows, s, plan.cols, s, 3).transpose(0, 2, 4, 1, 3)
        self._normalise(out.numpy()[1:].reshape(plan.rows, plan.cols, 3, s, s), grid)
        # global view: LANCZOS down to long side S (never up), black centred square, bicubic to S x S
        w, h = img.size
        square = img
        if w != h:
            side = max(w, h)
            if side > s:
                ratio = s / side
                w, h = (s, max(1, int(h * ratio))) if w > h else (max(1, int(w * ratio)), s)
                square = img.resize((w, h), Image.Resampling.LANCZOS)
                side = s
            canvas = Image.new("RGB", (side, side))
            canvas.paste(square, ((side - w) // 2, (side - h) // 2))
            square = canvas
        if square.width == s:
            self._normalise(out.numpy()[0], np.asarray(square).transpose(2, 0, 1))
        else:
            glob = np.empty((1, 3, square.height, square.width), np.float32)
            self._normalise(glob, np.asarray(square).transpose(2, 0, 1))
            out[0] = F.interpolate(torch.from_numpy(glob), size=(s, s), mode="bicubic")[0]
        return out
