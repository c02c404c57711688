"""A seeded synthetic world for the CPU demo: shapes, colours, regions, letters, and questions about them.

Images (``WorldConfig.min_side``..``max_side`` px, aspect 1:3..3:1) hold 2-5
coloured shapes and 1-2 dark letters/digits, at most one item per cell of a
3x3 layout (``REGIONS``). Glyph capitals are ``glyph_local_px`` pixels tall
in the image's HD *local* views (see :func:`fusion_vlm.views.plan_views`), so
only ~1/c of that (c >= 3 local views across) in the global view: reading
needs the local views. Question families (canonical short answers):

* ``attribute``   "What colour is the shape in the top left?" -> "red";
                  "What shape is in the bottom right?" -> "circle"
* ``existence``   "Is there a blue triangle?" -> "yes"/"no" (balanced: see :func:`_questions`)
* ``counting``    "How many circles are there?" / "How many red shapes are there?" -> "2" (digits)
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
import re
from collections import Counter, defaultdict
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


@dataclass(frozen=True)
class WorldObject:
    """One drawn item: a shape (``shape``, ``colour``) or a glyph (``char``); ``box`` in image pixels."""

    region: str
    kind: str  # "shape" | "letter" | "digit"
    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    shape: str | None = None
    colour: str | None = None
    char: str | None = None  # lower case

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


def phrases(objects: list[WorldObject]) -> list[str]:
    """The objects' phrases in reading (region) order."""
    return [o.phrase() for o in sorted(objects, key=lambda o: REGIONS.index(o.region))]


def describe(objects: list[WorldObject]) -> str:
    """Canonical description: object phrases in reading (region) order, comma-separated."""
    return ", ".join(phrases(objects))


def _pairs(cfg: WorldConfig, split: str) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in cfg.colours for s in cfg.shapes]
    return [p for p in pairs if p not in cfg.heldout] if split == "train" else pairs


def _sample_scene(rng: np.random.Generator, cfg: WorldConfig, split: str, w: int, h: int) -> list[WorldObject]:
    n_shapes = int(rng.integers(cfg.n_shapes[0], cfg.n_shapes[1] + 1))
    n_glyphs = int(rng.integers(cfg.n_glyphs[0], cfg.n_glyphs[1] + 1))
    regions = [REGIONS[i] for i in rng.permutation(len(REGIONS))[: n_shapes + n_glyphs]]
    pairs = _pairs(cfg, split)
    chosen = [pairs[i] for i in rng.integers(0, len(pairs), n_shapes)]
    held = [p for p in cfg.heldout if p[0] in cfg.colours and p[1] in cfg.shapes]
    if split == "test" and held:
        for k in range(min(cfg.test_min_heldout, n_shapes)):
            if sum(p in cfg.heldout for p in chosen) < cfg.test_min_heldout:
                chosen[k] = held[int(rng.integers(len(held)))]
    cap = render.glyph_cap_height(w, h, cfg.glyph_local_px, cfg.view_size, cfg.max_local_views,
                                   cfg.hd_rule)
    objects = []
    for i, region in enumerate(regions):
        x0, y0, x1, y1 = render.cell_box(region, w, h)
        if i < n_shapes:
            side = rng.uniform(*cfg.object_frac) * min(x1 - x0, y1 - y0)
            bx = x0 + 1 + rng.uniform(0, max(0.0, x1 - x0 - side - 2))
            by = y0 + 1 + rng.uniform(0, max(0.0, y1 - y0 - side - 2))
            colour, shape = chosen[i]
            box = (round(bx), round(by), round(bx + side), round(by + side))
            objects.append(WorldObject(region, "shape", box, shape=shape, colour=colour))
        else:
            digit = rng.random() < 0.3
            char = str(rng.choice(list(DIGITS if digit else LETTERS))).lower()
            centre = (round((x0 + x1) / 2 + rng.uniform(-0.15, 0.15) * (x1 - x0)),
                      round((y0 + y1) / 2 + rng.uniform(-0.15, 0.15) * (y1 - y0)))
            box = render.glyph_box(char, centre, cap)
            objects.append(WorldObject(region, "digit" if digit else "letter", box, char=char))
    return objects


def _ask(rng, cfg: WorldConfig, split: str, family: str, objects: list[WorldObject], yes: bool,
         asked: set[str] = frozenset()) -> QA | None:
    """One question of ``family``. Existence: answer "yes" iff ``yes``, never one of ``asked``, and at most
    as many "no" as there are present pairs; None when no such question is left."""
    shapes = [o for o in objects if o.kind == "shape"]

    def about(keep) -> tuple[str, ...]:
        return tuple(o.phrase() for o in shapes if keep(o))

    if family == "attribute":
        o = shapes[int(rng.integers(len(shapes)))]
        if rng.random() < 0.5:
            return QA(family, f"What colour is the shape {WHERE[o.region]}?", o.colour, (o.phrase(),))
        return QA(family, f"What shape is {WHERE[o.region]}?", o.shape, (o.phrase(),))
    if family == "existence":
        def question(pair: tuple[str, str]) -> str:
            return f"Is there a {pair[0]} {pair[1]}?"

        present = sorted({(o.colour, o.shape) for o in shapes})
        absent = [p for p in _pairs(cfg, split) if p not in present]
        if not yes and sum(question(p) in asked for p in absent) >= len(present):
            return None  # as many "no" as there can be "yes" in this image
        pool = [p for p in (present if yes else absent) if question(p) not in asked]
        if not pool:
            return None
        colour, shape = pool[int(rng.integers(len(pool)))]
        return QA(family, question((colour, shape)), "yes" if yes else "no",
                  about(lambda o: o.colour == colour or o.shape == shape))
    if family == "counting":
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


# ---------------------------------------------------------------- scoring
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalise(text: str) -> str:
    """Lower-case, punctuation replaced by spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def description_f1(pred: str, true: str) -> float:
    """Per-object F1 between comma-separated item lists (items normalised, multiset match); in [0, 1]."""
    p = Counter(normalise(x) for x in pred.split(",") if normalise(x))
    t = Counter(normalise(x) for x in true.split(",") if normalise(x))
    hit = sum((p & t).values())
    return 2 * hit / (sum(p.values()) + sum(t.values())) if hit else 0.0  # = 2PR / (P + R)


def score(answer_pred: str, answer_true: str, family: str) -> bool:
    """Is ``answer_pred`` right? Both sides go through :func:`normalise`, then per family:

    existence: the first "yes"/"no" word of the prediction equals the truth; counting: the first number
    (digits, or a number word zero..ten) equals the truth; attribute, reading, description: the whole
    normalised strings are equal (for descriptions the softer :func:`description_f1` is reported apart).
    """
    words, truth = normalise(answer_pred).split(), normalise(answer_true)
    if family == "existence":
        return next((w for w in words if w in ("yes", "no")), None) == truth
    if family == "counting":
        nums = [str(int(w)) if w.isdigit() else NUMBER_WORDS[w] for w in words if w.isdigit() or w in NUMBER_WORDS]
        return bool(nums) and nums[0] == str(int(truth))
    if family in FAMILIES:
        return " ".join(words) == truth
    raise ValueError(f"unknown question family {family!r}; expected one of {FAMILIES}")


def majority_baseline(train: list[Example], test: list[Example] | None = None) -> dict[str, float]:
    """Accuracy per family on ``test`` (default ``train``) of always giving train's commonest answer."""
    test = train if test is None else test
    counts, right = defaultdict(Counter), defaultdict(list)
    for qa in (qa for ex in train for qa in ex.qas):
        counts[qa.family][qa.answer] += 1
    for qa in (qa for ex in test for qa in ex.qas):
        guess = counts[qa.family].most_common(1)[0][0] if counts[qa.family] else ""
        right[qa.family].append(score(guess, qa.answer, qa.family))
    return {f: sum(v) / len(v) for f, v in sorted(right.items(), key=lambda kv: FAMILIES.index(kv[0]))}


# ---------------------------------------------------------------- per-question records and shortcut rules
GRADED = {"description": "f1"}  # families scored by a graded metric (in [0, 1] per question) instead of accuracy
SHORTCUTS = {  # rules that answer from answer statistics or image-level object statistics, without a model
    "majority": "the train split's commonest answer of the family",
    "commonest": "image-level statistics without localisation: colour/shape questions get the image's commonest "
                 "colour/shape, existence 'yes' iff the colour and the shape each occur (not necessarily "
                 "together), counting 1 if the asked colour/shape occurs else 0; reading and description "
                 "have no such shortcut and take the majority answer",
}


def metric_of(family: str) -> str:
    """The metric a family is reported in: "f1" for descriptions, "accuracy" otherwise ("score" for "all")."""
    return "score" if family == "all" else GRADED.get(family, "accuracy")


def prediction_record(ex: Example, image: int, qa: QA, pred: str) -> dict:
    """One question's record: family, image (index in the test split), image_id, question, prediction,
    answer, correct (0/1, :func:`score`), score (graded: :func:`description_f1` for descriptions, else
    = correct)."""
    ok = int(score(pred, qa.answer, qa.family))
    graded = description_f1(pred, qa.answer) if qa.family in GRADED else float(ok)
    return {"family": qa.family, "image": image, "image_id": ex.id, "question": qa.question, "prediction": pred,
            "answer": qa.answer, "correct": ok, "score": float(graded)}


def family_scores(records: list[dict]) -> dict[str, dict]:
    """Summarise per-question records (:func:`prediction_record`) per family, families in FAMILIES order:

    {family: {"accuracy" (exact, %), "n", "correct" (0/1 list), "image" (list), "metric", "value" (the
    family's metric, %)}} (+ "f1" (%) and "score" (per-question F1) for graded families), and "all" over
    every question (``value`` the mean graded score, listed in ``score``). Lists follow ``records`` within
    a family; ``records`` sorted stably by family gives the order of "all".
    """
    by_fam = defaultdict(list)
    for r in records:
        by_fam[r["family"]].append(r)
    out = {}
    for fam in sorted(by_fam, key=FAMILIES.index):
        rs = by_fam[fam]
        ok, graded = [int(r["correct"]) for r in rs], [float(r["score"]) for r in rs]
        out[fam] = {"accuracy": 100.0 * sum(ok) / len(ok), "n": len(ok), "correct": ok,
                    "image": [int(r["image"]) for r in rs], "metric": metric_of(fam),
                    "value": 100.0 * sum(graded) / len(graded)}
        if fam in GRADED:
            out[fam].update({"f1": out[fam]["value"], "score": graded})
    every = [r for fam in out for r in by_fam[fam]]
    ok, graded = [int(r["correct"]) for r in every], [float(r["score"]) for r in every]
    out["all"] = {"accuracy": 100.0 * sum(ok) / max(len(ok), 1), "n": len(ok), "correct": ok,
                  "image": [int(r["image"]) for r in every], "metric": "score",
                  "value": 100.0 * sum(graded) / max(len(graded), 1), "score": graded}
    return out


def _commonest(values: list[str]) -> str:
    """The commonest value; ties go to the one seen first."""
    counts = Counter(values)
    return max(values, key=lambda v: (counts[v], -values.index(v)))


def shortcut_answer(rule: str, qa: QA, objects: list[WorldObject], majority: dict[str, str]) -> str:
    """The answer of shortcut ``rule`` (a key of :data:`SHORTCUTS`) to ``qa`` about an image holding
    ``objects`` (ground truth, reading order); ``majority``: {family: train's commonest answer}."""
    if rule not in SHORTCUTS:
        raise ValueError(f"rule={rule!r}: expected one of {sorted(SHORTCUTS)}")
    shapes = [o for o in sorted(objects, key=lambda o: REGIONS.index(o.region)) if o.kind == "shape"]
    colours, kinds = [o.colour for o in shapes], [o.shape for o in shapes]
    fallback = majority.get(qa.family, "")
    if rule == "majority" or not shapes:
        return fallback
    q = qa.question
    if qa.family == "attribute":
        return _commonest(colours) if q.startswith("What colour") else _commonest(kinds)
    if qa.family == "existence":
        m = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q)
        return fallback if m is None else ("yes" if m[1] in colours and m[2] in kinds else "no")
    if qa.family == "counting":
        singular = {p: s for s, p in PLURAL.items()}
        m = re.fullmatch(r"How many (\w+)(?: shapes)? are there\?", q)
        if m is None:
            return fallback
        word = m[1]
        present = word in colours if q.endswith(" shapes are there?") else singular.get(word) in kinds
        return "1" if present else "0"
    return fallback


def shortcut_rules(train: list[Example], test: list[Example]) -> dict[str, dict[str, dict]]:
    """Every shortcut rule of :data:`SHORTCUTS` scored on ``test``: {rule: :func:`family_scores` layout}, the
    questions in the order :mod:`fusion_vlm.demo.evaluate` asks them (so rule and model scores pair up)."""
    counts = defaultdict(Counter)
    for qa in (qa for ex in train for qa in ex.qas):
        counts[qa.family][qa.answer] += 1
    majority = {fam: c.most_common(1)[0][0] for fam, c in counts.items()}
    out = {}
    for rule in SHORTCUTS:
        records = [prediction_record(ex, i, qa, shortcut_answer(rule, qa, ex.objects, majority))
                   for i, ex in enumerate(test) for qa in ex.qas]
        out[rule] = family_scores(sorted(records, key=lambda r: FAMILIES.index(r["family"])))
    return out
