"""CLIP text context 77 -> 512 as in the authors' code: pretrained position rows kept bit for bit, new rows appended.

A tiny open_clip CLIP is saved at context 77 (safetensors, or a torch file read with weights_only) and loaded
through ``vision.pretrained`` at 512; it is compared with the checkpoint and with open_clip's own forward of the
77-context model.
"""

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion_vlm.config import VisionConfig
from fusion_vlm.vision import build_clip, checkpoint_text_context, set_text_context

CUSTOM = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TEXTS = ["a red circle left of a blue square", "two"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random tiny CLIP at context 77 with a non-trivial position table, saved as safetensors."""
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=CUSTOM["embed_dim"], vision_cfg=CUSTOM["vision_cfg"],
                           text_cfg=CUSTOM["text_cfg"]).eval()
    with torch.no_grad():  # mean 0.05, std 0.3: distinguishable from open_clip's N(0, 0.01) init
        model.positional_embedding.normal_(0.05, 0.3)
    path = tmp_path_factory.mktemp("clip77") / "clip77.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _cfg(path, context=512, **kw):
    return VisionConfig(**{"custom": CUSTOM, "pretrained": str(path), "patch_size": 14, "width": 32,
                           "text_context_length": context, **kw})


def test_pretrained_rows_kept_bit_for_bit_and_new_rows_appended(source):
    _, path = source
    saved = load_file(str(path))
    old = saved["positional_embedding"]
    assert checkpoint_text_context(path) == 77
    torch.manual_seed(123)
    model = build_clip(_cfg(path), image_size=28)
    pos = model.positional_embedding
    assert pos.shape == (512, 32) and model.context_length == 512
    assert torch.equal(pos[:77], old)  # not interpolated: every pretrained row is where it was
    new = pos[77:]
    std, mean = torch.std_mean(old)
    assert abs(new.mean().item() - mean.item()) < 0.02 and abs(new.std().item() / std.item() - 1) < 0.05
    expected_mask = torch.full((512, 512), float("-inf")).triu(1)
    assert torch.equal(model.attn_mask, expected_mask)
    state = model.state_dict()
    for key, value in saved.items():  # every other weight is the checkpoint's
        if key != "positional_embedding":
            assert torch.equal(state[key], value), key


def test_text_output_equals_the_77_context_model(source):
    src, path = source
    model = build_clip(_cfg(path), image_size=28).eval()
    with torch.no_grad():
        ref = src.encode_text(open_clip.tokenizer.SimpleTokenizer(context_length=77)(TEXTS))
        ours = model.encode_text(open_clip.tokenizer.SimpleTokenizer(context_length=512)(TEXTS))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)  # causal: positions after the text do not count


def test_new_rows_follow_the_seed(source):
    _, path = source
    torch.manual_seed(7)
    a = build_clip(_cfg(path), image_size=28).positional_embedding
    torch.manual_seed(7)
    b = build_clip(_cfg(path), image_size=28).positional_embedding
    torch.manual_seed(8)
    c = build_clip(_cfg(path), image_size=28).positional_embedding
    assert torch.equal(a, b) and not torch.equal(a[77:], c[77:]) and torch.equal(a[:77], c[:77])


def test_named_model_and_torch_file_and_already_extended_checkpoint(source, tmp_path):
    """The open_clip-by-name path (``create_model``) with a torch file, and a 512-row checkpoint loaded as is."""
    src, _ = source
    (tmp_path / "FVTinyCtx.json").write_text(json.dumps(CUSTOM))
    open_clip.add_model_config(tmp_path / "FVTinyCtx.json")
    pt = tmp_path / "clip77.pt"
    torch.save(src.state_dict(), pt)
    assert checkpoint_text_context(pt) == 77
    cfg = VisionConfig(model_name="FVTinyCtx", pretrained=str(pt), patch_size=14, width=32, text_context_length=512)
    model = build_clip(cfg, image_size=28)
    assert model.positional_embedding.shape == (512, 32)
    assert torch.equal(model.positional_embedding[:77], src.positional_embedding)
    # a checkpoint that already has 512 rows (e.g. trained by this project) is loaded unchanged
    ext = tmp_path / "clip512.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ext))
    again = build_clip(_cfg(ext), image_size=28)
    assert torch.equal(again.positional_embedding, model.positional_embedding)


def test_set_text_context_shrinks_by_cutting_and_needs_an_open_clip_table(source):
    src, _ = source
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=CUSTOM["vision_cfg"], text_cfg=CUSTOM["text_cfg"])
    model.load_state_dict(src.state_dict())
    set_text_context(model, 20)
    assert torch.equal(model.positional_embedding, src.positional_embedding[:20])
    assert model.attn_mask.shape == (20, 20) and model.context_length == 20
    with pytest.raises(ValueError, match="text position table"):
        set_text_context(torch.nn.Linear(2, 2), 10)
