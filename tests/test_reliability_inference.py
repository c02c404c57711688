"""Inference and evaluation reliability: one image decoder everywhere, batch errors per line, one-line user errors.

Odd image files (16-bit PNG, float TIFF, RGBA PNG, palette with transparency,
EXIF-rotated JPEG) must reach the model as the same pixels through training
(``SampleDataset``), the evaluation runner / ``fusion-vlm generate`` and the
VLMEvalKit plugin; each is also compared with an 8-bit RGB image computed here
by hand (or by PIL's own ``exif_transpose``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fusion_vlm.cli import main
from fusion_vlm.errors import CheckpointError, ConfigError, ImageError, MissingFileError, UserError

W, H = 36, 24  # small, non-square (the EXIF rotation changes the view grid)


# ----------------------------------------------------------------------------- odd files and their pixels

def _gradient(dtype=np.float64) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return ((x * 7 + y * 13) % 97 / 96.0).astype(dtype)  # [H, W] in [0, 1]


def odd_png16(path):
    values = np.rint(_gradient() * 65535).astype(np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    img.save(path)
    expected = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # 65535 -> 255, by the range
    return np.repeat(expected[..., None], 3, axis=-1)


def odd_float_tiff(path):
    values = _gradient(np.float32)
    Image.fromarray(values).save(path)  # mode F
    expected = np.rint(np.clip(values.astype(np.float64) * 255, 0, 255)).astype(np.uint8)  # [0, 1] data
    return np.repeat(expected[..., None], 3, axis=-1)


def odd_rgba(path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(path)  # mode RGBA
    c, a = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)  # over white


def odd_palette_transparent(path):
    palette = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (0, 0, 0)]
    idx = (np.arange(H)[:, None] + np.arange(W)[None, :]) % 4
    img = Image.frombytes("P", (W, H), idx.astype(np.uint8).tobytes())
    img.putpalette([v for rgb in palette for v in rgb] + [0] * (768 - 12))
    img.save(path, transparency=3)  # index 3 is fully transparent -> white
    table = np.array(palette[:3] + [(255, 255, 255)], dtype=np.uint8)
    return table[idx]


def odd_exif_jpeg(path):
    arr = np.zeros((H, W, 3), np.uint8)
    arr[: H // 2, : W // 3] = (250, 20, 20)  # a red block top left: rotation moves it
    arr[H // 2:, W // 2:] = (20, 20, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(arr).save(path, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as im:  # PIL's own transpose is the reference
        upright = ImageOps.exif_transpose(im).convert("RGB")
    assert upright.size == (H, W)
    return np.asarray(upright)


ODD = {"png16": (odd_png16, "png"), "float_tiff": (odd_float_tiff, "tif"), "rgba": (odd_rgba, "png"),
       "palette_transparent": (odd_palette_transparent, "png"), "exif_jpeg": (odd_exif_jpeg, "jpg")}


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    out = {}
    for name, (make, ext) in ODD.items():
        path = root / f"{name}.{ext}"
        out[name] = (str(path), make(path))
    return out


def _training_pixels(model, path) -> torch.Tensor:
    """The views the training data path builds for ``path`` (SampleDataset -> FusionProcessor.build)."""
    from fusion_vlm.training.batches import SampleDataset

    records = [{"key": 0, "id": "r0", "image": path, "questions": ["What is it?"], "answers": ["A thing."]}]
    sample = SampleDataset(records, model.processor, "generation")[0]
    assert hasattr(sample, "pixel_values"), sample  # not a Skipped marker
    return sample.pixel_values


@pytest.fixture()
def seen_pixels(tiny_model, monkeypatch):
    """Views the model computes while generating (FusionVLM.generate -> processor.pixel_values), in order."""
    seen = []
    real = tiny_model.processor.pixel_values

    def spy(image):
        out = real(image)
        seen.append(out)
        return out

    monkeypatch.setattr(tiny_model.processor, "pixel_values", spy)
    return seen


@pytest.mark.parametrize("name", list(ODD))
def test_training_and_evaluation_see_identical_pixels(name, odd_files, tiny_model, seen_pixels, tmp_path):
    from fusion_vlm.evaluation.runner import GenerationSettings, Runner
    from fusion_vlm.evaluation.vlmeval_model import FusionVLMEvalMixin

    path, expected_rgb = odd_files[name]
    reference = tiny_model.processor.views(Image.fromarray(expected_rgb))[0]  # hand-made 8-bit RGB
    train = _training_pixels(tiny_model, path)
    seen_pixels.clear()
    torch.testing.assert_close(train, reference, rtol=0, atol=0)

    runner = Runner(tmp_path, GenerationSettings(max_new_tokens=1), model=tiny_model)  # generate / eval runner
    runner.answer([path], [["What is it?"]])
    plugin = FusionVLMEvalMixin()  # the VLMEvalKit plugin, fed a VLMEvalKit message
    plugin._setup(tmp_path, max_new_tokens=1, model=tiny_model)
    plugin.generate_batch([[{"type": "image", "value": path}, {"type": "text", "value": "What is it?"}]])
    assert len(seen_pixels) == 2
    for views in seen_pixels:
        assert torch.equal(views, train), name


# ----------------------------------------------------------------------------- bad files: one line each

def _bad_files(root):
    good = Image.new("RGB", (40, 30), (10, 200, 30))
    good.save(root / "good.png")
    data = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    return {"good": root / "good.png", "truncated": root / "truncated.png", "empty": root / "empty.png",
            "text": root / "text.png", "missing": root / "missing.png"}


def test_bad_images_fail_in_one_line_naming_them(tmp_path):
    from fusion_vlm.evaluation.messages import load_image

    files = _bad_files(tmp_path)
    for key in ("truncated", "empty", "text"):
        with pytest.raises(ImageError, match=f"{key}.png") as info:
            load_image(str(files[key]))
        assert "\n" not in str(info.value)
    with pytest.raises(MissingFileError, match="missing.png"):
        load_image(str(files["missing"]))
    assert isinstance(MissingFileError("x"), FileNotFoundError) and issubclass(MissingFileError, UserError)


def test_generate_batch_answers_good_lines_and_flags_bad_ones(checkpoint, tmp_path, capsys):
    files = _bad_files(tmp_path)
    order = ["good", "truncated", "empty", "good", "text", "missing"]
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps({"id": i, "image": str(files[k]), "question": "Colour?"}) + "\n"
                           for i, k in enumerate(order)))
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--checkpoint", str(checkpoint), "--input", str(req), "--output", str(out),
               "--max-new-tokens", "2"])
    assert rc == 3  # documented: some requests failed, the others were answered
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [rec["id"] for rec in lines] == list(range(len(order)))
    for rec, key in zip(lines, order):
        if key == "good":
            assert len(rec["answers"]) == 1 and isinstance(rec["answers"][0], str) and "error" not in rec
        else:
            assert "answers" not in rec and f"{key}.png" in rec["error"] and "\n" not in rec["error"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("fusion-vlm generate: error: image") for line in err)
    # all good: exit 0, lines to stdout
    req.write_text(json.dumps({"image": str(files["good"]), "questions": ["A?", "B?"]}) + "\n")
    assert main(["generate", "--checkpoint", str(checkpoint), "--input", str(req), "--max-new-tokens", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip())["answers"]) == 2


# ----------------------------------------------------------------------------- user errors vs bugs

def _one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_image_is_one_line_exit_2(checkpoint, tmp_path, capsys):
    files = _bad_files(tmp_path)
    for key in ("truncated", "empty", "text"):
        assert main(["generate", "--checkpoint", str(checkpoint), "--image", str(files[key]), "--question", "Q?"]) == 2
        _one_error_line(capsys, f"{key}.png")


def test_bad_config_is_one_line_exit_2(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fusion: {n_queries: many}\n")
    assert main(["info", "--config", str(bad), "--no-params"]) == 2
    _one_error_line(capsys, "fusion.n_queries")
    assert main(["walkthrough", "--config", str(tmp_path / "nowhere.yaml")]) == 2
    _one_error_line(capsys, "nowhere.yaml")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in ("model.safetensors", "llm.safetensors", "llm_reference.json"):
        (ckpt / f).write_bytes((checkpoint / f).read_bytes())
    (ckpt / "config.yaml").write_text((checkpoint / "config.yaml").read_text() + "surprise_key: 1\n")
    assert main(["generate", "--checkpoint", str(ckpt), "--image", str(_bad_files(tmp_path)["good"]),
                 "--question", "Q?"]) == 2
    _one_error_line(capsys, "surprise_key")


def test_bad_checkpoint_is_one_line_exit_2(checkpoint, tmp_path, capsys):
    image = str(_bad_files(tmp_path)["good"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in ("config.yaml", "llm.safetensors", "llm_reference.json"):
        (ckpt / f).write_bytes((checkpoint / f).read_bytes())
    data = (checkpoint / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(["generate", "--checkpoint", str(ckpt), "--image", image, "--question", "Q?"]) == 2
    _one_error_line(capsys, "model.safetensors")
    assert main(["generate", "--checkpoint", str(tmp_path / "no_ckpt"), "--image", image, "--question", "Q?"]) == 2
    _one_error_line(capsys, "no_ckpt")


def test_cli_subprocess_bad_image_one_stderr_line(checkpoint, tmp_path):
    bad = _bad_files(tmp_path)["truncated"]
    proc = subprocess.run([sys.executable, "-m", "fusion_vlm.cli", "generate", "--checkpoint", str(checkpoint),
                           "--image", str(bad), "--question", "Q?"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "truncated.png" in proc.stderr


def test_internal_value_error_keeps_its_traceback(checkpoint, tmp_path, monkeypatch):
    import fusion_vlm.info
    from fusion_vlm.model import FusionVLM

    def broken(*args, **kwargs):
        raise ValueError("internal bug")

    monkeypatch.setattr(fusion_vlm.info, "token_accounting", broken)
    with pytest.raises(ValueError, match="internal bug"):
        main(["info", "--no-params"])
    monkeypatch.setattr(FusionVLM, "generate", broken)
    with pytest.raises(ValueError, match="internal bug"):
        main(["generate", "--checkpoint", str(checkpoint), "--image", str(_bad_files(tmp_path)["good"]),
              "--question", "Q?"])


def test_error_family():
    for cls in (ConfigError, ImageError, CheckpointError, MissingFileError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)
