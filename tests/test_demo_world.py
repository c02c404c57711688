"""The synthetic demo world: determinism, balance, held-out pairs, answers consistent with the pixels."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from fusion_vlm.demo.render import PALETTE, REGIONS, nearest_colour
from fusion_vlm.demo.scoring import (description_f1, family_scores, majority_baseline, score, shortcut_answer,
                                     shortcut_rules)
from fusion_vlm.demo.world import (FAMILIES, PLURAL, QA, Example, WorldConfig, WorldObject, describe, export_llava,
                                   make_examples, make_text_example, WHERE)
from fusion_vlm.views import plan_views

CFG = WorldConfig()


@pytest.fixture(scope="module")
def train():
    return make_examples("train", 120, CFG)


@pytest.fixture(scope="module")
def test_split():
    return make_examples("test", 40, CFG)


def _same(a, b) -> bool:
    return (a.id == b.id and a.qas == b.qas and a.objects == b.objects
            and np.array_equal(np.asarray(a.image), np.asarray(b.image)))


def test_deterministic_prefix_stable_and_seed_dependent(train):
    again = make_examples("train", 6, CFG)
    assert all(_same(a, b) for a, b in zip(train[:6], again))
    other = make_examples("train", 6, replace(CFG, seed=1))
    assert not any(_same(a, b) for a, b in zip(again, other))
    assert not _same(make_examples("test", 1, CFG)[0], again[0])


def test_image_sizes_vary(train):
    sizes = [ex.image.size for ex in train]
    assert all(ex.image.mode == "RGB" for ex in train)
    assert min(min(s) for s in sizes) >= CFG.min_side and max(max(s) for s in sizes) <= CFG.max_side
    ratios = [w / h for w, h in sizes]
    assert max(max(r, 1 / r) for r in ratios) <= CFG.max_aspect + 0.02
    assert min(ratios) < 0.5 and max(ratios) > 2.0 and len(set(sizes)) > len(sizes) // 2


def test_questions_per_image_and_families(train):
    for ex in train:
        assert CFG.questions[0] <= len(ex.qas) <= CFG.questions[1]
        assert sum(qa.family == "description" for qa in ex.qas) <= 1
        assert len({qa.question for qa in ex.qas}) == len(ex.qas)
        assert len({o.region for o in ex.objects}) == len(ex.objects)  # one object per region
    fams = Counter(qa.family for ex in train for qa in ex.qas)
    assert set(fams) == set(FAMILIES)


def test_existence_balanced(train, test_split):
    for split in (train, test_split):
        answers = [qa.answer for ex in split for qa in ex.qas if qa.family == "existence"]
        assert set(answers) == {"yes", "no"}
        assert 0.4 <= answers.count("yes") / len(answers) <= 0.6


def test_existence_balanced_per_image_in_a_world_with_few_shapes():
    # 1-3 shapes and 8-10 questions per image: "yes" runs out after the present pairs, so balance has to be
    # kept per image (an image with one shape asks at most one "yes" and one "no")
    cfg = replace(CFG, colours=("red", "green", "blue"), shapes=("square", "circle", "triangle"),
                  heldout=(("red", "triangle"),), n_shapes=(1, 3), n_glyphs=(1, 1), questions=(8, 10))
    total = Counter()
    for ex in make_examples("test", 60, cfg):
        answers = Counter(qa.answer for qa in ex.qas if qa.family == "existence")
        n_pairs = len({(o.colour, o.shape) for o in ex.objects if o.kind == "shape"})
        assert abs(answers["yes"] - answers["no"]) <= 1 and max(answers.values(), default=0) <= n_pairs, ex.id
        total.update(answers)
    assert abs(total["yes"] - total["no"]) <= 0.05 * sum(total.values()), total


def test_heldout_pairs_only_in_test(train, test_split):
    held = set(CFG.heldout)
    for ex in train:
        assert not any((o.colour, o.shape) in held for o in ex.objects)
        for qa in ex.qas:
            assert not any(f"{c} {s}" in qa.question for c, s in held)
    for ex in test_split:
        assert sum((o.colour, o.shape) in held for o in ex.objects) >= CFG.test_min_heldout
    asked = {qa.question for ex in test_split for qa in ex.qas if qa.family == "existence"}
    assert any(f"{c} {s}" in q for q in asked for c, s in held)


def _region_of(question: str) -> str:
    from fusion_vlm.demo.world import WHERE

    return next(r for r, phrase in sorted(WHERE.items(), key=lambda kv: -len(kv[1])) if phrase in question)


def test_answers_consistent_with_pixels(train):
    for ex in train[:60]:
        arr = np.asarray(ex.image)
        shapes = [o for o in ex.objects if o.kind == "shape"]
        for o in shapes:  # the drawn colour at the object's centre is the object's colour
            x, y = o.centre
            assert nearest_colour(tuple(int(v) for v in arr[y, x])) == o.colour
            assert np.abs(arr[y, x].astype(int) - PALETTE[o.colour]).max() <= CFG.colour_jitter
        by_region = {o.region: o for o in ex.objects}
        for qa in ex.qas:
            if qa.family == "attribute":
                o = by_region[_region_of(qa.question)]
                x, y = o.centre
                if "colour" in qa.question:
                    assert qa.answer == nearest_colour(tuple(int(v) for v in arr[y, x]))
                else:
                    assert qa.answer == o.shape
            elif qa.family == "counting":
                target = qa.question.split()[2]
                if target in PLURAL.values():
                    want = sum(PLURAL[o.shape] == target for o in shapes)
                else:
                    want = sum(o.colour == target for o in shapes)
                assert qa.answer == str(want)
            elif qa.family == "existence":
                colour, shape = qa.question[len("Is there a "):-1].split()
                assert (qa.answer == "yes") == any((o.colour, o.shape) == (colour, shape) for o in shapes)
            elif qa.family == "reading":
                assert qa.answer == by_region[_region_of(qa.question)].char
            else:
                assert qa.answer == describe(ex.objects)
                assert [p.split()[-1] for p in qa.answer.split(", ")][0] in {r.split()[-1] for r in REGIONS}


def test_glyphs_legible_in_local_views_only(train):
    n = 0
    for ex in train[:40]:
        w, h = ex.image.size
        plan = plan_views(w, h, CFG.view_size, CFG.max_local_views, CFG.hd_rule)
        local_scale, global_scale = plan.resized[0] / w, CFG.view_size / max(w, h)
        local = np.asarray(ex.image.resize(plan.resized, Image.BICUBIC)).min(axis=2)
        for o in ex.objects:
            if o.kind == "shape":
                continue
            n += 1
            x0, y0, x1, y1 = o.box
            height = y1 - y0
            assert height * local_scale >= 0.9 * CFG.glyph_local_px  # >= ~14 px tall in a local view
            assert height * global_scale <= 0.45 * CFG.glyph_local_px  # <= ~7 px tall in the global view
            lx0, ly0, lx1, ly1 = (int(v * local_scale) for v in o.box)
            crop = local[ly0:ly1 + 1, lx0:lx1 + 1]
            assert (crop < 90).sum() >= 25  # the glyph's dark strokes cover enough local-view pixels
            glyph = np.asarray(ex.image)[y0:y1, x0:x1].min(axis=2)
            assert (glyph < 60).sum() >= 20
    assert n >= 40


def test_evidence_decides_the_answer(train, test_split):
    """Each question's evidence phrases are enough to work out its answer (independent re-derivation)."""
    seen = Counter()
    for ex in train + test_split:
        phrases = {o.phrase() for o in ex.objects}
        for qa in ex.qas:
            assert set(qa.evidence) <= phrases, (qa, phrases)
            seen[qa.family] += 1
            if qa.family == "existence":
                asked = qa.question[len("Is there a "):-1]
                assert qa.answer == ("yes" if any(e.startswith(asked + " ") for e in qa.evidence) else "no"), qa
                assert all(asked.split()[0] in e.split()[:2] or asked.split()[1] in e.split()[:2] for e in qa.evidence)
            elif qa.family == "counting":
                assert qa.answer == str(len(qa.evidence)), qa
            elif qa.family == "attribute":
                (phrase,) = qa.evidence
                (region,) = [r for r in REGIONS if qa.question.endswith(f" {WHERE[r]}?")]
                assert qa.answer in phrase.split()[:2] and phrase.endswith(" " + region), qa
            elif qa.family == "reading":
                (phrase,) = qa.evidence
                (region,) = [r for r in REGIONS if qa.question.endswith(f" {WHERE[r]}?")]
                assert phrase == f"{qa.question.split()[1]} {qa.answer} {region}", qa
            else:
                assert ", ".join(qa.evidence) == qa.answer == ex.description
    assert set(seen) == set(FAMILIES)


def test_text_examples_are_deterministic_imageless_and_train_only():
    a, b = make_text_example(5, CFG), make_text_example(5, CFG)
    assert a.image is None and a.qas == b.qas and a.objects == b.objects
    assert make_text_example(6, CFG).objects != a.objects
    pairs = {(o.colour, o.shape) for i in range(300) for o in make_text_example(i, CFG).objects if o.kind == "shape"}
    assert not pairs & set(CFG.heldout) and len(pairs) == len(CFG.colours) * len(CFG.shapes) - len(CFG.heldout)


def test_export_llava(tmp_path, train):
    path = export_llava(train[:5], tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in records] == [ex.id for ex in train[:5]]
    for r, ex in zip(records, train[:5]):
        conv = r["conversations"]
        assert conv[0] == {"from": "human", "value": "<image>\n" + ex.qas[0].question}
        assert [c["from"] for c in conv] == ["human", "gpt"] * len(ex.qas)
        assert [c["value"] for c in conv[1::2]] == [qa.answer for qa in ex.qas]
        assert "<image>" not in "".join(c["value"] for c in conv[2:])
        assert r["family"] == [qa.family for qa in ex.qas]
        img = Image.open(tmp_path / r["image"])
        assert img.size == ex.image.size and np.array_equal(np.asarray(img), np.asarray(ex.image))


def test_score_normalisation():
    assert score("Red.", "red", "attribute") and not score("dark red", "red", "attribute")
    assert score("Yes, there is.", "yes", "existence") and not score("no", "yes", "existence")
    assert score("Well... no!", "no", "existence") and not score("maybe", "no", "existence")
    assert score("There are 2 circles", "2", "counting") and score("two", "2", "counting")
    assert not score("3", "2", "counting") and not score("none", "0", "counting")
    assert score("K", "k", "reading")
    truth = "red square top left, letter k top right"
    assert score("Red square top left, letter K top right.", truth, "description")
    assert not score("red square top left", truth, "description")
    assert description_f1("red square top left", truth) == pytest.approx(2 / 3)
    assert description_f1(truth, truth) == 1.0 and description_f1("", truth) == 0.0
    with pytest.raises(ValueError):
        score("x", "x", "colour")


def test_majority_baseline(train, test_split):
    base = majority_baseline(train, test_split)
    assert set(base) == set(FAMILIES)
    assert 0.4 <= base["existence"] <= 0.6
    assert base["description"] == 0.0 and base["reading"] < 0.2 and base["attribute"] < 0.35
    assert all(0.0 <= v <= 1.0 for v in base.values())
    common = Counter(qa.answer for ex in train for qa in ex.qas if qa.family == "counting").most_common(1)[0][0]
    truth = [qa.answer for ex in test_split for qa in ex.qas if qa.family == "counting"]
    assert base["counting"] == pytest.approx(truth.count(common) / len(truth))


def _shape(region, colour, shape):
    return WorldObject(region, "shape", (0, 0, 1, 1), shape=shape, colour=colour)


def _scene():
    """Hand-made scenes: (train, test) with known answers for the shortcut rules."""
    objs_a = [_shape("top left", "red", "square"), _shape("centre", "blue", "circle"),
              _shape("bottom right", "red", "circle"), WorldObject("top right", "letter", (0, 0, 1, 1), char="k")]
    objs_b = [_shape("left", "green", "triangle")]
    test = [
        Example("test-0", None, [
            QA("attribute", "What colour is the shape in the centre?", "blue"),      # commonest: red -> wrong
            QA("attribute", "What shape is in the top left?", "square"),            # commonest: circle -> wrong
            QA("existence", "Is there a blue square?", "no"),                       # both occur -> yes: wrong
            QA("existence", "Is there a red circle?", "yes"),                       # yes: right
            QA("counting", "How many circles are there?", "2"),                     # present -> 1: wrong
            QA("counting", "How many green shapes are there?", "0"),                # absent -> 0: right
            QA("reading", "What letter is written in the top right?", "k"),         # majority "q": wrong
            QA("description", "Describe the image.", describe(objs_a)),
        ], objs_a),
        Example("test-1", None, [
            QA("attribute", "What colour is the shape on the left?", "green"),      # right
            QA("counting", "How many triangles are there?", "1"),                   # right
            QA("description", "Describe the image.", describe(objs_b)),
        ], objs_b),
    ]
    train = [Example("train-0", None, [QA("attribute", "q", "red"), QA("attribute", "q", "red"),
                                       QA("attribute", "q", "blue"), QA("existence", "q", "no"),
                                       QA("counting", "q", "1"), QA("reading", "q", "q"),
                                       QA("description", "Describe the image.", "red square top left")], [])]
    return train, test


def test_shortcut_answers_by_hand():
    train, test = _scene()
    maj = {"attribute": "red", "existence": "no", "counting": "1", "reading": "q", "description": "x"}
    got = [shortcut_answer("commonest", qa, test[0].objects, maj) for qa in test[0].qas]
    # red 2 x, blue 1 x -> red; circle 2 x -> circle; blue and square each occur -> yes; red circle -> yes;
    # circles present -> 1; no green shape -> 0; reading and description fall back to the majority answer
    assert got == ["red", "circle", "yes", "yes", "1", "0", "q", "x"]
    assert [shortcut_answer("majority", qa, test[0].objects, maj) for qa in test[0].qas] == [
        "red", "red", "no", "no", "1", "1", "q", "x"]
    with pytest.raises(ValueError, match="rule='oracle'"):
        shortcut_answer("oracle", test[0].qas[0], test[0].objects, maj)


def test_shortcut_rule_scores_by_hand():
    train, test = _scene()
    rules = shortcut_rules(train, test)
    com, maj = rules["commonest"], rules["majority"]
    # commonest: attribute right on test-1 only (1 of 3); existence 1 of 2; counting 2 of 3; reading 0 of 1
    assert (com["attribute"]["correct"], com["attribute"]["image"]) == ([0, 0, 1], [0, 0, 1])
    assert com["existence"]["accuracy"] == 50.0 and com["counting"]["correct"] == [0, 1, 1]
    assert com["reading"]["accuracy"] == 0.0
    # majority (train: red, no, 1, q, "red square top left"): attribute red/red/red -> 0, 0, 0;
    # existence no/no -> 1, 0; counting 1/1/1 -> 0, 0, 1
    assert maj["attribute"]["correct"] == [0, 0, 0] and maj["existence"]["correct"] == [1, 0]
    assert maj["counting"]["correct"] == [0, 0, 1]
    # description by item F1: "red square top left" vs test-0's 4 items -> 2*1/(1+4) = 0.4; vs test-1's -> 0
    assert maj["description"]["score"] == pytest.approx([0.4, 0.0])
    assert maj["description"]["metric"] == "f1" and maj["description"]["value"] == pytest.approx(20.0)
    assert maj["description"]["accuracy"] == 0.0  # exact match stays in the record
    # "all": mean over the 11 questions of the graded score (0/1, F1 for descriptions)
    assert maj["all"]["value"] == pytest.approx(100 * (0 + 1 + 0 + 0 + 1 + 0 + 0.4 + 0) / 11)
    assert maj["all"]["n"] == 11 and len(maj["all"]["score"]) == 11


def test_family_scores_order_and_metrics():
    recs = [{"family": "description", "image": 1, "correct": 0, "score": 0.5},
            {"family": "attribute", "image": 0, "correct": 1, "score": 1.0},
            {"family": "attribute", "image": 2, "correct": 0, "score": 0.0}]
    out = family_scores(recs)
    assert list(out) == ["attribute", "description", "all"]
    assert out["attribute"] == {"accuracy": 50.0, "n": 2, "correct": [1, 0], "image": [0, 2], "metric": "accuracy",
                                "value": 50.0}
    assert out["description"]["f1"] == 50.0 and out["description"]["score"] == [0.5]
    assert out["all"]["image"] == [0, 2, 1] and out["all"]["value"] == pytest.approx(100 * 1.5 / 3)


# ------------------------------------------------------------------ the demo's world: 4x4 layout, no global shortcut
def _demo_world() -> WorldConfig:
    from fusion_vlm.demo.config import load_demo_config

    return load_demo_config("full").world


@pytest.fixture(scope="module")
def rich():
    return make_examples("train", 300, _demo_world())


def test_cell_regions_by_hand():
    from fusion_vlm.demo.world import cell_region

    assert [cell_region(i, 3) for i in range(9)] == list(REGIONS)
    # 4x4: row/col centres at 1/8, 3/8, 5/8, 7/8 -> thirds 0, 1, 1, 2
    assert [cell_region(i, 4) for i in range(16)] == [
        "top left", "top", "top", "top right", "left", "centre", "centre", "right",
        "left", "centre", "centre", "right", "bottom left", "bottom", "bottom", "bottom right"]


def _named(question: str) -> str | None:
    """The shape kind or colour an attribute question names besides its region ("the circle ..."), or None."""
    words = question.split()
    if question.startswith("What colour is the ") and words[4] != "shape":
        return words[4]
    if question.startswith("What shape is the "):
        return words[4]
    return None


def test_rich_world_questions_refer_to_one_object_and_match_the_pixels(rich):
    w = _demo_world()
    assert w.grid == 4 and len({ex.objects[0].cell for ex in rich}) > 9
    forms, counts = Counter(), Counter()
    for ex in rich[:150]:
        arr = np.asarray(ex.image)
        shapes = [o for o in ex.objects if o.kind == "shape"]
        assert len({o.cell for o in ex.objects}) == len(ex.objects)  # one item per cell
        for qa in ex.qas:
            if qa.family == "attribute":
                region = _region_of(qa.question)
                named, colour_q = _named(qa.question), qa.question.startswith("What colour")
                here = [o for o in shapes if o.region == region and (named is None or named in (o.shape, o.colour))]
                assert len(here) == 1, (qa.question, ex.description)  # exactly one shape fits the question
                (o,) = here
                if named is None:
                    assert sum(s.region == region for s in shapes) == 1
                else:  # the named kind/colour alone would not decide the answer: the region is needed
                    same = [s for s in shapes if named in (s.shape, s.colour)]
                    assert len({s.colour if colour_q else s.shape for s in same}) > 1
                if colour_q:
                    x, y = o.centre
                    assert qa.answer == o.colour == nearest_colour(tuple(int(v) for v in arr[y, x]))
                else:
                    assert qa.answer == o.shape
                forms["named" if named else "region"] += 1
            elif qa.family == "counting":
                if qa.question.startswith("How many shapes are "):
                    assert qa.answer == str(sum(o.region == _region_of(qa.question) for o in shapes))
                    forms["count in region"] += 1
                counts[int(qa.answer)] += 1
            elif qa.family == "reading":
                region = _region_of(qa.question)
                (o,) = [g for g in ex.objects if g.region == region and g.kind == qa.question.split()[1]]
                assert qa.answer == o.char
    assert forms["named"] > 0 and forms["region"] > 0 and forms["count in region"] > 0
    assert max(int(qa.answer) for ex in rich for qa in ex.qas if qa.family == "counting") >= 9


def test_rich_world_negatives_need_binding_and_rules_stay_far_from_perfect(rich):
    def hard_share(examples):
        hard = total = 0
        for ex in examples:
            shapes = [o for o in ex.objects if o.kind == "shape"]
            for qa in ex.qas:
                if qa.family == "existence" and qa.answer == "no":
                    c, s = qa.question[len("Is there a "):-1].split()
                    total += 1
                    hard += any(o.colour == c for o in shapes) and any(o.shape == s for o in shapes)
        return hard / total

    soft = make_examples("train", 150, replace(_demo_world(), hard_negatives=False))
    assert hard_share(rich[:150]) > 0.75 and hard_share(rich[:150]) > hard_share(soft) + 0.2
    # the image-level rule that beat every model in the 3x3 world (existence 89 %, attribute 72 %)
    rules = shortcut_rules(rich[:150], make_examples("test", 100, _demo_world()))
    com = rules["commonest"]
    assert com["existence"]["value"] < 65 and com["attribute"]["value"] < 60, {f: v["value"] for f, v in com.items()}


def test_commonest_rule_uses_the_named_kind():
    objs = [WorldObject("top left", "shape", (0, 0, 9, 9), shape="circle", colour="red", cell=0),
            WorldObject("left", "shape", (0, 20, 9, 29), shape="circle", colour="blue", cell=4),
            WorldObject("left", "shape", (0, 40, 9, 49), shape="circle", colour="blue", cell=8),
            WorldObject("right", "shape", (40, 20, 49, 29), shape="square", colour="red", cell=7),
            WorldObject("right", "shape", (40, 40, 49, 49), shape="square", colour="red", cell=11),
            WorldObject("bottom", "shape", (20, 60, 29, 69), shape="square", colour="red", cell=13)]
    maj = {"attribute": "green"}
    ask = lambda q: shortcut_answer("commonest", QA("attribute", q, "?"), objs, maj)  # noqa: E731
    assert ask("What colour is the shape in the top left?") == "red"  # red 4 x, blue 2 x
    assert ask("What colour is the circle in the top left?") == "blue"  # circles: blue 2 x, red 1 x
    assert ask("What shape is the red shape in the top left?") == "square"  # red: square 3 x, circle 1 x
    assert ask("What shape is in the top left?") == "circle"  # 3 x each: the first in reading order
