"""The stand-in CLIP and text-only LLM shipped with the package, how they are made and how good they are.

The paper starts from downloaded CLIP and Llama-2 weights; the CPU demo starts from small stand-ins
trained the same way (:mod:`fusion_vlm.demo.stage0`) on the demo's world. They ship inside the package
(:func:`shipped_standins`) so that a demo run need not train them:

* ``clip.safetensors``: the tiny open_clip CLIP (``configs/model/tiny.yaml``), an open_clip state dict
  that ``open_clip.load_checkpoint`` (hence ``vision.pretrained``) loads; stored in float16 (loading
  upcasts into the float32 model), token-embedding rows of BPE tokens that never occur in its
  training captions set to 0 (they received no gradient: only their random init, decayed);
* ``llm/``: the text-only Llama and its world BPE tokenizer (``save_pretrained``), float16;
* ``probe.json`` and ``MODEL_CARD.md``: the probe figures (:func:`probe_standins`), how they were made,
  file sizes and sha256.

:func:`make_standins` (``fusion-vlm standins make``) makes them from scratch, deterministically for a
seed, a torch version and a thread count (see the card).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from fusion_vlm.demo.loop import deterministic

STANDINS_DIR = Path(__file__).with_name("standins")  # the shipped files
CLIP_FILE = "clip.safetensors"
LLM_DIR = "llm"
CARD = "MODEL_CARD.md"
PROBE = "probe.json"
LLM_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja")
N_TRAIN = 2000  # train-split images the CLIP trains on (the demo's train split) and the probes fit on
N_TEST = 400  # test-split images the vision probes are scored on
N_LLM_TEST = 48  # test-split images whose questions the LLM probe asks
LLM_KINDS = ("scene", "answer")  # contexts the LLM probe reads (text_llm.CONTEXTS)
TARGETS = {"colour": 95.0, "shape": 95.0, "shape_local": 95.0, "glyph": 90.0,
           "llm_scene": 95.0}  # levels the stand-ins aim at
VISION_PROBES = {"colour": "shape colour (global view)", "shape": "shape kind (global view)",
                 "shape_local": "shape kind (local view)", "glyph": "glyph character (local view)"}


def shipped_world(seed: int = 0):
    """The world the shipped stand-ins are made for: ``configs/demo/full.yaml``'s world with ``seed``."""
    from dataclasses import replace

    from fusion_vlm.demo.config import load_demo_config

    return replace(load_demo_config("full").world, seed=seed)


def shipped_standins() -> dict[str, Path]:
    """Paths of the shipped stand-ins: {"clip": clip.safetensors, "llm": llm/, "card": MODEL_CARD.md,
    "probe": probe.json, "dir": the folder}."""
    d = STANDINS_DIR
    return {"clip": d / CLIP_FILE, "llm": d / LLM_DIR, "card": d / CARD, "probe": d / PROBE, "dir": d}


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- probes
def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                     weight_decay: float = 1e-3, iters: int = 300) -> float:
    """Test accuracy (%) of a multinomial logistic regression fitted on (x_train float [n, D], y_train long
    [n]) and applied to (x_test float [m, D], y_test long [m]).

    Features are standardised with the train mean / std; the fit is full-batch L-BFGS on cross-entropy +
    ``weight_decay`` * ||W||^2 (deterministic). Labels are class indices 0..K-1, K = max label + 1.
    """
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"probe features: expected [n, D] and [m, D], got {tuple(x_train.shape)} and "
                         f"{tuple(x_test.shape)}")
    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xs, xt = (x_train - mean) / std, (x_test - mean) / std
    k = int(max(y_train.max(), y_test.max())) + 1
    w = torch.zeros(xs.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w + b, y_train) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * ((xt @ w + b).argmax(1) == y_test).double().mean().item()


def _block(tokens: torch.Tensor, u: float, v: float, patch: int) -> torch.Tensor:
    """The 3x3 block of tokens (float [g, g, W]) around the patch holding view pixel (u, v), clamped into
    the grid (:func:`~fusion_vlm.demo.stage0.block_cell`), flattened: float [9 W]."""
    from fusion_vlm.demo.stage0 import block_cell

    row, col = block_cell(u, v, patch, tokens.shape[0])
    return tokens[row - 1:row + 2, col - 1:col + 2].reshape(-1)


@torch.no_grad()
def vision_features(tower, examples, views) -> dict[str, tuple[list[torch.Tensor], list[str]]]:
    """Probe features of ``examples`` from the frozen ``tower`` (a :class:`~fusion_vlm.vision.VisionTower`,
    [V, 3, S, S] -> [V, g, g, W]) on the views of ``views`` (a ViewProcessor): for each shape, the
    :func:`_block` of global-view tokens at its centre with its colour and its shape, and the block of the
    local view holding its centre with its shape (``shape_local``); for each glyph, the block of the local
    view holding its centre with its character (places: :func:`~fusion_vlm.demo.stage0.object_places`).
    Returns {"colour" | "shape" | "shape_local" | "glyph": (features, each float [9 W]; labels)}."""
    from fusion_vlm.demo.stage0 import object_places

    out = {"colour": ([], []), "shape": ([], []), "shape_local": ([], []), "glyph": ([], [])}
    for ex in examples:
        pixels, plan = views(ex.image)
        tokens = tower(pixels)  # [V, g, g, W]
        patch = tower.patch_size
        for place in object_places(ex, plan):
            obj = place.obj
            local = _block(tokens[place.view], *place.local, patch)  # the block in the view holding the centre
            if obj.kind == "shape":
                feat = _block(tokens[0], *place.glob, patch)
                for task, f, label in (("colour", feat, obj.colour), ("shape", feat, obj.shape),
                                       ("shape_local", local, obj.shape)):
                    out[task][0].append(f)
                    out[task][1].append(label)
            else:
                out["glyph"][0].append(local)
                out["glyph"][1].append(obj.char)
    return out


def vision_probe(clip_path: str | Path | None, train, test, world) -> dict[str, float]:
    """Linear-probe test accuracy (%) {"colour", "shape", "shape_local", "glyph"} (:data:`VISION_PROBES`) of
    the frozen vision tower of the CLIP in ``clip_path`` (None: a random-initialised one, seed 0), loaded as
    the model loads it (``vision.pretrained``), on the views of ``world``; fitted on ``train``, scored on
    ``test`` examples."""
    from fusion_vlm.demo.stage0 import clip_config
    from fusion_vlm.views import ViewProcessor
    from fusion_vlm.vision import VisionTower, build_clip

    cfg = clip_config()
    cfg.vision.pretrained = str(clip_path) if clip_path else None
    torch.manual_seed(0)
    clip = build_clip(cfg.vision, cfg.views.view_size).eval()
    tower = VisionTower(clip.visual, cfg.vision, cfg.vision.width).eval()
    views = ViewProcessor(view_size=cfg.views.view_size, max_local_views=world.max_local_views, hd_rule=world.hd_rule)
    ftr, fte = vision_features(tower, train, views), vision_features(tower, test, views)
    result = {}
    for task in ftr:
        classes = sorted(set(ftr[task][1]) | set(fte[task][1]))
        ytr = torch.tensor([classes.index(c) for c in ftr[task][1]])
        yte = torch.tensor([classes.index(c) for c in fte[task][1]])
        result[task] = fit_linear_probe(torch.stack(ftr[task][0]), ytr, torch.stack(fte[task][0]), yte)
        result[f"{task}_n_train"], result[f"{task}_n_test"] = len(ytr), len(yte)
    return result


def probe_standins(standin_dir: str | Path | None = None, world=None, seed: int = 0, n_train: int = N_TRAIN,
                   n_test: int = N_TEST, n_llm_test: int = N_LLM_TEST, baseline: bool = True, train=None) -> dict:
    """The stand-ins' quality figures (all %, on test-split images of ``world``, default the demo world):

    * ``vision``: linear probes on the frozen vision tower's tokens (:func:`vision_probe`): each shape's
      colour and shape from the global view, each glyph's character from the local view holding it;
      fitted on ``n_train`` train-split images, scored on ``n_test`` test-split images;
      ``vision_random``: the same probes on a random-initialised tower (with ``baseline``);
    * ``llm``: the text LLM's greedy accuracy per family when each question of ``n_llm_test`` test
      images is opened by a text context (:func:`fusion_vlm.demo.text_llm.context_accuracy`), per kind
      of :data:`LLM_KINDS`.

    ``train``: the first ``n_train`` train examples of ``world`` when the caller has them (else made here).
    """
    from fusion_vlm.demo.text_llm import context_accuracy
    from fusion_vlm.demo.world import make_examples

    d = Path(standin_dir) if standin_dir else STANDINS_DIR
    clip, llm = d / CLIP_FILE, d / LLM_DIR
    for path in (clip, llm / "model.safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"stand-in {path}: not found (make them with `fusion-vlm standins make`)")
    world = world or shipped_world(seed)
    train = train[:n_train] if train is not None else make_examples("train", n_train, world)
    test = make_examples("test", max(n_test, n_llm_test), world)
    out = {"world_seed": world.seed, "n_train_images": n_train, "n_test_images": n_test,
           "n_llm_test_images": n_llm_test, "targets": TARGETS,
           "vision": vision_probe(clip, train, test[:n_test], world)}
    if baseline:
        out["vision_random"] = vision_probe(None, train, test[:n_test], world)
    out["llm"] = context_accuracy(llm, test[:n_llm_test], kinds=LLM_KINDS, max_new_tokens=96)
    return out


# ------------------------------------------------------------------------------------------- making
def _used_token_ids(examples, world) -> torch.Tensor:
    """Sorted ids (long [u]) of the open_clip BPE tokens in the stand-in CLIP's training captions."""
    from fusion_vlm.demo.stage0 import clip_config, clip_inputs

    cfg = clip_config()
    _, texts, _ = clip_inputs(examples, cfg.views.view_size, cfg.vision.text_context_length, world.max_local_views,
                           world.hd_rule)
    return torch.unique(torch.cat([t.reshape(-1) for t in texts]))


def _export_clip(src: Path, dst: Path, used: torch.Tensor) -> None:
    """float16 copy of the CLIP state dict with the rows of never-seen tokens zeroed."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    emb = sd["token_embedding.weight"]
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[used] = True
    sd["token_embedding.weight"] = torch.where(keep[:, None], emb, torch.zeros_like(emb))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sorted(sd.items())},
              str(dst), metadata={"format": "pt"})


def _export_llm(src: Path, dst: Path) -> None:
    """float16 ``save_pretrained`` copy of the LLM and its tokenizer (only the files in LLM_FILES)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).half()
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    for path in dst.iterdir():
        if path.name not in LLM_FILES:
            path.unlink()


def _parameters(d: Path) -> dict[str, int]:
    from safetensors import safe_open

    out = {}
    for name, path in (("clip", d / CLIP_FILE), ("llm", d / LLM_DIR / "model.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[name] = sum(int(torch.tensor(f.get_slice(k).get_shape()).prod()) for k in f.keys())
    return out


def _files(d: Path) -> list[Path]:
    return [d / CLIP_FILE] + [d / LLM_DIR / n for n in LLM_FILES] + [d / PROBE]


def make_standins(out_dir: str | Path, world=None, preset: str = "ship", seed: int = 0, threads: int = 1,
                  progress: bool = True, keep_work: bool = False) -> dict:
    """Train both stand-ins from scratch with ``stage0.run_stage0(..., preset)`` on the first
    :data:`N_TRAIN` train images of ``world`` (default: the demo world of ``seed``), export them (float16,
    unused CLIP token rows zeroed), probe them (:func:`probe_standins`) and write ``MODEL_CARD.md``.

    Deterministic for (seed, preset, torch version, ``threads``): :func:`~fusion_vlm.demo.loop.deterministic`
    is applied first (and in the LLM's process: ``run_stage0(parallel=True)``).
    Training happens in ``out_dir/.work`` (resumed when rerun, removed at the end unless ``keep_work``).
    Returns {"dir", "probe", "seconds": {"train", "probe", "total"}, "sha256": {relative path: hex}}.
    """
    from fusion_vlm.demo import stage0
    from fusion_vlm.demo.world import make_examples

    if preset not in stage0.PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(stage0.PRESETS)}")
    start = time.time()
    deterministic(threads)
    out, world = Path(out_dir), world or shipped_world(seed)
    work = out / ".work"
    examples = make_examples("train", N_TRAIN, world)
    trained = stage0.run_stage0(examples, work, preset, seed=seed, world=world, progress=progress, parallel=True,
                                threads=threads)
    t_train = time.time() - start
    _export_clip(trained["clip_path"], out / CLIP_FILE, _used_token_ids(examples, world))
    _export_llm(trained["llm_dir"], out / LLM_DIR)
    t0 = time.time()
    probe = probe_standins(out, world, seed, train=examples)
    (out / PROBE).write_text(json.dumps(probe, indent=2) + "\n")
    t_probe = time.time() - t0
    losses = {"clip": trained["clip"]["losses"], "clip_region": trained["clip"]["region_losses"],
              "llm": trained["llm"]["losses"], "llm_phases": [r["losses"] for r in trained["llm"]["phases"]]}
    (out / CARD).write_text(model_card(out, probe, preset, seed, threads, world, losses))
    if not keep_work:
        shutil.rmtree(work)
    return {"dir": out, "probe": probe, "sha256": {str(p.relative_to(out)): sha256(p) for p in _files(out)},
            "seconds": {"train": t_train, "probe": t_probe, "total": time.time() - start}}


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def _curriculum_lines(curriculum, phase_losses: list[list[float]], lr: float) -> list[str]:
    """The model card's lines on the LLM's later phases (``curriculum``, stage0.LLM_CURRICULUM's form) and
    each phase's mean loss over its last 100 steps (``lr``: the recipe's, for phases that keep it)."""
    lines = []
    if curriculum:
        lines.append(f"Then {len(curriculum)} more phase(s) (`fusion_vlm.demo.stage0.train_llm`), each from the "
                     "previous phase's weights (rounded to float16) on scenes not read before:")
        for k, ph in enumerate(curriculum, 1):
            what = (f"questions of the families {', '.join(ph['families'])} only" if "families" in ph
                    else "questions of every family")
            mix = ph.get("context_mix")
            lines.append(f"({k}) {ph['steps']} steps, lr {ph.get('lr', lr):g}, {what}, contexts "
                         + (", ".join(f"{c} {w:.0%}" for c, w in mix.items()) if mix else "as above")
                         + (";" if k < len(curriculum) else "."))
    tails = [sum(xs[-100:]) / len(xs[-100:]) for xs in phase_losses]
    return lines + [("Mean loss of the last 100 steps of each phase " if len(tails) > 1 else
                     "Mean loss of the last 100 steps ") + " / ".join(f"{t:.3f}" for t in tails) + "."]


def model_card(d: Path, probe: dict, preset: str, seed: int, threads: int, world, losses: dict) -> str:
    """The Markdown model card of the stand-ins in ``d``: how made, sizes, sha256, probe figures."""
    import transformers

    from fusion_vlm.demo import stage0

    p, params = stage0.PRESETS[preset], _parameters(d)
    layers = json.loads((d / LLM_DIR / "config.json").read_text())["num_hidden_layers"]
    v, r = probe["vision"], probe.get("vision_random", {})

    def mean_tail(xs, k=100):
        return sum(xs[-k:]) / len(xs[-k:])

    lines = [
        "# Stand-in CLIP and text-only LLM of the CPU demo", "",
        "Small stand-ins for the pretrained CLIP and Llama-2 the paper starts from, trained on the demo's",
        "synthetic world (the `world` of `configs/demo/full.yaml`). Made with", "",
        "```bash", f"fusion-vlm standins make --preset {preset} --seed {seed} --threads {threads}", "```", "",
        f"(torch {torch.__version__}, transformers {transformers.__version__}, {threads} thread(s), "
        f"{platform.machine()}). Rerunning that command with the same torch and transformers versions and thread count gives",
        "files with the same sha256 as below.", "",
        "## CLIP (`clip.safetensors`)", "",
        f"The tiny open_clip CLIP of `configs/model/tiny.yaml` ({params['clip']:,} parameters, of which the text",
        "tower's 49,408-row token table is most), trained contrastively (`open_clip.loss.ClipLoss`) for",
        f"{p['clip_steps']} steps of {p['clip_batch']} (view, caption) pairs from the first {N_TRAIN} train images "
        f"(world seed {world.seed}):",
        "global views captioned with the description or an answered question, HD local views with the names",
        f"of the objects in them, {p.get('clip_crops', 0)} view-sized crops per image centred on one object and "
        f"{p.get('clip_glyph_crops', 0)} shifted crops per glyph, each captioned with its name;",
        f"plus a region-text term (weight {p.get('clip_region', 0.0):g}) that classifies each named object's 3x3 "
        "block of last-block tokens among the names' text embeddings",
        f"(`fusion_vlm.demo.stage0.train_clip`, seed {seed}). Mean loss of the last 100 "
        f"steps {mean_tail(losses['clip']):.3f}"
        + (f" (region term {mean_tail(losses['clip_region']):.3f})." if losses.get("clip_region") else "."),
        "Stored in float16 (loading upcasts into the float32 model); the token rows of BPE tokens that never",
        "occur in the captions are 0 (they had received no gradient). Loads with `open_clip.load_checkpoint`,",
        "i.e. as `vision.pretrained`.", "",
        "## LLM (`llm/`)", "",
        f"A {layers}-layer Llama ({params['llm']:,} parameters) with a "
        "512-token byte-level BPE trained on the world's text,",
        f"trained on TEXT ONLY for {p['llm_steps']} steps of {p['llm_batch']} "
        + ("fresh text-only scenes, each with all its questions as one multi-turn chat"
           if p.get("llm_pack") else "questions of fresh text-only scenes, one per sequence")
        + (f", the description among them in {p['llm_describe']:.0%} of the scenes"
           if p.get("llm_describe") is not None else "")
        + f" (lr {p.get('llm_lr', 2e-3):g}), each sequence opened by a text context",
        f"({', '.join(f'{k} {w:.0%}' for k, w in stage0.CONTEXT_MIX.items())}); loss: each answer's, counted once"
        + (f", plus {p['llm_text_weight']:g} x the next-token loss on all the text, answers included"
           if p.get("llm_text_weight") else "")
        + f" (`fusion_vlm.demo.text_llm.train_text_llm`, seed {seed}).",
        *_curriculum_lines(p.get("llm_curriculum", ()), losses.get("llm_phases") or [losses["llm"]],
                           p.get("llm_lr", 2e-3)),
        "Stored in float16 (`save_pretrained`).", "",
        "## Probe figures", "",
        f"Linear probes (logistic regression, `fusion_vlm.demo.standins.fit_linear_probe`) on the frozen vision "
        f"tower's last-block tokens: the 3x3 block of tokens at each object's centre, fitted on "
        f"{probe['n_train_images']} train images, scored on {probe['n_test_images']} test images "
        "(red triangles appear in test only).", "",
        "| probe | target | stand-in | random-init tower | test items |", "|---|---|---|---|---|",
    ]
    for task, name in VISION_PROBES.items():
        lines.append(f"| {name} | >= {TARGETS[task]:.0f} | {_fmt(v[task])} | "
                     f"{_fmt(r[task]) if r else '-'} | {v[f'{task}_n_test']} |")
    fams = list(next(iter(probe["llm"].values())))
    lines += ["", f"The LLM's greedy accuracy (%; item F1 for descriptions) on the questions of "
              f"{probe['n_llm_test_images']} test images, each "
              f"opened by a text context (target: >= {TARGETS['llm_scene']:.0f} in every family from the scene):", "",
              "| context | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for kind, row in probe["llm"].items():
        lines.append(f"| {kind} | " + " | ".join(_fmt(row[f]) for f in fams) + " |")
    lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    for path in _files(d):
        lines.append(f"| `{path.relative_to(d)}` | {path.stat().st_size} | `{sha256(path)}` |")
    return "\n".join(lines) + "\n"


def card_checksums(card: str | Path) -> dict[str, str]:
    """{relative path: sha256} listed in a model card's Files table."""
    import re

    text = Path(card).read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)` \| \d+ \| `([0-9a-f]{64})` \|$", text, re.M)}
