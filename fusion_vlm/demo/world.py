"""A seeded synthetic world for the CPU demo: shapes, colours, regions, letters, and questions about them.

Images (``WorldConfig.min_side``..``max_side`` px, aspect 1:3..3:1) hold 2-5
coloured shapes and 1-2 dark letters/digits, at most one item per cell of a
``grid`` x ``grid`` layout (default 3); an item's region is the 3x3 name
(``REGIONS``) of its cell's centre, so with ``grid`` > 3 a region can hold
several items and a question names an object by its region plus, where the
region holds more than one, its kind or colour. Glyph capitals are
``glyph_local_px`` pixels tall in the image's HD *local* views (see :func:`fusion_vlm.views.plan_views`), so
only ~1/c of that (c >= 3 local views across) in the global view: reading
needs the local views. Question families (canonical short answers):

* ``attribute``   "What colour is the shape in the top left?" -> "red";
                  "What shape is in the bottom right?" -> "circle";
                  "What colour is the circle on the left?", "What shape is the red shape on the left?"
* ``existence``   "Is there a blue triangle?" -> "yes"/"no" (balanced: see :func:`_questions`)
* ``counting``    "How many circles are there?" / "How many red shapes are there?" -> "2" (digits);
                  with ``local_counts`` also "How many shapes are in the centre?"
* ``reading``     "What letter is written in the top right?" -> "k" (lower case; digits likewise)
* ``description`` "Describe the image." -> "red square top left, letter k top right, blue circle centre"
                  (every item in reading order; glyphs as "letter k" / "digit 7")

Held-out combinations: the colour-shape pairs in ``WorldConfig.heldout`` (by
default red star, green square, blue cross, yellow triangle, purple circle: one
per colour and per shape) are never drawn in ``train`` images and never asked
about in ``train`` questions; every ``test`` image holds at least
``test_min_heldout`` of them. Image i of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fusion_vlm.demo import render
from fusion_vlm.demo.render import PALETTE, REGIONS, SHAPES

FAMILIES = ("attribute", "existence", "counting", "reading", "description")
SPLITS = ("train", "test")
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: too easily confused with 1, 0
DIGITS = "2345679"  # no 0, 1, 8: confusable with O, I, B
PLURAL = {"square": "squares", "circle": "circles", "triangle": "triangles", "star": "stars", "cross": "crosses"}
WHERE = {"top left": "in the top left", "top": "at the top", "top right": "in the top right", "left": "on the left",
         "centre": "in the centre", "right": "on the right", "bottom left": "in the bottom left",
         "bottom": "at the bottom", "bottom right": "in the bottom right"}
DESCRIBE = "Describe the image."


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines the world; two equal configs give identical examples."""

    seed: int = 0
    min_side: int = 200  # shortest image side (px)
    max_side: int = 700  # longest image side (px)
    min_long: int = 240  # longest side at least this, so that HD gives >= 3 local views across
    max_aspect: float = 3.0  # long / short <= this
    colours: tuple[str, ...] = tuple(PALETTE)
    shapes: tuple[str, ...] = SHAPES
    heldout: tuple[tuple[str, str], ...] = (("red", "star"), ("green", "square"), ("blue", "cross"),
                                            ("yellow", "triangle"), ("purple", "circle"))
    test_min_heldout: int = 1  # each test image holds at least this many held-out shapes
    n_shapes: tuple[int, int] = (2, 5)  # inclusive range of shapes per image
    n_glyphs: tuple[int, int] = (1, 2)  # inclusive range of letters/digits per image
    questions: tuple[int, int] = (3, 5)  # inclusive range of questions per image
    families: tuple[str, ...] = FAMILIES
    description_prob: float = 0.25  # chance that an image gets the (single) description question
    object_frac: tuple[float, float] = (0.45, 0.8)  # shape side / shorter cell side
    colour_jitter: int = 12  # +- per channel around the palette colour
    view_size: int = 112  # the model's view size (only used to size glyphs)
    max_local_views: int = 9
    hd_rule: str = "no_upsize"  # view rule the glyphs are sized for (the demo's images are drawn at view scale)
    glyph_local_px: float = 16.0  # glyph capital height in local-view pixels
    grid: int = 3  # layout cells per side (3..6), at most one item per cell; an item's region is the 3x3 name
    #                of its cell's centre, so with grid > 3 a region can hold several items
    skew: float | None = None  # Dirichlet concentration of each image's colour and shape weights (small: a few
    #                            colours/shapes dominate, counts spread out); None: uniform draws
    hard_negatives: bool = False  # existence "no" asks a pair whose colour and shape both occur (not together)
    #                               when the image has one, so "yes iff both occur" is no shortcut
    uniform_values: bool = False  # attribute questions draw the asked colour/shape uniformly among the image's
    #                               values first, so the image's commonest value is no shortcut
    local_counts: bool = False  # counting also asks "How many shapes are <region>?" (counting + localisation)


@dataclass(frozen=True)
class WorldObject:
    """One drawn item: a shape (``shape``, ``colour``) or a glyph (``char``); ``box`` in image pixels."""

    region: str
    kind: str  # "shape" | "letter" | "digit"
    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    shape: str | None = None
    colour: str | None = None
    char: str | None = None  # lower case
    cell: int = 0  # layout cell, row-major in the WorldConfig.grid x grid layout (orders items within a region)

    @property
    def centre(self) -> tuple[int, int]:
        """Integer pixel (x, y) at the box centre; inside the drawn shape."""
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2

    def name(self) -> str:
        """What the object is, without where: "red square" or "letter k"."""
        return f"{self.colour} {self.shape}" if self.kind == "shape" else f"{self.kind} {self.char}"

    def phrase(self) -> str:
        """Canonical description item, e.g. "red square top left" or "letter k top right"."""
        return f"{self.name()} {self.region}"


@dataclass(frozen=True)
class QA:
    """One question with its canonical answer and the phrases of the objects it is about (``evidence``)."""

    family: str
    question: str
    answer: str
    # WorldObject.phrase() of the objects that decide the answer (for existence and counting: every shape
    # sharing the asked colour or shape, so that the answer still has to be worked out); stage 0 uses them
    evidence: tuple[str, ...] = ()


@dataclass
class Example:
    """One image of the world with its questions (``qas``) and the ground-truth ``objects``."""

    id: str
    image: Image.Image | None  # None for text-only scenes (make_text_example)
    qas: list[QA]
    objects: list[WorldObject] = field(default_factory=list)

    @property
    def description(self) -> str:
        """The canonical description (all objects in reading order)."""
        return describe(self.objects)


def reading_order(objects: list[WorldObject]) -> list[WorldObject]:
    """``objects`` sorted by region (REGIONS order), then by layout cell."""
    return sorted(objects, key=lambda o: (REGIONS.index(o.region), o.cell))


def phrases(objects: list[WorldObject]) -> list[str]:
    """The objects' phrases in reading (region, then cell) order."""
    return [o.phrase() for o in reading_order(objects)]


def describe(objects: list[WorldObject]) -> str:
    """Canonical description: object phrases in reading (region) order, comma-separated."""
    return ", ".join(phrases(objects))


def _pairs(cfg: WorldConfig, split: str) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in cfg.colours for s in cfg.shapes]
    return [p for p in pairs if p not in cfg.heldout] if split == "train" else pairs


def cell_region(cell: int, grid: int) -> str:
    """The 3x3 region name (REGIONS) holding the centre of layout cell ``cell`` (row-major) of a grid x grid
    layout; for grid 3 cell i is REGIONS[i]."""
    row, col = divmod(cell, grid)
    return REGIONS[3 * min(int(3 * (row + 0.5) / grid), 2) + min(int(3 * (col + 0.5) / grid), 2)]


def _cell_box(cell: int, grid: int, w: int, h: int) -> tuple[float, float, float, float]:
    row, col = divmod(cell, grid)
    return col * w / grid, row * h / grid, (col + 1) * w / grid, (row + 1) * h / grid


def _draw_pairs(rng, cfg: WorldConfig, pairs: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """n colour-shape pairs: uniform over ``pairs``, or (``cfg.skew``) weighted by per-image Dirichlet
    weights of the colours times those of the shapes."""
    if cfg.skew is None:
        return [pairs[i] for i in rng.integers(0, len(pairs), n)]
    wc = dict(zip(cfg.colours, rng.dirichlet([cfg.skew] * len(cfg.colours))))
    ws = dict(zip(cfg.shapes, rng.dirichlet([cfg.skew] * len(cfg.shapes))))
    p = np.array([wc[c] * ws[s] for c, s in pairs]) + 1e-12
    return [pairs[i] for i in rng.choice(len(pairs), n, p=p / p.sum())]


def _sample_scene(rng: np.random.Generator, cfg: WorldConfig, split: str, w: int, h: int) -> list[WorldObject]:
    n_shapes = int(rng.integers(cfg.n_shapes[0], cfg.n_shapes[1] + 1))
    n_glyphs = int(rng.integers(cfg.n_glyphs[0], cfg.n_glyphs[1] + 1))
    cells = [int(i) for i in rng.permutation(cfg.grid * cfg.grid)[: n_shapes + n_glyphs]]
    pairs = _pairs(cfg, split)
    chosen = _draw_pairs(rng, cfg, pairs, n_shapes)
    held = [p for p in cfg.heldout if p[0] in cfg.colours and p[1] in cfg.shapes]
    if split == "test" and held:
        for k in range(min(cfg.test_min_heldout, n_shapes)):
            if sum(p in cfg.heldout for p in chosen) < cfg.test_min_heldout:
                chosen[k] = held[int(rng.integers(len(held)))]
    cap = render.glyph_cap_height(w, h, cfg.glyph_local_px, cfg.view_size, cfg.max_local_views,
                                   cfg.hd_rule)
    objects = []
    for i, cell in enumerate(cells):
        region = cell_region(cell, cfg.grid)
        x0, y0, x1, y1 = _cell_box(cell, cfg.grid, w, h)
        if i < n_shapes:
            side = rng.uniform(*cfg.object_frac) * min(x1 - x0, y1 - y0)
            bx = x0 + 1 + rng.uniform(0, max(0.0, x1 - x0 - side - 2))
            by = y0 + 1 + rng.uniform(0, max(0.0, y1 - y0 - side - 2))
            colour, shape = chosen[i]
            box = (round(bx), round(by), round(bx + side), round(by + side))
            objects.append(WorldObject(region, "shape", box, shape=shape, colour=colour, cell=cell))
        else:
            digit = rng.random() < 0.3
            char = str(rng.choice(list(DIGITS if digit else LETTERS))).lower()
            centre = (round((x0 + x1) / 2 + rng.uniform(-0.15, 0.15) * (x1 - x0)),
                      round((y0 + y1) / 2 + rng.uniform(-0.15, 0.15) * (y1 - y0)))
            box = render.glyph_box(char, centre, cap)
            objects.append(WorldObject(region, "digit" if digit else "letter", box, char=char, cell=cell))
    return objects


def _attribute_question(o: WorldObject, shapes: list[WorldObject], colour_q: bool) -> str | None:
    """A question about shape ``o``'s colour (``colour_q``) or kind that names it unambiguously among
    ``shapes``: by its region when it is the region's only shape, else by its kind (colour questions) or its
    colour (shape questions) when that is unique in the region and the image's shapes of that kind (colour)
    do not all share the answer (so the region is needed); None when neither is."""
    here = [s for s in shapes if s.region == o.region]
    where = WHERE[o.region]
    if len(here) == 1:
        return f"What colour is the shape {where}?" if colour_q else f"What shape is {where}?"
    if colour_q and sum(s.shape == o.shape for s in here) == 1 \
            and len({s.colour for s in shapes if s.shape == o.shape}) > 1:
        return f"What colour is the {o.shape} {where}?"
    if not colour_q and sum(s.colour == o.colour for s in here) == 1 \
            and len({s.shape for s in shapes if s.colour == o.colour}) > 1:
        return f"What shape is the {o.colour} shape {where}?"
    return None


def _ask(rng, cfg: WorldConfig, split: str, family: str, objects: list[WorldObject], yes: bool,
         asked: set[str] = frozenset()) -> QA | None:
    """One question of ``family``. Existence: answer "yes" iff ``yes``, never one of ``asked``, and at most
    as many "no" as there are present pairs; None when no such question is left."""
    shapes = [o for o in objects if o.kind == "shape"]

    def about(keep) -> tuple[str, ...]:
        return tuple(o.phrase() for o in shapes if keep(o))

    if family == "attribute":
        if cfg.grid == 3 and not cfg.uniform_values:  # one shape per region: any shape, then colour or shape
            o = shapes[int(rng.integers(len(shapes)))]
            colour_q = rng.random() < 0.5
        else:
            colour_q = rng.random() < 0.5
            value = (lambda o: o.colour) if colour_q else (lambda o: o.shape)
            pool = [o for o in shapes if _attribute_question(o, shapes, colour_q)]
            if not pool:
                return None
            if cfg.uniform_values:  # the asked value uniform among the image's (referable) values
                values = sorted({value(o) for o in pool})
                v = values[int(rng.integers(len(values)))]
                pool = [o for o in pool if value(o) == v]
            o = pool[int(rng.integers(len(pool)))]
        return QA(family, _attribute_question(o, shapes, colour_q), o.colour if colour_q else o.shape,
                  (o.phrase(),))
    if family == "existence":
        def question(pair: tuple[str, str]) -> str:
            return f"Is there a {pair[0]} {pair[1]}?"

        present = sorted({(o.colour, o.shape) for o in shapes})
        absent = [p for p in _pairs(cfg, split) if p not in present]
        if not yes and sum(question(p) in asked for p in absent) >= len(present):
            return None  # as many "no" as there can be "yes" in this image
        pool = [p for p in (present if yes else absent) if question(p) not in asked]
        if not yes and cfg.hard_negatives:  # colour and shape each occur, not together: needs binding
            hard = [p for p in pool if any(o.colour == p[0] for o in shapes) and any(o.shape == p[1] for o in shapes)]
            pool = hard or pool
        if not pool:
            return None
        colour, shape = pool[int(rng.integers(len(pool)))]
        return QA(family, question((colour, shape)), "yes" if yes else "no",
                  about(lambda o: o.colour == colour or o.shape == shape))
    if family == "counting":
        if cfg.local_counts and rng.random() < 1 / 3:
            region = REGIONS[int(rng.integers(len(REGIONS)))]
            return QA(family, f"How many shapes are {WHERE[region]}?", str(sum(o.region == region for o in shapes)),
                      about(lambda o: o.region == region))
        if rng.random() < 0.5:
            shape = shapes[int(rng.integers(len(shapes)))].shape if rng.random() < 0.7 else \
                cfg.shapes[int(rng.integers(len(cfg.shapes)))]
            return QA(family, f"How many {PLURAL[shape]} are there?", str(sum(o.shape == shape for o in shapes)),
                      about(lambda o: o.shape == shape))
        colour = shapes[int(rng.integers(len(shapes)))].colour if rng.random() < 0.7 else \
            cfg.colours[int(rng.integers(len(cfg.colours)))]
        return QA(family, f"How many {colour} shapes are there?", str(sum(o.colour == colour for o in shapes)),
                  about(lambda o: o.colour == colour))
    if family == "reading":
        glyphs = [o for o in objects if o.kind != "shape"]
        glyphs = [o for o in glyphs if sum(g.kind == o.kind and g.region == o.region for g in glyphs) == 1]
        if not glyphs:
            return None
        o = glyphs[int(rng.integers(len(glyphs)))]
        return QA(family, f"What {o.kind} is written {WHERE[o.region]}?", o.char, (o.phrase(),))
    if family == "description":
        text = describe(objects)
        return QA(family, DESCRIBE, text, tuple(text.split(", ")))
    raise ValueError(f"unknown question family {family!r}; expected one of {FAMILIES}")


def _questions(rng, cfg: WorldConfig, split: str, objects: list[WorldObject], index: int) -> list[QA]:
    """n questions (n drawn from ``cfg.questions``): families drawn per question, repeats redrawn."""
    n = int(rng.integers(cfg.questions[0], cfg.questions[1] + 1))
    askable = {"reading": any(o.kind != "shape" for o in objects)}
    others = [f for f in cfg.families if f != "description" and askable.get(f, True)]
    describe_it = "description" in cfg.families and rng.random() < cfg.description_prob
    # existence answers alternate within an image, starting with "yes" iff i is even, and stop when _ask has
    # no fresh "yes" (every present pair asked) or "no" (as many as present pairs) left: balanced per image
    qas, seen, yes = [], set(), index % 2 == 0
    for _ in range(20 * n if others else 0):
        if len(qas) >= n - describe_it or not others:
            break
        family = others[int(rng.integers(len(others)))]
        qa = _ask(rng, cfg, split, family, objects, yes, seen)
        if qa is None:
            others.remove(family)
            continue
        if qa.question in seen:
            continue
        yes = not yes if family == "existence" else yes
        seen.add(qa.question)
        qas.append(qa)
    if describe_it:
        qas.insert(int(rng.integers(len(qas) + 1)), _ask(rng, cfg, split, "description", objects, yes))
    return qas


def make_example(split: str, index: int, cfg: WorldConfig = WorldConfig()) -> Example:
    """Image ``index`` of ``split`` ("train" | "test"): a function of (cfg, split, index) only."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    w, h = render.image_size(rng, cfg.min_side, cfg.max_side, cfg.min_long, cfg.max_aspect)
    objects = _sample_scene(rng, cfg, split, w, h)
    cap = render.glyph_cap_height(w, h, cfg.glyph_local_px, cfg.view_size, cfg.max_local_views,
                                   cfg.hd_rule)
    image = render.draw_scene(rng, w, h, objects, cap, cfg.colour_jitter)
    return Example(f"{split}-{index:05d}", image, _questions(rng, cfg, split, objects, index), objects)


def make_text_example(index: int, cfg: WorldConfig = WorldConfig()) -> Example:
    """A scene and its questions with no image drawn (``image`` is None), for text-only training: train
    pairs only, from a random stream of its own (index ``i`` is not train image ``i``)."""
    rng = np.random.default_rng([cfg.seed, len(SPLITS), index])
    w, h = render.image_size(rng, cfg.min_side, cfg.max_side, cfg.min_long, cfg.max_aspect)
    objects = _sample_scene(rng, cfg, "train", w, h)
    return Example(f"text-{index:06d}", None, _questions(rng, cfg, "train", objects, index), objects)


def make_examples(split: str, n_images: int, cfg: WorldConfig = WorldConfig()) -> list[Example]:
    """The first ``n_images`` examples of ``split`` (deterministic; a prefix of any longer call)."""
    return [make_example(split, i, cfg) for i in range(n_images)]


def export_llava(examples: list[Example], out_dir: str | Path, filename: str = "data.jsonl") -> Path:
    """Write ``out_dir/images/<id>.png`` and ``out_dir/<filename>`` (LLaVA JSONL); return the JSONL path.

    Each record: {"id", "image": "images/<id>.png", "conversations": [human "<image>\\nQ1", gpt "A1",
    human "Q2", ...], "family": [family of Q1, ...]}.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / filename
    with path.open("w") as f:
        for ex in examples:
            rel = f"images/{ex.id}.png"
            ex.image.save(out / rel)
            conv = []
            for i, qa in enumerate(ex.qas):
                conv.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + qa.question})
                conv.append({"from": "gpt", "value": qa.answer})
            f.write(json.dumps({"id": ex.id, "image": rel, "conversations": conv,
                                "family": [qa.family for qa in ex.qas]}) + "\n")
    return path
