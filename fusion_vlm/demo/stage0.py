"""Stage 0 of the CPU demo: small stand-ins for the pretrained parts, made the way the real ones were.

* :func:`train_clip` -- the tiny open_clip CLIP of ``configs/model/tiny.yaml`` trained contrastively
  (``open_clip.loss.ClipLoss``, open_clip's tokenizer) on (view, caption) pairs: global views with the
  description or an answered question, HD local views and object crops with the names of the objects
  in them, plus a region-text term on the patch tokens at each named object (:func:`object_places` says
  where an object lies in the views); saved as a safetensors state dict that ``open_clip.load_checkpoint`` (hence ``vision.pretrained``) loads.
* :func:`fusion_vlm.demo.text_llm.train_text_llm` -- the world tokenizer and a tiny ``LlamaForCausalLM``
  trained on TEXT ONLY (questions, each opened by a text context or none; see that module).

Every trainer is deterministic for its seed, shows a tqdm bar, and skips its work when its output already
exists (outputs are completed atomically, so an interrupted run is redone, a finished one is not).
:func:`demo_model_config` turns the outputs into a :class:`~fusion_vlm.config.ModelConfig`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from fusion_vlm.config import ModelConfig, load_model_config
from fusion_vlm.demo.loop import batches, deterministic, optimise
from fusion_vlm.demo.text_llm import train_text_llm, train_tokenizer
from fusion_vlm.demo.world import Example, WorldConfig, WorldObject
from fusion_vlm.vision import build_clip
from fusion_vlm.views import ViewPlan, ViewProcessor

# stage-0 recipes (run_stage0): quick / full for a demo run that retrains the stand-ins, ship / long for
# `fusion-vlm standins make`.
# clip_crops: object crops per image among the CLIP's pairs, clip_glyph_crops: shifted crops per glyph
# (stage0.object_crops); clip_region: weight of the region-text term (train_clip)
CLIP_RECIPE = {"clip_batch": 64, "clip_crops": 4, "clip_glyph_crops": 3, "clip_region": 1.0}
# llm_batch: scenes per step (llm_pack: all of a scene's questions in one sequence), llm_text_weight: weight of the
# next-token loss on all the text (fusion_vlm.demo.text_llm.text_llm_loss), llm_describe: chance that a text
# scene's questions include its description (a copy of the scene; the world's description_prob otherwise)
LLM_RECIPE = {"llm_batch": 8, "llm_lr": 2e-3, "llm_pack": True, "llm_text_weight": 1.0, "llm_describe": 1.0}
# the later phases of the shipped LLM's curriculum (train_llm), each {train_text_llm argument: value} over the
# recipe above: after llm_steps the LLM answers existence by a shortcut (yes when the colour and the shape are
# each frequent in the scene); existence questions alone, read from the scene, make it bind a colour to its
# shape; the mixed recipe again brings the other families back (docs/demo.md, "Why each choice")
LLM_CURRICULUM = ({"steps": 4000, "lr": 1e-3, "families": ("existence", "description"), "context_mix": {"scene": 1.0}},
                  {"steps": 4000, "lr": 5e-4})
PRESETS = {
    "quick": {**CLIP_RECIPE, "clip_steps": 150, "llm_steps": 300, "llm_batch": 64},
    "full": {**CLIP_RECIPE, "clip_steps": 300, "llm_steps": 600, "llm_batch": 64},
    # the stand-ins shipped with the package (fusion_vlm.demo.standins, `fusion-vlm standins make`): sized to
    # about 75 minutes at one thread each on a 2-core CPU (the LLM trains in a process of its own: parallel);
    # "long" is the same recipe for a machine with a few hours. The LLM: scenes packed as multi-turn chats, the
    # next-token loss on their text beside the answers' (fusion_vlm.demo.text_llm.train_text_llm), then the
    # later phases of LLM_CURRICULUM
    "ship": {**CLIP_RECIPE, **LLM_RECIPE, "clip_steps": 5000, "llm_steps": 15000, "llm_curriculum": LLM_CURRICULUM},
    "long": {**CLIP_RECIPE, **LLM_RECIPE, "clip_steps": 10000, "llm_steps": 45000, "llm_curriculum": LLM_CURRICULUM},
}
# contexts opening the stage-0 LLM's questions (fusion_vlm.demo.text_llm): what a question-fused prefix
# would say (the answer), what a caption would say (the scene), or nothing (so that the LLM keeps the answer
# prior for uninformative tokens). Mostly scenes: the scene teaches it to find an object in its context
# (yes/no from a scene) within stage 0's time (docs/demo.md, "Why each choice")
CONTEXT_MIX = {"scene": 0.6, "answer": 0.3, "none": 0.1}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".losses.json")


def clip_config() -> ModelConfig:
    """The tiny preset (its ``vision.custom`` dict and ``text_context_length`` define the CLIP)."""
    return load_model_config("tiny")


def captions(example: Example) -> list[str]:
    """The texts that describe an image: its description first, then each of its questions with the answer
    ("is there a red circle? no"), so that the text tower also learns the answer words."""
    return [example.description] + [f"{qa.question} {qa.answer}" for qa in example.qas
                                     if qa.family != "description"]


@dataclass(frozen=True)
class Place:
    """Where one object's centre lies in an image's views, in view pixels (x right, y down)."""

    obj: WorldObject
    glob: tuple[float, float]  # (u, v) in the global view
    view: int  # the view holding it: 1 + the row-major index of its local view, 0 when there are no local views
    local: tuple[float, float]  # (u, v) in that view


def object_places(example: Example, plan: ViewPlan) -> list[Place]:
    """Each object of ``example``'s :class:`Place` in the views of ``plan`` (the global view is the padded
    canvas scaled down by max(rows, cols); local views tile the canvas)."""
    sx, sy = plan.resized[0] / example.image.width, plan.resized[1] / example.image.height
    (ox, oy), s, c = plan.offset, plan.view_size, max(plan.rows, plan.cols)
    gx, gy = (c * s - plan.resized[0]) // 2, (c * s - plan.resized[1]) // 2
    places = []
    for obj in example.objects:
        x, y = obj.centre[0] * sx, obj.centre[1] * sy
        glob = ((x + gx) / c, (y + gy) / c)
        col, row = min(int((x + ox) // s), plan.cols - 1), min(int((y + oy) // s), plan.rows - 1)
        if plan.n_local > 1:
            places.append(Place(obj, glob, 1 + row * plan.cols + col, (x + ox - col * s, y + oy - row * s)))
        else:
            places.append(Place(obj, glob, 0, glob))
    return places


def block_cell(u: float, v: float, patch: int, grid: int) -> tuple[int, int]:
    """(row, col) of the patch holding view pixel (u, v), clamped to [1, grid - 2] so that the 3x3 block of
    patches around it lies inside the grid x grid token map."""
    return min(max(int(v // patch), 1), grid - 2), min(max(int(u // patch), 1), grid - 2)


def local_view_captions(example: Example, plan: ViewPlan) -> list[str | None]:
    """Per local view of ``plan`` (row-major), the names of the objects whose centre lies in it
    ("red circle, letter k"), or None for a view with none."""
    cells = [[] for _ in range(plan.n_local)]
    for place in object_places(example, plan):
        cells[max(place.view - 1, 0)].append(place.obj.name())
    return [", ".join(names) or None for names in cells]


def _canvas_crop(canvas: torch.Tensor, cx: float, cy: float, s: int):
    """The s x s crop of ``canvas`` (float [3, H, W]) centred on canvas pixel (cx, cy), clamped into it:
    (crop float [3, s, s], (cx, cy) in crop pixels)."""
    x0 = int(min(max(cx - s / 2, 0), canvas.shape[2] - s))
    y0 = int(min(max(cy - s / 2, 0), canvas.shape[1] - s))
    return canvas[:, y0:y0 + s, x0:x0 + s].clone(), (cx - x0, cy - y0)


def object_crops(example: Example, pixels: torch.Tensor, plan: ViewPlan, k: int, seed: int,
                 glyph_repeats: int = 0, jitter: float = 30.0) -> list:
    """(crop float [3, S, S], name, (u, v)) triples: view-sized crops of the HD local views' canvas
    (``pixels`` [V, 3, S, S] of ``plan``), each captioned with the name of the object it is cut around
    ("red circle", "letter k"); (u, v) is that object's centre in crop pixels. First up to ``k`` crops
    centred on seeded objects, then ``glyph_repeats`` crops per glyph shifted by a seeded offset of up to
    +-``jitter`` px each way (a glyph spans about two patches, and where the patch edges fall in it varies).
    Crops are clamped into the canvas; their neighbours differ, the caption names one object."""
    if plan.n_local < 2 or (k <= 0 and glyph_repeats <= 0):
        return []
    s = plan.view_size
    canvas = pixels[1:].reshape(plan.rows, plan.cols, 3, s, s).permute(2, 0, 3, 1, 4).reshape(
        3, plan.rows * s, plan.cols * s)
    places = object_places(example, plan)

    def centre(place):  # canvas pixel = view origin + position in the view
        row, col = divmod(place.view - 1, plan.cols)
        return col * s + place.local[0], row * s + place.local[1]

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in torch.randperm(len(places), generator=g)[:max(k, 0)].tolist():
        crop, uv = _canvas_crop(canvas, *centre(places[i]), s)
        out.append((crop, places[i].obj.name(), uv))
    for place in (p for p in places if p.obj.kind != "shape"):
        for _ in range(glyph_repeats):
            dx, dy = ((torch.rand(2, generator=g) * 2 - 1) * jitter).tolist()
            cx, cy = centre(place)
            crop, (u, v) = _canvas_crop(canvas, cx + dx, cy + dy, s)  # the glyph sits (dx, dy) off the crop's aim
            out.append((crop, place.obj.name(), (u - dx, v - dy)))
    return out


def clip_inputs(examples: list[Example], view_size: int = 112, context_length: int = 64, max_local_views: int = 1,
                hd_rule: str = "no_upsize", crops: int = 0, seed: int = 0, patch: int = 14, glyph_crops: int = 0):
    """CLIP training pairs: (images float [n, 3, S, S], texts: one long [k_i, C] per image, regions).

    Each example gives its global view with the tokens of its :func:`captions`; with ``max_local_views``
    > 1 also each of its HD local views that holds an object, captioned by :func:`local_view_captions`
    (k_i = 1), and up to ``crops`` :func:`object_crops` captioned with one object's name (and
    ``glyph_crops`` shifted crops around each glyph). In a local view
    a shape spans several patches, where in the global view of a wide image it is about one: the
    stand-in then sees shapes, as a CLIP pretrained at many scales does.

    ``regions[i]``: the named objects of image i as (row, col, name), the :func:`block_cell` of ``patch``-px
    patches at the object's centre: every shape in a global view (a glyph is a few pixels there), every
    object whose centre lies in a local view, the named object of a crop (the region-text term of
    :func:`train_clip`).
    """
    views = ViewProcessor(view_size=view_size, max_local_views=max_local_views, hd_rule=hd_rule)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    grid = view_size // patch
    images, texts, regions = [], [], []
    for i, ex in enumerate(examples):
        pixels, plan = views(ex.image)
        places = object_places(ex, plan)
        images.append(pixels[0])
        texts.append(tokenizer(captions(ex)))
        regions.append([(*block_cell(*p.glob, patch, grid), p.obj.name()) for p in places if p.obj.kind == "shape"])
        if plan.n_local > 1:
            for v, (view, caption) in enumerate(zip(pixels[1:], local_view_captions(ex, plan)), start=1):
                if caption is not None:
                    images.append(view)
                    texts.append(tokenizer([caption]))
                    regions.append([(*block_cell(*p.local, patch, grid), p.obj.name()) for p in places if p.view == v])
        for crop, name, (u, v) in object_crops(ex, pixels, plan, crops, seed + i, glyph_crops):
            images.append(crop)
            texts.append(tokenizer([name]))
            regions.append([(*block_cell(u, v, patch, grid), name)])
    return torch.stack(images), texts, regions


def train_clip(examples: list[Example], out_path: str | Path, steps: int = 200, batch_size: int = 64,
               lr: float = 1e-3, seed: int = 0, description_prob: float = 0.5, max_local_views: int = 1,
               hd_rule: str = "no_upsize", crops: int = 0, glyph_crops: int = 0, region_weight: float = 0.0,
               progress: bool = True) -> dict:
    """Train the tiny CLIP on (view, caption) pairs of :func:`clip_inputs`; save its state dict to ``out_path``.

    A caption is the image's description with probability ``description_prob``, else one of its
    questions with its answer (:func:`captions`): a text tower that has read only descriptions maps
    the bare answers "yes", "no", "2", "triangle" to nearly one point (cosine 0.98-1.00, measured), and
    stage 1 contrasts the fused tokens with exactly those answer embeddings.

    With ``region_weight`` > 0 the loss adds ``region_weight`` x a region-text term (as RegionCLIP does):
    each named object's 3x3 block of last-block tokens (``clip_inputs``' regions), flattened and mapped by
    a linear region head to the embedding space, is classified among the text embeddings of the names
    in the batch (cross-entropy at the CLIP's logit scale). ClipLoss alone trains the pooled CLS token;
    the patch tokens, which are what the fusion module reads, then learn little about the shapes and
    glyphs at their place (docs/demo.md). The head is dropped on saving: the file is a plain open_clip
    state dict.

    Returns {"losses": list of per-step losses (ClipLoss + the weighted region term), "region_losses"
    (the region term per step; [] without it), "seconds", "skipped": True when ``out_path`` already existed
    (then nothing is trained and the stored losses are returned)}.
    """
    out_path = Path(out_path)
    if out_path.is_file():
        stored = json.loads(_sidecar(out_path).read_text()) if _sidecar(out_path).is_file() else {}
        return {"losses": stored.get("losses", []), "region_losses": stored.get("region_losses", []),
                "seconds": 0.0, "skipped": True}
    start = time.time()
    cfg = clip_config()
    torch.manual_seed(seed)
    model = build_clip(cfg.vision, cfg.views.view_size)
    patch = cfg.vision.patch_size
    images, texts, regions = clip_inputs(examples, cfg.views.view_size, cfg.vision.text_context_length,
                                         max_local_views, hd_rule, crops, seed, patch, glyph_crops)
    grid = cfg.views.view_size // patch
    head = None
    if region_weight > 0:  # the region term's head and the names it classifies among
        names = sorted({name for rs in regions for *_, name in rs})
        name_tokens = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.vision.text_context_length)(names)
        head = torch.nn.Linear(9 * cfg.vision.width, cfg.vision.custom["embed_dim"])
    trained = torch.nn.ModuleDict({"clip": model, **({"region_head": head} if head is not None else {})})
    decay = [p for p in trained.parameters() if p.ndim >= 2]
    rest = [p for p in trained.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.98), eps=1e-6)  # CLIP's betas; with clipping, avoids the ln(B) plateau
    loss_fn = open_clip.loss.ClipLoss()
    visual, last = model.visual, len(model.visual.transformer.resblocks) - 1
    region_losses = []
    gen = torch.Generator().manual_seed(seed + 1)

    def region_loss(tokens, idx):
        # tokens [B, g, g, W]: each named object's flattened 3x3 block -> head -> classified among the batch's names
        blocks, labels = [], []
        for b, i in enumerate(idx.tolist()):
            for row, col, name in regions[i]:
                blocks.append(tokens[b, row - 1:row + 2, col - 1:col + 2].reshape(-1))
                labels.append(name)
        if not blocks:
            return tokens.sum() * 0.0
        present = sorted(set(labels))
        text = model.encode_text(name_tokens[[names.index(n) for n in present]], normalize=True)
        region = torch.nn.functional.normalize(head(torch.stack(blocks)), dim=-1)
        target = torch.tensor([present.index(n) for n in labels])
        return torch.nn.functional.cross_entropy(model.logit_scale.exp() * region @ text.t(), target)

    def loss_of(idx):
        # each image's caption: its description with probability description_prob, else one of its QA captions
        picks = []
        for i in idx.tolist():
            k = texts[i].shape[0]
            qa = torch.rand((), generator=gen).item() >= description_prob and k > 1
            picks.append(texts[i][1 + int(torch.randint(k - 1, (), generator=gen)) if qa else 0])
        if head is None:
            img = model.encode_image(images[idx], normalize=True)
        else:  # one pass gives the pooled embedding and the last block's (final-norm) patch tokens
            out = visual.forward_intermediates(images[idx], indices=[last], normalize_intermediates=True,
                                               output_fmt="NLC")
            img = torch.nn.functional.normalize(out["image_features"], dim=-1)
            tokens = out["image_intermediates"][0].reshape(len(idx), grid, grid, -1)
        txt = model.encode_text(torch.stack(picks), normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        if head is not None:
            extra = region_loss(tokens, idx)
            region_losses.append(extra.item())
            loss = loss + region_weight * extra
        return loss

    def clamp_scale():
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    losses = optimise(trained, opt, batches(len(images), batch_size, steps, seed), steps, lr, loss_of,
                      "stage 0: CLIP", progress, after_step=clamp_scale)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    seconds = time.time() - start
    _sidecar(out_path).write_text(json.dumps({"losses": losses, "region_losses": region_losses, "seconds": seconds}))
    os.replace(tmp, out_path)
    return {"losses": losses, "region_losses": region_losses, "seconds": seconds, "skipped": False}


def demo_model_config(clip_path: str | Path, llm_dir: str | Path, n_queries: int = 8,
                      overrides: list[str] | None = None) -> ModelConfig:
    """The tiny preset with ``vision.pretrained=clip_path``, ``llm.path=llm_dir``, ``llm.tiny=None``, N=n_queries.

    ``overrides`` (``section.field=value``) are applied after; the result is validated.
    """
    cfg = load_model_config("tiny", overrides)
    cfg.vision.pretrained = str(clip_path)
    cfg.llm.path = str(llm_dir)
    cfg.llm.tiny = None
    cfg.llm.dtype = "float32"
    cfg.fusion.n_queries = n_queries
    cfg.validate()
    return cfg


def _llm_kwargs(p: dict) -> dict:
    """train_text_llm's recipe arguments from a PRESETS entry (``llm_*`` keys; absent ones keep its defaults)."""
    names = {"llm_steps": "steps", "llm_batch": "batch_size", "llm_lr": "lr", "llm_pack": "pack",
             "llm_text_weight": "text_weight", "llm_describe": "describe"}
    return {arg: p[key] for key, arg in names.items() if key in p}


def llm_phase_dirs(llm_dir: str | Path, curriculum=()) -> list[Path]:
    """Where :func:`train_llm` trains each phase: ``llm_dir`` for the last, ``<llm_dir>-phase<k>`` before it."""
    llm_dir = Path(llm_dir)
    return [llm_dir.with_name(f"{llm_dir.name}-phase{k}") for k in range(len(curriculum))] + [llm_dir]


def train_llm(examples: list[Example], llm_dir: str | Path, kwargs: dict, curriculum=()) -> dict:
    """``train_text_llm(examples, ..., **kwargs)``, then each phase of ``curriculum`` (a sequence of
    {train_text_llm argument: value}, applied over ``kwargs``) from the previous phase's model and on the
    scenes after those it read (``init``, ``first_scene``); the last phase's model ends in ``llm_dir``
    (:func:`llm_phase_dirs`). Each phase resumes like train_text_llm (a finished phase is read back).

    Returns train_text_llm's dict over the whole curriculum ("losses": every phase's, in order; "seconds":
    their sum; "skipped": every phase was) plus "phases": each phase's own dict.
    """
    dirs, phases, first, init = llm_phase_dirs(llm_dir, curriculum), [], 0, None
    for k, (d, phase) in enumerate(zip(dirs, [{}, *curriculum])):
        args = {**kwargs, **phase}
        if k:
            args.update(init=init, first_scene=first)
        phases.append(train_text_llm(examples, d, **args))
        batch = args.get("batch_size", inspect.signature(train_text_llm).parameters["batch_size"].default)
        first, init = first + len(phases[-1]["losses"]) * batch, d  # one loss per step
    return {"losses": [x for r in phases for x in r["losses"]], "seconds": sum(r["seconds"] for r in phases),
            "skipped": all(r["skipped"] for r in phases), "phases": phases}


def _train_llm_child(threads: int, args: tuple, kwargs: dict) -> None:
    """Entry point of the spawned LLM process of :func:`run_stage0` (``parallel``)."""
    deterministic(threads)
    train_llm(*args, **kwargs)


def run_stage0(examples: list[Example], out_dir: str | Path, size: str = "full", seed: int = 0,
               world: WorldConfig | None = None, progress: bool = True, parallel: bool = False,
               threads: int = 1) -> dict:
    """Both stand-ins with the recipe of ``PRESETS[size]``: ``out_dir/clip.safetensors``, ``out_dir/llm/``.

    The CLIP sees the global views and the HD-``world.max_local_views`` local views of ``examples``; the
    LLM reads fresh text-only scenes of ``world`` (default: the default world of ``seed``), each sequence
    opened by a context drawn from :data:`CONTEXT_MIX`, then through the phases of the preset's
    ``llm_curriculum`` (:func:`train_llm`). With ``parallel`` the LLM trains in a spawned
    process (``threads`` torch threads, :func:`fusion_vlm.demo.loop.deterministic`) while this one
    trains the CLIP, so the two take the longer of their times; the files do not depend on it.

    Returns {"clip_path", "llm_dir", "clip": train_clip's dict, "llm": train_llm's dict, "seconds"}.
    """
    import multiprocessing

    if size not in PRESETS:
        raise ValueError(f"size={size!r}: expected one of {sorted(PRESETS)}")
    p, out_dir, start = PRESETS[size], Path(out_dir), time.time()
    world = world or WorldConfig(seed=seed)
    llm_kwargs = {**_llm_kwargs(p), "seed": seed, "context_mix": CONTEXT_MIX, "world": world}
    curriculum = p.get("llm_curriculum", ())
    child = None
    if parallel:  # the tokenizer first, here, so that the child need not be sent the images
        train_tokenizer(examples, llm_phase_dirs(out_dir / "llm", curriculum)[0])
        child = multiprocessing.get_context("spawn").Process(
            target=_train_llm_child,
            args=(threads, ([], out_dir / "llm", {**llm_kwargs, "progress": False}, curriculum), {}))
        child.start()
    try:
        clip = train_clip(examples, out_dir / "clip.safetensors", p["clip_steps"], p["clip_batch"], seed=seed,
                          max_local_views=world.max_local_views, hd_rule=world.hd_rule,
                          crops=p.get("clip_crops", 0), glyph_crops=p.get("clip_glyph_crops", 0),
                          region_weight=p.get("clip_region", 0.0), progress=progress)
    finally:
        if child is not None:
            child.join()
    if child is not None and child.exitcode != 0:
        raise RuntimeError(f"stage 0: the LLM's training process failed (exit code {child.exitcode}); "
                           f"its traceback is above")
    llm = train_llm(examples, out_dir / "llm", {**llm_kwargs, "progress": progress}, curriculum)  # parallel: read back
    return {"clip_path": out_dir / "clip.safetensors", "llm_dir": out_dir / "llm", "clip": clip, "llm": llm,
            "seconds": time.time() - start}
