"""The shipped demo stand-ins (fusion_vlm.demo.standins): the linear probe, the probe geometry, the shipped files."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusion_vlm.cli import main
from fusion_vlm.demo import stage0, standins
from fusion_vlm.demo.pipeline import demo_world
from fusion_vlm.demo.render import nearest_colour
from fusion_vlm.demo.world import make_examples
from fusion_vlm.views import CLIP_MEAN, CLIP_STD, ViewProcessor

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = standins.shipped_standins()
# the shipped files are made by `fusion-vlm standins make --out fusion_vlm/demo/standins`; until then their tests skip
needs_shipped = pytest.mark.skipif(not SHIPPED["card"].is_file(), reason="no shipped stand-ins: run `fusion-vlm "
                                   "standins make --out fusion_vlm/demo/standins`")


# ------------------------------------------------------------------ the probe
def test_linear_probe_on_hand_checkable_cases():
    """1-D: a threshold between the classes reads every test point (100 %), flipped test labels 0 %; XOR on
    the square's corners: by symmetry the best linear fit is W = 0, b = 0, every logit equal, argmax class 0:
    exactly half right. A probe that is not linear would beat 50 % there."""
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    y = torch.tensor([0, 0, 1, 1])
    xt = torch.tensor([[-3.0], [0.5], [3.0]])
    assert standins.fit_linear_probe(x, y, xt, torch.tensor([0, 1, 1])) == 100.0
    assert standins.fit_linear_probe(x, y, xt, torch.tensor([1, 0, 0])) == 0.0
    corners = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    xor = torch.tensor([0, 1, 1, 0])
    assert standins.fit_linear_probe(corners, xor, corners, xor) == 50.0
    with pytest.raises(ValueError, match="probe features"):
        standins.fit_linear_probe(x, y, torch.zeros(3, 2), y[:3])


class PixelTower(torch.nn.Module):
    """A stand-in for VisionTower with 1-px patches: each token is its pixel (un-normalised RGB) and the
    index of its view, so a probe block's centre shows where the probe looked."""

    patch_size = 1

    def forward(self, pixels):  # [V, 3, S, S] -> [V, S, S, 4]
        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        rgb = (pixels * std + mean) * 255
        view = torch.arange(pixels.shape[0], dtype=rgb.dtype)[:, None, None, None].expand(-1, 1, *pixels.shape[2:])
        return torch.cat([rgb, view], 1).permute(0, 2, 3, 1)


def test_probe_reads_each_shape_in_the_global_view_and_each_glyph_in_its_local_view():
    """Independent of the probe's geometry: the global-view pixel at each shape's block centre has the shape's
    colour; each glyph's block comes from the local view that stage 0's captions (themselves checked
    against the pixels in test_demo_stage0) name it in."""
    world = demo_world(0)
    examples = make_examples("train", 10, world)
    views = ViewProcessor(view_size=112, max_local_views=world.max_local_views, hd_rule=world.hd_rule)
    feats = standins.vision_features(PixelTower(), examples, views)
    shapes = [o for ex in examples for o in ex.objects if o.kind == "shape"]
    assert feats["colour"][1] == [o.colour for o in shapes] and feats["shape"][1] == [o.shape for o in shapes]
    for block, obj in zip(feats["colour"][0], shapes):
        centre = block.reshape(9, 4)[4]
        assert centre[3] == 0 and nearest_colour(tuple(int(v) for v in centre[:3].round())) == obj.colour
    # each glyph's and each shape's local block comes from a local view whose caption names the object
    # (names can repeat in an image, so: the view's caption holds it, not the first caption that does)
    glyphs = [(ex, o) for ex in examples for o in ex.objects if o.kind != "shape"]
    assert feats["glyph"][1] == [o.char for _, o in glyphs]
    assert feats["shape_local"][1] == [o.shape for o in shapes]
    for task, items in (("glyph", glyphs), ("shape_local", [(ex, o) for ex in examples for o in ex.objects
                                                            if o.kind == "shape"])):
        for block, (ex, obj) in zip(feats[task][0], items):
            caps = stage0.local_view_captions(ex, views(ex.image)[1])
            view = int(block.reshape(9, 4)[4, 3])
            assert view >= 1 and obj.name() in caps[view - 1].split(", "), (task, obj, view, caps)
    for block, obj in zip(feats["shape_local"][0], shapes):
        assert nearest_colour(tuple(int(v) for v in block.reshape(9, 4)[4, :3].round())) == obj.colour


# ------------------------------------------------------------------ the shipped files
@needs_shipped
def test_shipped_files_match_their_model_card():
    sums = standins.card_checksums(SHIPPED["card"])
    expected = {"clip.safetensors", "probe.json"} | {f"llm/{n}" for n in standins.LLM_FILES}
    assert set(sums) == expected
    for rel, digest in sums.items():
        assert standins.sha256(SHIPPED["dir"] / rel) == digest, rel


@needs_shipped
def test_shipped_files_are_package_data():
    """Every shipped file matches a package-data glob of pyproject.toml (what the wheel carries)."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fusion_vlm"]
    pkg = ROOT / "fusion_vlm"
    files = [p for p in SHIPPED["dir"].rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) == 3 + len(standins.LLM_FILES)  # clip, probe.json, MODEL_CARD.md, llm/*
    for path in files:
        rel = str(path.relative_to(pkg))
        assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), rel


@needs_shipped
def test_shipped_standins_load_through_the_model_config():
    """The demo's loading path (demo_model_config -> FusionVLM: vision.pretrained through open_clip, the LLM
    through from_pretrained at float32) gives exactly the stored float16 weights, upcast."""
    from fusion_vlm.model import FusionVLM

    cfg = stage0.demo_model_config(SHIPPED["clip"], SHIPPED["llm"], n_queries=4)
    model = FusionVLM(cfg)
    clip = load_file(str(SHIPPED["clip"]))
    assert clip["visual.conv1.weight"].dtype == torch.float16
    assert torch.equal(model.vision.visual.conv1.weight, clip["visual.conv1.weight"].float())
    llm = load_file(str(SHIPPED["llm"] / "model.safetensors"))
    emb = model.llm.get_input_embeddings().weight
    assert emb.dtype == torch.float32 and torch.equal(emb, llm["model.embed_tokens.weight"].float())


@needs_shipped
def test_unused_clip_token_rows_are_zero_and_used_ones_are_not():
    from open_clip.tokenizer import SimpleTokenizer

    table = load_file(str(SHIPPED["clip"]))["token_embedding.weight"]
    first = make_examples("train", 1, demo_world(0))[0]  # one of the images the stand-in CLIP trained on
    ids = SimpleTokenizer(context_length=64)(stage0.captions(first)).unique()
    assert all(table[i].abs().sum() > 0 for i in ids.tolist())  # including start / end / padding 0
    assert (table.abs().sum(1) > 0).sum() < 500  # the world's captions use a few hundred BPE tokens of 49,408


def test_probe_command_names_a_missing_folder(tmp_path, capsys):
    assert main(["standins", "probe", "--dir", str(tmp_path)]) == 2
    assert "--dir" in capsys.readouterr().err


def test_export_clip_stores_float16_and_zeroes_only_the_unused_token_rows(tmp_path):
    from safetensors.torch import save_file

    table, other = torch.randn(6, 4), torch.randn(3)
    save_file({"token_embedding.weight": table, "logit_scale": other, "steps": torch.tensor([7])},
              str(tmp_path / "a.safetensors"))
    standins._export_clip(tmp_path / "a.safetensors", tmp_path / "b.safetensors", torch.tensor([1, 4]))
    out = load_file(str(tmp_path / "b.safetensors"))
    assert out["token_embedding.weight"].dtype == torch.float16 and out["steps"].dtype == torch.int64
    assert torch.equal(out["token_embedding.weight"][[1, 4]], table[[1, 4]].half())
    assert not out["token_embedding.weight"][[0, 2, 3, 5]].any()
    assert torch.equal(out["logit_scale"], other.half())


def test_model_card_states_each_curriculum_phase_and_its_final_loss():
    curriculum = ({"steps": 4, "lr": 1e-3, "families": ("existence", "description"), "context_mix": {"scene": 1.0}},
                  {"steps": 2})
    lines = standins._curriculum_lines(curriculum, [[9.0] * 150 + [1.0] * 100, [5.0, 3.0, 1.0, 2.0], [0.5, 0.25]], 2e-3)
    assert lines[1] == "(1) 4 steps, lr 0.001, questions of the families existence, description only, contexts scene 100%;"
    assert lines[2] == "(2) 2 steps, lr 0.002, questions of every family, contexts as above."
    assert lines[3] == "Mean loss of the last 100 steps of each phase 1.000 / 2.750 / 0.375."
    assert standins._curriculum_lines((), [[2.0, 4.0]], 2e-3) == ["Mean loss of the last 100 steps 3.000."]
