"""Tests for fusion_vlm.views (HD-N view planning and preprocessing) and fusion_vlm.images (decoding)."""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision.transforms.v2 import functional as TF

from fusion_vlm import views as views_module
from fusion_vlm.views import ImageError, ViewPlan, load_image

# This file tests the `no_upsize` rule (and image decoding); tests/test_views_reference.py tests the
# paper's `reference` rule, the default.
ViewProcessor = functools.partial(views_module.ViewProcessor, hd_rule="no_upsize")


def plan_views(*args, **kwargs) -> ViewPlan:
    """:func:`fusion_vlm.views.plan_views` with the no_upsize rule."""
    return views_module.plan_views(*args, rule="no_upsize", **kwargs)

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
PAD = np.rint(MEAN * 255).astype(np.uint8)
LEVEL = 1.0 / (255 * STD.min())  # one uint8 step after normalisation


# ----------------------------------------------------------------------------- helpers


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Deterministic smooth RGB test image (sums of low-frequency sines)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 3, 3)
        chans.append(127.5 + 120 * np.sin(2 * np.pi * (fx * x / width + fy * y / height) + ph))
    return Image.fromarray(np.rint(np.stack(chans, -1)).astype(np.uint8))


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Deterministic uniform-noise RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def normalise(u8_hwc: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float64 [..., 3, H, W] CLIP-normalised (reference)."""
    x = np.moveaxis(u8_hwc.astype(np.float64) / 255.0, -1, -3)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def pil_reference(img: Image.Image, plan: ViewPlan, s: int = 336) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward PIL reference: (global [3,S,S], locals [n,3,S,S]) as float64."""
    resized = img.resize(plan.resized, Image.BICUBIC)
    canvas = Image.new("RGB", plan.padded, tuple(int(v) for v in PAD))
    canvas.paste(resized, plan.offset)
    c = np.asarray(canvas)
    crops = [c[r * s : (r + 1) * s, k * s : (k + 1) * s] for r in range(plan.rows) for k in range(plan.cols)]
    side = max(plan.padded)
    square = Image.new("RGB", (side, side), tuple(int(v) for v in PAD))
    square.paste(resized, ((side - plan.resized[0]) // 2, (side - plan.resized[1]) // 2))
    glob = np.asarray(square.resize((s, s), Image.BICUBIC))
    return normalise(glob), normalise(np.stack(crops))


def torch_square_reference(img: Image.Image, plan: ViewPlan, interpolation: str, s: int = 336) -> np.ndarray:
    """uint8 [S, S, 3] global view via a full resize of the whole padded square (same torch kernel)."""
    mode = TF.InterpolationMode(interpolation)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    w, h = plan.resized
    x = TF.resize(x, [h, w], interpolation=mode, antialias=True).permute(1, 2, 0).numpy()
    side = max(plan.padded)
    square = np.empty((side, side, 3), np.uint8)
    square[...] = PAD
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = x
    sq = torch.from_numpy(square).permute(2, 0, 1)
    return TF.resize(sq, [s, s], interpolation=mode, antialias=True).permute(1, 2, 0).numpy()


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- plan_views

PLANS = [
    # (w, h), rows, cols, resized, padded
    ((1, 1), 1, 1, (336, 336), (336, 336)),
    ((1, 10000), 9, 1, (1, 3024), (336, 3024)),
    ((10000, 1), 1, 9, (3024, 1), (3024, 336)),
    ((336, 336), 1, 1, (336, 336), (336, 336)),
    ((1008, 1008), 3, 3, (1008, 1008), (1008, 1008)),
    ((1920, 1080), 2, 3, (1008, 567), (1008, 672)),
    ((1080, 1920), 3, 2, (567, 1008), (672, 1008)),
    ((4000, 300), 1, 9, (3024, 227), (3024, 336)),
    ((337, 336), 2, 2, (672, 670), (672, 672)),
    ((2000, 2000), 3, 3, (1008, 1008), (1008, 1008)),
    ((100, 50), 1, 1, (336, 168), (336, 336)),
]


@pytest.mark.parametrize("size,rows,cols,resized,padded", PLANS)
def test_plan_views_examples(size, rows, cols, resized, padded):
    plan = plan_views(*size)
    assert (plan.rows, plan.cols, plan.resized, plan.padded) == (rows, cols, resized, padded)
    assert plan.n_local == rows * cols and plan.n_views == rows * cols + 1
    assert plan.view_size == 336


def test_plan_views_hd9_token_count():
    assert plan_views(1008, 1008).n_views * 145 == 1450


def test_plan_views_invariants_random():
    rng = random.Random(1234)
    for _ in range(3000):
        w = int(math.exp(rng.uniform(0, math.log(30000))))
        h = int(math.exp(rng.uniform(0, math.log(30000))))
        s = rng.choice([14, 100, 224, 336])
        m = rng.randint(1, 25)
        p = plan_views(w, h, view_size=s, max_local_views=m)
        assert 1 <= p.rows * p.cols <= m
        assert p.padded == (p.cols * s, p.rows * s)
        long, short = max(w, h), min(w, h)
        c, n_short = (p.cols, p.rows) if w >= h else (p.rows, p.cols)
        long_r, short_r = (p.resized[0], p.resized[1]) if w >= h else (p.resized[1], p.resized[0])
        assert long_r == c * s
        assert (n_short - 1) * s < short_r <= n_short * s
        assert abs(short_r - c * s * short / long) <= 0.5 or short_r == 1
        # c is the HD choice: needed, and maximal under the budget
        assert c <= max(1, math.ceil(long / s))
        nxt = c + 1
        assert c == max(1, math.ceil(long / s)) or nxt * math.ceil(nxt * short / long) > m


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(width=0, height=5), "width"),
        (dict(width=5, height=-1), "height"),
        (dict(width=5, height=5, view_size=0), "view_size"),
        (dict(width=5, height=5, max_local_views=0), "max_local_views"),
        (dict(width=5.0, height=5), "width"),
    ],
)
def test_plan_views_validates(kwargs, name):
    with pytest.raises(ValueError, match=name):
        plan_views(**kwargs)


def test_plan_is_frozen():
    plan = plan_views(10, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rows = 3


# ----------------------------------------------------------------------------- ViewProcessor


@pytest.fixture(scope="module")
def proc():
    return ViewProcessor()


def test_processor_config_kwargs():
    cfg = dict(
        view_size=112,
        max_local_views=4,
        max_image_pixels=10**6,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
    )
    vp = ViewProcessor(**cfg)
    views, plan = vp(smooth_image(300, 200))
    assert views.shape == (plan.n_views, 3, 112, 112) and views.dtype == torch.float32
    assert plan.rows * plan.cols <= 4
    with pytest.raises(ValueError, match="interpolation"):
        ViewProcessor(interpolation="lanczos3")
    with pytest.raises(ValueError, match="std"):
        ViewProcessor(std=(0.1, 0.0, 0.1))


@pytest.mark.parametrize("size", [(1280, 720), (720, 1280), (4000, 300), (1, 1), (5, 3000), (700, 500)])
def test_processor_shapes_and_padding(proc, size):
    views, plan = proc(noise_image(*size))
    assert views.shape == (plan.n_views, 3, 336, 336) and views.dtype == torch.float32
    assert torch.isfinite(views).all()
    grid = views[1:].reshape(plan.rows, plan.cols, 3, 336, 336).permute(2, 0, 3, 1, 4).reshape(3, *plan.padded[::-1])
    x0, y0 = plan.offset
    w, h = plan.resized
    mask = torch.ones(plan.padded[::-1], dtype=torch.bool)
    mask[y0 : y0 + h, x0 : x0 + w] = False
    assert (grid[:, mask] == 0).all()  # padding normalises to exactly 0
    # image region: noise values are never all exactly the mean colour
    assert (grid[:, ~mask] != 0).any()


def test_padded_pixels_exactly_zero_1920x1080(proc):
    views, plan = proc(noise_image(1920, 1080))
    assert plan.offset == (0, 52)
    assert (views[1:4, :, :52] == 0).all() and (views[1:4, :, 52:] != 0).any(dim=(0, 1, 3)).all()
    assert (views[4:7, :, 283:] == 0).all() and (views[4:7, :, 282] != 0).any()
    # global: the image (rows 220..787 of the 1008 square) lands on rows ~73..262 of 336; the rest is pad
    assert (views[0, :, :70] == 0).all() and (views[0, :, 266:] == 0).all()
    assert (views[0, :, 75:260] != 0).any(dim=(0, 2)).all()


def test_local_views_exact_crops_when_no_resize(proc):
    img = noise_image(1008, 1008, seed=3)
    views, plan = proc(img)
    assert (plan.rows, plan.cols, plan.resized) == (3, 3, (1008, 1008))
    a = np.asarray(img)
    crops = np.stack([a[r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336] for r in range(3) for c in range(3)])
    np.testing.assert_allclose(views[1:].numpy(), normalise(crops), rtol=0, atol=2e-6)


def test_single_view_image_exact(proc):
    img = noise_image(336, 336, seed=4)
    views, plan = proc(img)
    assert plan.n_views == 2
    ref = normalise(np.asarray(img))
    np.testing.assert_allclose(views[0].numpy(), ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(views[1].numpy(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("size", [(1920, 1080), (540, 960), (4000, 300), (200, 120)])
def test_matches_pil_reference(proc, size):
    img = smooth_image(*size, seed=sum(size))
    views, plan = proc(img)
    ref_global, ref_locals = pil_reference(img, plan)
    # same kernel (Keys a = -0.5, antialiased) as PIL; differences are uint8 rounding only
    np.testing.assert_allclose(views[1:].numpy(), ref_locals, rtol=0, atol=2.01 * LEVEL)
    np.testing.assert_allclose(views[0].numpy(), ref_global, rtol=0, atol=2.01 * LEVEL)
    assert np.abs(views[1:].numpy() - ref_locals).mean() < 0.1 * LEVEL


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(1920, 1080), (1080, 1920), (4000, 300), (1, 10000), (10000, 3), (1000, 990), (801, 333)])
def test_global_band_equals_full_square_resize(size, interpolation):
    """The band-only global view equals resizing the whole padded square; what it leaves 0 is pure pad."""
    vp = ViewProcessor(interpolation=interpolation)
    img = noise_image(*size, seed=7)
    views, plan = vp(img)
    ref_u8 = torch_square_reference(img, plan, interpolation)
    ours = views[0].numpy()
    zero = (ours == 0).all(axis=0)
    assert (ref_u8[zero] == PAD).all()  # every zeroed pixel is pure padding in the full resize
    np.testing.assert_allclose(ours[:, ~zero], normalise(ref_u8)[:, ~zero], rtol=0, atol=2e-6)


def test_process_batch(proc):
    imgs = [smooth_image(640, 480), smooth_image(300, 900), smooth_image(50, 50)]
    views, plans = proc.process_batch(imgs)
    assert [p.n_views for p in plans] == [v.shape[0] for v in views]
    for img, v, p in zip(imgs, views, plans):
        single, sp = proc(img)
        assert sp == p and torch.equal(single, v)


def test_processor_accepts_paths_and_checks_limit(tmp_path):
    path = tmp_path / "pic.png"
    smooth_image(400, 300).save(path)
    views, plan = ViewProcessor()(path)
    assert views.shape[0] == plan.n_views
    with pytest.raises(ImageError, match="pic.png"):
        ViewProcessor(max_image_pixels=1000)(path)


# ----------------------------------------------------------------------------- load_image: modes


def px(img: Image.Image, x: int = 0, y: int = 0) -> tuple:
    assert img.mode == "RGB"
    return img.getpixel((x, y))


def test_mode_rgb_l_1():
    assert px(load_image(Image.new("RGB", (2, 2), (1, 2, 3)))) == (1, 2, 3)
    assert px(load_image(Image.new("L", (2, 2), 77))) == (77, 77, 77)
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    rgb = load_image(bilevel)
    assert px(rgb, 0) == (0, 0, 0) and px(rgb, 1) == (255, 255, 255)


def test_mode_alpha_over_white():
    rgba = Image.new("RGBA", (3, 1))
    for x, a in enumerate((0, 255, 128)):
        rgba.putpixel((x, 0), (10, 20, 30, a))
    out = load_image(png_bytes(rgba))
    assert px(out, 0) == (255, 255, 255) and px(out, 1) == (10, 20, 30)
    assert px(out, 2) == tuple((v * 128 + 255 * 127 + 127) // 255 for v in (10, 20, 30))
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 0))
    la.putpixel((1, 0), (100, 255))
    out = load_image(la)
    assert px(out, 0) == (255, 255, 255) and px(out, 1) == (100, 100, 100)


def test_mode_palette_with_and_without_transparency():
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * 759)
    pal.putpixel((0, 0), 1)
    pal.putpixel((1, 0), 2)
    out = load_image(png_bytes(pal))
    assert px(out, 0) == (10, 20, 30) and px(out, 1) == (200, 100, 50)
    out = load_image(png_bytes(pal, transparency=1))
    assert px(out, 0) == (255, 255, 255) and px(out, 1) == (200, 100, 50)
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pa.putpixel((0, 0), (1, 255))
    pa.putpixel((1, 0), (1, 0))
    out = load_image(pa)
    assert px(out, 0) == (10, 20, 30) and px(out, 1) == (255, 255, 255)


def test_mode_cmyk():
    for cmyk, rgb in [((255, 0, 0, 0), (0, 255, 255)), ((0, 0, 0, 255), (0, 0, 0)), ((0, 0, 0, 0), (255, 255, 255))]:
        img = Image.new("CMYK", (2, 2), cmyk)
        assert px(load_image(img)) == rgb
        assert px(load_image(jpeg_bytes(img))) == pytest.approx(rgb, abs=2)


def test_mode_16bit_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    expect = [0, 1, 128, 255]
    i16 = Image.fromarray(values)
    assert i16.mode == "I;16"
    for img in (i16, Image.open(io.BytesIO(png_bytes(i16)))):
        out = load_image(img)
        assert [px(out, x)[0] for x in range(4)] == expect
    i16b = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    out = load_image(i16b)
    assert [px(out, x) for x in range(4)] == [(v, v, v) for v in expect]
    out = load_image(Image.fromarray(values.astype(np.int32)))  # mode I holding 16-bit data
    assert [px(out, x)[0] for x in range(4)] == expect


def test_mode_int32():
    eight = load_image(Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32)))
    assert [px(eight, x)[0] for x in range(3)] == [0, 100, 255]
    wide = load_image(Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32)))
    assert [px(wide, x)[0] for x in range(3)] == [0, 128, 255]  # min-max stretch


def test_mode_float():
    unit = load_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert [px(unit, x)[0] for x in range(3)] == [0, 128, 255]
    byte = load_image(Image.fromarray(np.array([[0.0, 100.0, 255.0, 300.0, -5.0]], dtype=np.float32)))
    assert [px(byte, x)[0] for x in range(5)] == [0, 100, 255, 255, 0]


@pytest.mark.parametrize("mode", ["HSV", "YCbCr", "RGBX", "RGBa", "La", "LAB", "I;16L", "I;16N"])
def test_other_modes_give_rgb(mode):
    out = load_image(Image.new(mode, (3, 2)))
    assert out.mode == "RGB" and out.size == (3, 2)


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red
    a[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rot.jpg"
    Image.fromarray(a).save(path, "JPEG", quality=95, exif=exif)
    out = load_image(path)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[34, 10]
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50
    views, plan = ViewProcessor()(path)
    assert (plan.rows, plan.cols) == (1, 1) and plan.resized == (168, 336)


def test_sources_bytes_fileobj_pil(tmp_path):
    img = smooth_image(30, 20)
    data = png_bytes(img)
    expect = np.asarray(img)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    with open(path, "rb") as f:
        from_file = load_image(f)
    for out in (load_image(data), load_image(bytearray(data)), load_image(str(path)), load_image(path), from_file):
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), expect)
    with pytest.raises(TypeError):
        load_image(12345)


# ----------------------------------------------------------------------------- load_image: bad input


def assert_one_line(exc: BaseException, name: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and name in msg, msg


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by an empty IDAT (no pixel data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"this is not an image\nat all")
    with pytest.raises(ImageError, match="not a readable image") as err:
        load_image(path)
    assert_one_line(err.value, "notes.png")
    with pytest.raises(ImageError) as err:
        load_image(b"garbage", name="blob-17")
    assert_one_line(err.value, "blob-17")


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_file(tmp_path, fmt):
    img = noise_image(64, 48)
    data = png_bytes(img) if fmt == "png" else jpeg_bytes(img)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) * 2 // 3])
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageError, match="truncated or corrupt") as err:
        load_image(path)
    assert_one_line(err.value, f"cut.{fmt}")
    assert ImageFile.LOAD_TRUNCATED_IMAGES == before
    with pytest.raises(ImageError, match="truncated or corrupt"):
        ViewProcessor()(path)


def test_pixel_limit_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(2000, 1000))  # no pixel data: decoding would fail as truncated
    with pytest.raises(ImageError, match="exceeds max_pixels") as err:
        load_image(path, max_pixels=1_000_000)
    assert_one_line(err.value, "big.png")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(path, max_pixels=2_000_000)


def test_decompression_bomb_guard(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(30000, 30000))
    with pytest.raises(ImageError) as err:
        load_image(path, max_pixels=10**12)
    assert_one_line(err.value, "bomb.png")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jpg"
    with pytest.raises(FileNotFoundError) as err:
        load_image(path)
    assert_one_line(err.value, "nowhere.jpg")


def test_zero_size_image():
    with pytest.raises(ImageError, match="zero-size") as err:
        load_image(Image.new("RGB", (0, 5)), name="empty.png")
    assert_one_line(err.value, "empty.png")
