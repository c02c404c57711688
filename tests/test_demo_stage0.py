"""Stage 0 of the demo: the tiny CLIP, the world tokenizer and the text-only Llama, at tiny step counts."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from fusion_vlm.demo import stage0, text_llm
from fusion_vlm.demo.world import make_examples
from fusion_vlm.language import LLAMA2_CHAT_TEMPLATE
from fusion_vlm.demo.render import nearest_colour
from fusion_vlm.views import CLIP_MEAN, CLIP_STD, ViewProcessor
from fusion_vlm.vision import build_clip

from conftest import SMALL_LLM


CLIP_STEPS = 60  # the loss has to fall clearly below chance (ln 16) on 16 images


@pytest.fixture(scope="module")
def examples():
    return make_examples("train", 32)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, examples):
    out = tmp_path_factory.mktemp("stage0")
    clip = stage0.train_clip(examples[:16], out / "clip.safetensors", steps=CLIP_STEPS, batch_size=16, lr=2e-3,
                             progress=False)
    llm = text_llm.train_text_llm(examples, out / "llm", steps=25, batch_size=8, lr=3e-3, progress=False, **SMALL_LLM)
    return out, clip, llm


def test_clip_loss_falls_and_checkpoint_loads(outputs):
    out, clip, _ = outputs
    losses = clip["losses"]
    assert len(losses) == CLIP_STEPS and not clip["skipped"]
    assert sum(losses[-5:]) / 5 < min(sum(losses[:5]) / 5, torch.log(torch.tensor(16.0)).item()) - 0.2
    cfg = stage0.clip_config()
    fresh = build_clip(cfg.vision, cfg.views.view_size)
    incompatible = open_clip.load_checkpoint(fresh, str(out / "clip.safetensors"))  # strict
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    saved = load_file(str(out / "clip.safetensors"))
    assert torch.equal(fresh.visual.conv1.weight, saved["visual.conv1.weight"])


def test_clip_captions_are_the_description_then_each_answered_question(examples):
    ex = next(e for e in examples if any(qa.family == "description" for qa in e.qas))
    caps = stage0.captions(ex)
    asked = [qa for qa in ex.qas if qa.family != "description"]
    assert caps[0] == ex.description and len(caps) == 1 + len(asked)
    for cap, qa in zip(caps[1:], asked):
        assert cap == f"{qa.question} {qa.answer}"
    images, texts, _ = stage0.clip_inputs(examples[:3])
    assert images.shape == (3, 3, 112, 112) and [t.shape[0] for t in texts] == [len(stage0.captions(e))
                                                                                 for e in examples[:3]]


def test_local_view_captions_name_the_objects_drawn_in_each_view(examples):
    """Independent of the caption's geometry: the pixel at each shape's centre, read out of the local view
    the caption puts it in, has the shape's colour; and clip_inputs adds one pair per non-empty view."""
    processor = ViewProcessor(view_size=112, max_local_views=4, hd_rule="no_upsize")
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    checked = 0
    for ex in examples[:12]:
        pixels, plan = processor(ex.image)
        caps = stage0.local_view_captions(ex, plan)
        assert len(caps) == plan.n_local and sum(c is not None for c in caps) >= 1
        named = [name for c in caps if c for name in c.split(", ")]
        assert sorted(named) == sorted(o.name() for o in ex.objects)
        sx, sy = plan.resized[0] / ex.image.width, plan.resized[1] / ex.image.height
        for obj in (o for o in ex.objects if o.kind == "shape"):
            x, y = obj.centre[0] * sx + plan.offset[0], obj.centre[1] * sy + plan.offset[1]
            views_with_it = [i for i, c in enumerate(caps) if c and obj.name() in c.split(", ")]
            found = False
            for i in views_with_it:
                r, c = divmod(i, plan.cols)
                px, py = int(x) - c * plan.view_size, int(y) - r * plan.view_size
                if 0 <= px < plan.view_size and 0 <= py < plan.view_size:
                    rgb = ((pixels[1 + i] * std + mean)[:, py, px] * 255).round().int().tolist()
                    found |= nearest_colour(tuple(rgb)) == obj.colour
            assert found, (ex.id, obj)
            checked += 1
    assert checked >= 12
    images, texts, _ = stage0.clip_inputs(examples[:4], max_local_views=4)
    n_local = [sum(c is not None for c in stage0.local_view_captions(e, processor(e.image)[1])) for e in examples[:4]]
    assert images.shape[0] == len(texts) == 4 + sum(n_local)
    assert [t.shape[0] for t in texts].count(1) >= sum(n_local)


def test_object_crops_show_the_named_object_at_their_centre():
    """Each crop's centre pixel (un-normalised) has the named shape's colour, glyph crops are dark at the
    glyph; crops come from the HD canvas at local-view scale; clip_inputs adds them with their names."""
    from fusion_vlm.demo.config import load_demo_config

    world = load_demo_config("quick").world
    exs = make_examples("train", 6, world)
    processor = ViewProcessor(view_size=112, max_local_views=world.max_local_views, hd_rule=world.hd_rule)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    n = 0
    for i, ex in enumerate(exs):
        pixels, plan = processor(ex.image)
        crops = stage0.object_crops(ex, pixels, plan, 3, seed=i)
        again = stage0.object_crops(ex, pixels, plan, 3, seed=i)
        assert len(crops) == min(3, len(ex.objects)) and [c[1] for c in crops] == [c[1] for c in again]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(crops, again))
        names = [o.name() for o in ex.objects]
        for crop, name, (u, v) in crops:
            assert crop.shape == (3, 112, 112) and name in names
            assert 0 <= u < 112 and 0 <= v < 112
            obj = next(o for o in ex.objects if o.name() == name)
            rgb = ((crop * std + mean) * 255).round().int()
            if obj.kind == "shape":  # a shape of that colour, several patches large, lies in the crop
                hits = [nearest_colour(tuple(rgb[:, y, x].tolist())) == obj.colour and rgb[:, y, x].min() < 200
                        for y in range(0, 112, 4) for x in range(0, 112, 4)]
                assert sum(hits) >= 20, (ex.id, name, sum(hits))
            else:
                assert (rgb.amax(0) < 90).sum() >= 20  # dark glyph strokes in the crop
            n += 1
    assert n >= 12
    images, texts, _ = stage0.clip_inputs(exs[:2], max_local_views=4, crops=2, seed=0)
    plain, _, _ = stage0.clip_inputs(exs[:2], max_local_views=4)
    assert images.shape[0] == plain.shape[0] + 4 and all(t.shape[0] == 1 for t in texts[-4:])


def test_clip_regions_sit_on_the_objects_they_name():
    """Independent of the region geometry: the 3x3 patch block of each region (un-normalised pixels) holds
    the named shape's colour or a glyph's dark strokes, in global views, local views and crops alike;
    every shape is named in its global view and every object in some local view."""
    from fusion_vlm.demo.config import load_demo_config

    world = load_demo_config("quick").world
    exs = make_examples("train", 6, world)
    images, texts, regions = stage0.clip_inputs(exs, max_local_views=world.max_local_views, hd_rule=world.hd_rule,
                                                crops=2, seed=0, glyph_crops=2)
    assert len(regions) == images.shape[0] == len(texts)
    n_glyphs = sum(o.kind != "shape" for ex in exs for o in ex.objects)
    plain, _, _ = stage0.clip_inputs(exs, max_local_views=world.max_local_views, hd_rule=world.hd_rule, crops=2,
                                     seed=0)
    assert images.shape[0] == plain.shape[0] + 2 * n_glyphs
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    colours = {o.name(): o.colour for ex in exs for o in ex.objects if o.kind == "shape"}
    checked = 0
    for image, rs in zip(images, regions):
        rgb = ((image * std + mean) * 255).round().int()
        for row, col, name in rs:
            assert 1 <= row <= 6 and 1 <= col <= 6
            block = rgb[:, (row - 1) * 14:(row + 2) * 14, (col - 1) * 14:(col + 2) * 14]
            if name in colours:
                hits = sum(nearest_colour(tuple(block[:, y, x].tolist())) == colours[name] and block[:, y, x].min() < 200
                           for y in range(0, 42, 2) for x in range(0, 42, 2))
                assert hits >= 1, (name, row, col)
            else:
                assert (block.amax(0) < 90).sum() >= 5, (name, row, col)
            checked += 1
    assert sorted(n for *_, n in regions[0]) == sorted(o.name() for o in exs[0].objects if o.kind == "shape")
    assert checked >= sum(len(ex.objects) for ex in exs)  # each shape twice (global, local), glyphs once, crops


def test_region_term_trains_the_patch_tokens_and_is_not_saved(tmp_path, examples):
    """With region_weight > 0 the region term falls, the saved file is still a strict open_clip state dict,
    and the same seed gives the same losses."""
    runs = [stage0.train_clip(examples[:12], tmp_path / f"r{i}.safetensors", steps=40, batch_size=12, lr=2e-3,
                              max_local_views=4, crops=2, region_weight=1.0, progress=False) for i in range(2)]
    region = runs[0]["region_losses"]
    assert len(region) == 40 and runs[0]["losses"] == runs[1]["losses"] and region == runs[1]["region_losses"]
    assert sum(region[-5:]) / 5 < sum(region[:5]) / 5 - 0.3
    cfg = stage0.clip_config()
    fresh = build_clip(cfg.vision, cfg.views.view_size)
    incompatible = open_clip.load_checkpoint(fresh, str(tmp_path / "r0.safetensors"))  # strict: no head keys
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    plain = stage0.train_clip(examples[:12], tmp_path / "p.safetensors", steps=2, batch_size=12, progress=False)
    assert plain["region_losses"] == []


def test_text_llm_loss_falls_and_tokenizer(outputs, examples):
    out, _, llm = outputs
    losses = llm["losses"]
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    tok = text_llm.train_tokenizer(examples, out / "llm")  # already there: loaded, not retrained
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert tok.chat_template == LLAMA2_CHAT_TEMPLATE and len(tok) <= 512
    q = examples[0].qas[0].question
    assert tok.decode(tok(q, add_special_tokens=False)["input_ids"]) == q


def test_rerun_skips_finished_work(outputs, examples):
    out, clip, llm = outputs
    again = stage0.train_clip(examples, out / "clip.safetensors", steps=1000, progress=False)
    assert again["skipped"] and again["losses"] == clip["losses"]
    again = text_llm.train_text_llm(examples, out / "llm", steps=1000, progress=False)
    assert again["skipped"] and again["losses"] == llm["losses"]


def test_deterministic_for_a_seed(tmp_path, examples):
    runs = [stage0.train_clip(examples[:8], tmp_path / f"c{i}.safetensors", steps=2, batch_size=4, seed=s,
                              progress=False)["losses"] for i, s in enumerate((3, 3, 4))]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    toks = [text_llm.train_tokenizer(examples, tmp_path / f"t{i}") for i in range(2)]
    assert (tmp_path / "t0" / "tokenizer.json").read_text() == (tmp_path / "t1" / "tokenizer.json").read_text()
    assert toks[0].get_vocab() == toks[1].get_vocab()
    a, b = (load_file(str(tmp_path / f"c{i}.safetensors")) for i in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    runs = [text_llm.train_text_llm(examples[:8], tmp_path / f"l{i}", steps=2, batch_size=4, seed=s, progress=False,
                                  **SMALL_LLM)["losses"] for i, s in enumerate((3, 3, 4))]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_fusion_vlm_builds_from_stage0_and_generates(outputs, examples):
    from fusion_vlm.model import FusionVLM

    out, _, _ = outputs
    cfg = stage0.demo_model_config(out / "clip.safetensors", out / "llm", n_queries=4)
    assert cfg.llm.tiny is None and cfg.fusion.n_queries == 4 and cfg.vision.text_context_length == 64
    model = FusionVLM(cfg).eval()
    saved = load_file(str(out / "clip.safetensors"))
    assert torch.equal(model.vision.visual.conv1.weight, saved["visual.conv1.weight"])
    assert torch.equal(model.text_encoder.token_embedding.weight, saved["token_embedding.weight"])
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert model.tokenizer.convert_ids_to_tokens(1) == "<s>"
    ex = examples[0]
    answers = model.generate([ex.image], [[qa.question for qa in ex.qas]], max_new_tokens=6)
    assert len(answers) == 1 and len(answers[0]) == len(ex.qas)
    assert all(isinstance(a, str) for a in answers[0])


def test_llm_trained_in_a_parallel_process_is_the_same(tmp_path, examples, monkeypatch):
    """run_stage0(parallel=True) trains the LLM in a spawned process beside the CLIP: same files, same losses."""
    import json

    tiny = {"clip_steps": 2, "clip_batch": 4, "llm_steps": 3, "llm_batch": 2, "llm_pack": True, "llm_text_weight": 1.0,
            "llm_curriculum": ({"steps": 2, "families": ("existence",)},)}
    monkeypatch.setitem(stage0.PRESETS, "tiny-test", tiny)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child (threads=1)
    try:
        runs = [stage0.run_stage0(examples[:8], tmp_path / name, "tiny-test", parallel=parallel, progress=False)
                for name, parallel in (("seq", False), ("par", True))]
    finally:
        torch.set_num_threads(threads)
    assert runs[0]["llm"]["losses"] == runs[1]["llm"]["losses"] and len(runs[0]["llm"]["losses"]) == 3 + 2
    a, b = (load_file(str(tmp_path / name / "llm" / "model.safetensors")) for name in ("seq", "par"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "seq/llm/tokenizer.json").read_text() == (tmp_path / "par/llm/tokenizer.json").read_text()
    stored = json.loads((tmp_path / "par/llm" / text_llm.LOSSES_FILE).read_text())
    assert stored["pack"] is True and stored["text_weight"] == 1.0


def test_curriculum_phases_chain_and_continuing_from_an_export_equals_the_whole(tmp_path, examples):
    """train_llm trains each phase from the previous one on later scenes; the last ends in llm_dir. Its last
    phase, rerun from the float16 export of the phase before (as shipped), gives the same weights."""
    import json

    from fusion_vlm.demo.standins import _export_llm

    kwargs = dict(steps=3, batch_size=2, lr=3e-3, context_mix={"scene": 1.0}, pack=True, text_weight=1.0,
                  progress=False, **SMALL_LLM)
    curriculum = ({"steps": 2, "families": ("existence",)}, {"steps": 2, "lr": 1e-3})
    out = stage0.train_llm(examples[:8], tmp_path / "llm", kwargs, curriculum)
    dirs = stage0.llm_phase_dirs(tmp_path / "llm", curriculum)
    assert [d.name for d in dirs] == ["llm-phase0", "llm-phase1", "llm"]
    assert [len(r["losses"]) for r in out["phases"]] == [3, 2, 2] and len(out["losses"]) == 7
    stored = [json.loads((d / text_llm.LOSSES_FILE).read_text()) for d in dirs]
    assert [s["first_scene"] for s in stored] == [0, 6, 10] and [s["init"] for s in stored] == [False, True, True]
    assert stored[1]["families"] == ["existence"] and stored[2]["lr"] == 1e-3
    assert stored[2]["families"] == list(stored[0]["families"])
    _export_llm(dirs[1], tmp_path / "shipped")
    text_llm.train_text_llm([], tmp_path / "again", **{**kwargs, **curriculum[1]}, init=tmp_path / "shipped",
                            first_scene=10)
    a, b = (load_file(str(d / "model.safetensors")) for d in (dirs[2], tmp_path / "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert stage0.train_llm(examples[:8], tmp_path / "llm", kwargs, curriculum)["skipped"] is True
