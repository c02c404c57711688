"""Scoring the demo's answers: normalisation, per-family rules, item F1 for descriptions, per-question
records and their per-family summaries, and the shortcut rules that answer without a model.

Every figure of the demo's report goes through :func:`prediction_record` and :func:`family_scores`;
the shortcut rules (:data:`SHORTCUTS`) are scored the same way so that they pair up with the models'
answers question by question.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from fusion_vlm.demo.world import FAMILIES, PLURAL, QA, Example, WorldObject, reading_order


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
                 "colour/shape (among the shapes of the named kind/colour when the question names one), "
                 "existence 'yes' iff the colour and the shape each occur (not necessarily together), "
                 "counting 1 if the asked colour/shape occurs else 0; counting in a region, reading and "
                 "description have no such shortcut and take the majority answer",
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
    shapes = [o for o in reading_order(objects) if o.kind == "shape"]
    colours, kinds = [o.colour for o in shapes], [o.shape for o in shapes]
    fallback = majority.get(qa.family, "")
    if rule == "majority" or not shapes:
        return fallback
    q = qa.question
    if qa.family == "attribute":
        named = re.match(r"What colour is the (\w+) ", q) or re.match(r"What shape is the (\w+) shape ", q)
        if named and named[1] in kinds + colours:  # the commonest value among the shapes the question names
            key = "shape" if q.startswith("What colour") else "colour"
            shapes = [o for o in shapes if getattr(o, key) == named[1]]
        return _commonest([o.colour if q.startswith("What colour") else o.shape for o in shapes])
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
