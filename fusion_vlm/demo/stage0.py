"""Stage 0 of the CPU demo: small stand-ins for the pretrained parts, made the way the real ones were.

* :func:`train_clip` -- the tiny open_clip CLIP of ``configs/model/tiny.yaml`` trained contrastively
  (``open_clip.loss.ClipLoss``, open_clip's tokenizer) on (view, caption) pairs: global views with the
  description or an answered question, HD local views with the names of the objects in them;
  saved as a safetensors state dict that ``open_clip.load_checkpoint`` (hence ``vision.pretrained``) loads.
* :func:`fusion_vlm.demo.text_llm.train_text_llm` -- the world tokenizer and a tiny ``LlamaForCausalLM``
  trained on TEXT ONLY (questions, each opened by a text context or none; see that module).

Every trainer is deterministic for its seed, shows a tqdm bar, and skips its work when its output already
exists (outputs are completed atomically, so an interrupted run is redone, a finished one is not).
:func:`demo_model_config` turns the outputs into a :class:`~fusion_vlm.config.ModelConfig`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from fusion_vlm.config import ModelConfig, load_model_config
from fusion_vlm.demo.loop import batches, optimise
from fusion_vlm.demo.text_llm import train_text_llm
from fusion_vlm.demo.world import Example, WorldConfig
from fusion_vlm.vision import build_clip
from fusion_vlm.views import ViewPlan, ViewProcessor

# step counts / batch sizes of the two demo sizes (see run_stage0)
PRESETS = {  # clip_crops: object crops per image among the CLIP's pairs (stage0.object_crops)
    "quick": {"clip_steps": 150, "clip_batch": 64, "clip_crops": 4, "llm_steps": 300, "llm_batch": 64},
    "full": {"clip_steps": 300, "clip_batch": 64, "clip_crops": 4, "llm_steps": 600, "llm_batch": 64},
    # the stand-ins shipped with the package (fusion_vlm.demo.standins, `fusion-vlm standins make`): sized to
    # ~30 minutes on a 2-core CPU; "long" is the same recipe for a machine with a few hours
    "ship": {"clip_steps": 3000, "clip_batch": 64, "clip_crops": 4, "llm_steps": 2500, "llm_batch": 64},
    "long": {"clip_steps": 10000, "clip_batch": 64, "clip_crops": 4, "llm_steps": 10000, "llm_batch": 64},
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


def local_view_captions(example: Example, plan: ViewPlan) -> list[str | None]:
    """Per local view of ``plan`` (row-major), the names of the objects whose centre lies in it
    ("red circle, letter k"), or None for a view with none."""
    sx, sy = plan.resized[0] / example.image.width, plan.resized[1] / example.image.height
    (ox, oy), s = plan.offset, plan.view_size
    cells = [[] for _ in range(plan.n_local)]
    for obj in example.objects:
        col, row = int((obj.centre[0] * sx + ox) // s), int((obj.centre[1] * sy + oy) // s)
        cells[min(row, plan.rows - 1) * plan.cols + min(col, plan.cols - 1)].append(obj.name())
    return [", ".join(names) or None for names in cells]


def object_crops(example: Example, pixels: torch.Tensor, plan: ViewPlan, k: int, seed: int) -> list:
    """Up to ``k`` (crop float [3, S, S], name) pairs: view-sized crops of the HD local views' canvas
    (``pixels`` [V, 3, S, S] of ``plan``) centred on seeded objects of ``example``, each captioned with the
    object's name ("red circle", "letter k"); the crops' neighbours differ, the caption names one object."""
    if plan.n_local < 2 or k <= 0:
        return []
    s = plan.view_size
    canvas = pixels[1:].reshape(plan.rows, plan.cols, 3, s, s).permute(2, 0, 3, 1, 4).reshape(
        3, plan.rows * s, plan.cols * s)
    sx, sy = plan.resized[0] / example.image.width, plan.resized[1] / example.image.height
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in torch.randperm(len(example.objects), generator=g)[:k].tolist():
        obj = example.objects[i]
        cx, cy = obj.centre[0] * sx + plan.offset[0], obj.centre[1] * sy + plan.offset[1]
        x0 = int(min(max(cx - s / 2, 0), canvas.shape[2] - s))
        y0 = int(min(max(cy - s / 2, 0), canvas.shape[1] - s))
        out.append((canvas[:, y0:y0 + s, x0:x0 + s].clone(), obj.name()))
    return out


def clip_inputs(examples: list[Example], view_size: int = 112, context_length: int = 64, max_local_views: int = 1,
                hd_rule: str = "no_upsize", crops: int = 0, seed: int = 0):
    """CLIP training pairs: (images float [n, 3, S, S], texts: one long [k_i, C] per image).

    Each example gives its global view with the tokens of its :func:`captions`; with ``max_local_views``
    > 1 also each of its HD local views that holds an object, captioned by :func:`local_view_captions`
    (k_i = 1), and up to ``crops`` :func:`object_crops` captioned with one object's name. In a local view
    a shape spans several patches, where in the global view of a wide image it is about one: the
    stand-in then sees shapes, as a CLIP pretrained at many scales does.
    """
    views = ViewProcessor(view_size=view_size, max_local_views=max_local_views, hd_rule=hd_rule)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    images, texts = [], []
    for i, ex in enumerate(examples):
        pixels, plan = views(ex.image)
        images.append(pixels[0])
        texts.append(tokenizer(captions(ex)))
        if plan.n_local > 1:
            for view, caption in zip(pixels[1:], local_view_captions(ex, plan)):
                if caption is not None:
                    images.append(view)
                    texts.append(tokenizer([caption]))
        for crop, name in object_crops(ex, pixels, plan, crops, seed + i):
            images.append(crop)
            texts.append(tokenizer([name]))
    return torch.stack(images), texts


def train_clip(examples: list[Example], out_path: str | Path, steps: int = 200, batch_size: int = 64,
               lr: float = 1e-3, seed: int = 0, description_prob: float = 0.5, max_local_views: int = 1,
               hd_rule: str = "no_upsize", crops: int = 0, progress: bool = True) -> dict:
    """Train the tiny CLIP on (view, caption) pairs of :func:`clip_inputs`; save its state dict to ``out_path``.

    A caption is the image's description with probability ``description_prob``, else one of its
    questions with its answer (:func:`captions`): a text tower that has read only descriptions maps
    the bare answers "yes", "no", "2", "triangle" to nearly one point (cosine 0.98-1.00, measured), and
    stage 1 contrasts the fused tokens with exactly those answer embeddings.

    Returns {"losses": list of per-step ClipLoss values, "seconds", "skipped": True when ``out_path``
    already existed (then nothing is trained and the stored losses are returned)}.
    """
    out_path = Path(out_path)
    if out_path.is_file():
        stored = json.loads(_sidecar(out_path).read_text()) if _sidecar(out_path).is_file() else {}
        return {"losses": stored.get("losses", []), "seconds": 0.0, "skipped": True}
    start = time.time()
    cfg = clip_config()
    torch.manual_seed(seed)
    model = build_clip(cfg.vision, cfg.views.view_size)
    images, texts = clip_inputs(examples, cfg.views.view_size, cfg.vision.text_context_length, max_local_views,
                                hd_rule, crops, seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.98), eps=1e-6)  # CLIP's betas; with clipping, avoids the ln(B) plateau
    loss_fn = open_clip.loss.ClipLoss()

    gen = torch.Generator().manual_seed(seed + 1)

    def loss_of(idx):
        # each image's caption: its description with probability description_prob, else one of its QA captions
        picks = []
        for i in idx.tolist():
            k = texts[i].shape[0]
            qa = torch.rand((), generator=gen).item() >= description_prob and k > 1
            picks.append(texts[i][1 + int(torch.randint(k - 1, (), generator=gen)) if qa else 0])
        img = model.encode_image(images[idx], normalize=True)
        txt = model.encode_text(torch.stack(picks), normalize=True)
        return loss_fn(img, txt, model.logit_scale.exp())

    def clamp_scale():
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    losses = optimise(model, opt, batches(len(images), batch_size, steps, seed), steps, lr, loss_of,
                       "stage 0: CLIP", progress, after_step=clamp_scale)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    seconds = time.time() - start
    _sidecar(out_path).write_text(json.dumps({"losses": losses, "seconds": seconds}))
    os.replace(tmp, out_path)
    return {"losses": losses, "seconds": seconds, "skipped": False}


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


def run_stage0(examples: list[Example], out_dir: str | Path, size: str = "full", seed: int = 0,
               world: WorldConfig | None = None, progress: bool = True) -> dict:
    """Both stand-ins with the step counts of ``PRESETS[size]``: ``out_dir/clip.safetensors``, ``out_dir/llm/``.

    The CLIP sees the global views and the HD-``world.max_local_views`` local views of ``examples``; the
    LLM reads the questions of fresh text-only scenes of ``world`` (default: the default world of ``seed``),
    one per sequence, each opened by a context drawn from :data:`CONTEXT_MIX`, with the loss on the answers.

    Returns {"clip_path", "llm_dir", "clip": train_clip's dict, "llm": train_text_llm's dict, "seconds"}.
    """
    if size not in PRESETS:
        raise ValueError(f"size={size!r}: expected one of {sorted(PRESETS)}")
    p, out_dir, start = PRESETS[size], Path(out_dir), time.time()
    world = world or WorldConfig(seed=seed)
    clip = train_clip(examples, out_dir / "clip.safetensors", p["clip_steps"], p["clip_batch"], seed=seed,
                      max_local_views=world.max_local_views, hd_rule=world.hd_rule, crops=p.get("clip_crops", 0),
                      progress=progress)
    llm = train_text_llm(examples, out_dir / "llm", p["llm_steps"], p["llm_batch"], seed=seed,
                         context_mix=CONTEXT_MIX, world=world, progress=progress)
    return {"clip_path": out_dir / "clip.safetensors", "llm_dir": out_dir / "llm", "clip": clip, "llm": llm,
            "seconds": time.time() - start}
