"""VLMEvalKit message list -> model inputs (pure: PIL only, no VLMEvalKit import).

A VLMEvalKit message is a list of ``{'type': 'image' | 'text', 'value': ...}``
dicts, where an image value is a file path (or, here, also a PIL image) and a
text value is a string. FusionVLM answers questions about one image, so:

* all text parts are joined with newlines, in order, into one question;
* one image is used as is; several images are pasted side by side on one
  canvas (scaled to a common height) when ``multi_image='concat'`` (the
  default), only the first is kept with ``'first'``, and ``'error'`` refuses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from PIL import Image

from fusion_vlm.images import DEFAULT_MAX_PIXELS
from fusion_vlm.images import load_image as decode_image

MULTI_IMAGE_POLICIES = ("concat", "first", "error")


def split_message(message: Iterable[Mapping]) -> tuple[list, str]:
    """Split a message into its image values (paths or PIL images) and its joined text."""
    if isinstance(message, str):  # VLMEvalKit also accepts a bare string
        return [], message
    images, texts = [], []
    for i, part in enumerate(message):
        if not isinstance(part, Mapping) or "type" not in part or "value" not in part:
            raise ValueError(f"message part {i} is not a {{'type', 'value'}} dict: {part!r:.80}")
        kind = part["type"]
        if kind == "image":
            images.append(part["value"])
        elif kind == "text":
            texts.append(str(part["value"]))
        else:
            raise ValueError(f"message part {i} has unsupported type {kind!r} (expected 'image' or 'text')")
    return images, "\n".join(t.strip() for t in texts if t.strip())


def load_image(value, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image given as a path, bytes or PIL image to 8-bit RGB, exactly as training does.

    Goes through :func:`fusion_vlm.images.load_image` (EXIF rotation, alpha over
    white, 16-bit and float scaling); raises ``ImageError`` / ``MissingFileError``
    in one line naming the image.
    """
    return decode_image(value, max_pixels=max_pixels)


def concat_images(images: list[Image.Image], gap: int = 0) -> Image.Image:
    """Paste images left to right on one white canvas, each scaled to the tallest one's height."""
    if not images:
        raise ValueError("concat_images needs at least one image")
    if len(images) == 1:
        return images[0]
    height = max(im.height for im in images)
    scaled = [im if im.height == height else im.resize((max(1, round(im.width * height / im.height)), height))
              for im in images]
    width = sum(im.width for im in scaled) + gap * (len(scaled) - 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def message_to_inputs(message, multi_image: str = "concat") -> tuple[Image.Image, str]:
    """Convert one VLMEvalKit message to ``(image, question)`` for :meth:`FusionVLM.generate`."""
    if multi_image not in MULTI_IMAGE_POLICIES:
        raise ValueError(f"multi_image={multi_image!r}: expected one of {', '.join(MULTI_IMAGE_POLICIES)}")
    refs, text = split_message(message)
    if not refs:
        raise ValueError("message has no image part; FusionVLM needs exactly one image per question")
    if not text:
        raise ValueError("message has no text part")
    if len(refs) > 1:
        if multi_image == "error":
            raise ValueError(f"message has {len(refs)} images; multi_image='error' accepts one")
        if multi_image == "first":
            refs = refs[:1]
    image = concat_images([load_image(r) for r in refs])
    return image, text


def messages_to_batch(messages: list, multi_image: str = "concat") -> tuple[list[Image.Image], list[list[str]]]:
    """Convert several messages to the batched ``(images, questions)`` form of ``FusionVLM.generate``."""
    images, questions = [], []
    for m in messages:
        image, text = message_to_inputs(m, multi_image)
        images.append(image)
        questions.append([text])
    return images, questions
