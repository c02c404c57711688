"""Image decoding: any source / any PIL mode -> an 8-bit RGB ``PIL.Image``.

:func:`load_image` is the single entry point used by :mod:`fusion_vlm.views`.
It accepts a path, raw bytes, a binary file object or a ``PIL.Image.Image``,
forces PIL's lazy decoder to run (so a truncated file fails *here*, not later
inside a worker), applies the EXIF orientation and converts every PIL mode to
plain 8-bit RGB:

==================  ========================================================
mode                conversion
==================  ========================================================
RGB                 unchanged
L, 1, HSV, YCbCr,   PIL's own ``convert("RGB")`` (bilevel 1 -> 0 / 255;
CMYK, RGBX          CMYK uses PIL's multiplicative formula)
LAB                 through littleCMS (CIELAB D50 -> sRGB)
RGBA, LA, PA,       alpha composited over white:
RGBa, La, P + tRNS  ``out = (c * a + 255 * (255 - a)) / 255`` (rounded)
I;16, I;16L/B/N     unsigned 16-bit; scaled by the type range:
                    ``round(v * 255 / 65535)`` (65535 -> 255, 32768 -> 128)
I (32-bit int)      if 0 <= v <= 255 everywhere: taken as 8-bit values;
                    elif 0 <= v <= 65535: 16-bit data (what older PNG decoders
                    produce), scaled like I;16; else: linearly stretched from
                    [min, max] to [0, 255]
F (float)           if max <= 1: values taken in [0, 1] (times 255), else in
                    [0, 255]; then clipped to [0, 255] and rounded, NaN -> 0
==================  ========================================================

Every failure is reported in one line that names the image, as
``ImageError`` (a ``ValueError``) -- or ``MissingFileError`` (an
``ImageError``'s sibling that is also a ``FileNotFoundError``) for a missing
file.  Training, ``fusion-vlm generate``, the evaluation runner and the
VLMEvalKit plugin all decode through :func:`load_image`, so the model sees the
same pixels everywhere.  PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES``
is never modified.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fusion_vlm.errors import ImageError, MissingFileError

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

DEFAULT_MAX_PIXELS = 100_000_000
EXIF_ORIENTATION_TAG = 0x0112
WHITE = 255
# Exceptions PIL's decoders raise for damaged data (besides OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError)
ALPHA_MODES = {"RGBA": None, "LA": "RGBA", "PA": "RGBA", "RGBa": "RGBA", "La": "LA"}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _one_line(text: object) -> str:
    """Collapse any whitespace (newlines included) in ``str(text)`` to single spaces."""
    return " ".join(str(text).split())


def _fail(name: str, what: str, cause: object = None) -> ImageError:
    """Build the one-line ``ImageError`` "image 'NAME': WHAT (CAUSE)"."""
    detail = f" ({_one_line(cause)})" if cause is not None and str(cause) else ""
    return ImageError(_one_line(f"image '{name}': {what}{detail}"))


def _source_name(source: object, name: str | None) -> str:
    """The name used in error messages: ``name`` if given, else the path / file name / a placeholder."""
    if name is not None:
        return str(name)
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(source, "name", "") or "<file object>")


def _open(stream: BinaryIO, name: str) -> Image.Image:
    """``Image.open`` with PIL's errors turned into ``ImageError`` (header only, pixels not decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            return Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise _fail(name, "too many pixels for PIL's decompression-bomb guard", exc) from None
    except UnidentifiedImageError:
        raise _fail(name, "not a readable image (unknown or unsupported format)") from None
    except DECODE_ERRORS as exc:
        raise _fail(name, "truncated or corrupt file", exc) from None


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    """Reject empty images and images above ``max_pixels`` from the header size, before decoding."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise _fail(name, f"zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise _fail(name, f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}")


def _decode(img: Image.Image, name: str) -> None:
    """Force PIL's lazy decoder so truncation / corruption is detected now."""
    try:
        img.load()
    except DECODE_ERRORS as exc:
        raise _fail(name, "truncated or corrupt file", exc) from None


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (2..8) if present; an unreadable EXIF block is ignored."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # damaged EXIF must not make an otherwise fine image unusable
        return img
    if orientation not in range(2, 9):
        return img
    return ImageOps.exif_transpose(img)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite uint8 [H, W, 4] RGBA over white; returns uint8 [H, W, 3]."""
    colour = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    out = (colour * alpha + WHITE * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _sixteen_to_8(values: np.ndarray) -> np.ndarray:
    """Scale unsigned 16-bit values [H, W] to uint8 by the type range (65535 -> 255)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _int32_to_8(values: np.ndarray) -> np.ndarray:
    """Map a mode-"I" array [H, W] to uint8 (8-bit, 16-bit or min-max range, see module doc)."""
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi <= 255:
        return values.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return _sixteen_to_8(values)
    stretched = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(stretched).astype(np.uint8)


def _float_to_8(values: np.ndarray) -> np.ndarray:
    """Map a mode-"F" array [H, W] to uint8: [0, 1] data if max <= 1, else [0, 255]; clipped."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.max() <= 1.0:
        values = values * 255.0
    return np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """uint8 [H, W] -> RGB image."""
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    """CIELAB (PIL "LAB") -> sRGB through littleCMS."""
    from PIL import ImageCms

    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(img, transform)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (rules in the module docstring).

    Returns a ``PIL.Image.Image`` in mode "RGB" of the same size (the input itself if already RGB).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        has_alpha = "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA"
        return Image.fromarray(_over_white(np.asarray(img.convert("RGBA")))) if has_alpha else img.convert("RGB")
    if mode in ALPHA_MODES:
        while ALPHA_MODES.get(img.mode):
            img = img.convert(ALPHA_MODES[img.mode])
        return Image.fromarray(_over_white(np.asarray(img.convert("RGBA"))))
    if mode in SIXTEEN_BIT_MODES:
        return _gray_to_rgb(_sixteen_to_8(np.asarray(img)))
    if mode == "I":
        return _gray_to_rgb(_int32_to_8(np.asarray(img)))
    if mode == "F":
        return _gray_to_rgb(_float_to_8(np.asarray(img)))
    if mode == "LAB":
        return _lab_to_rgb(img)
    return img.convert("RGB")


def _open_source(source: ImageSource, name: str) -> tuple[Image.Image, object]:
    """Open ``source`` lazily; returns (image, object to close afterwards or None)."""
    if isinstance(source, Image.Image):
        return source, None
    if isinstance(source, (str, os.PathLike)):
        try:
            stream = open(source, "rb")
        except FileNotFoundError:
            raise MissingFileError(f"image '{name}': no such file") from None
        except OSError as exc:  # a folder, no permission, ...
            raise _fail(name, "cannot be opened", exc.strerror or exc) from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        return _open(source, name), None  # caller owns the file object
    else:
        raise TypeError(f"load_image: unsupported source type {type(source).__name__} for image '{name}'")
    try:
        return _open(stream, name), stream
    except BaseException:
        stream.close()
        raise


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode ``source`` (path, bytes, binary file object or PIL image) to an upright 8-bit RGB image.

    The pixel count is checked from the header before any pixel is decoded; the
    decode is then forced so truncation is caught here.  ``name`` overrides the
    name used in error messages.  Returns a fully loaded ``PIL.Image.Image`` in
    mode "RGB" (size (W, H) after the EXIF rotation).  Raises ``ImageError``
    (one line, naming the image) or ``MissingFileError`` (a ``FileNotFoundError``).
    """
    label = _source_name(source, name)
    img, stream = _open_source(source, label)
    try:
        _check_size(img, label, max_pixels)
        _decode(img, label)
        img = _exif_upright(img)
        try:
            return to_rgb(img)
        except DECODE_ERRORS as exc:
            raise _fail(label, f"cannot convert mode {img.mode} to RGB", exc) from None
    finally:
        if stream is not None:
            stream.close()
