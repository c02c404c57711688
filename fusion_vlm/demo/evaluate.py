"""Score a model on the synthetic world's test split, per question family, and keep every prediction.

Every question is asked on its own with N fused tokens (as a benchmark asks
it, ``generate(conversation=False)``), so the vision prefix of each image is
computed once and shared by its questions. Descriptions are scored by item F1
(graded, :func:`fusion_vlm.demo.scoring.description_f1`), every other family by
its exact rule (:func:`fusion_vlm.demo.scoring.score`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from fusion_vlm.demo.scoring import family_scores, prediction_record
from fusion_vlm.demo.world import FAMILIES, Example


LONG_ANSWERS = ("description",)  # families whose answers run long; the others get short_new_tokens


@torch.no_grad()
def evaluate(model, examples: list[Example], n_queries: int, use_question: bool, batch_images: int = 16,
             max_new_tokens: int = 48, predictions: list | None = None,
             short_new_tokens: int | None = None) -> dict[str, dict]:
    """Scores per family: {family: {"accuracy", "n", "correct", "image", "metric", "value"}} and "all"
    (:func:`fusion_vlm.demo.scoring.family_scores`).

    ``accuracy``: exact-match accuracy (%); ``correct`` (0/1) and ``image`` (index of the question's image
    in ``examples``) list the family's questions in order (the same order for every model and N), for
    paired and image-level bootstraps; ``metric``/``value``: the family's reported metric and its value
    (%): accuracy, or item F1 for descriptions, whose per-question F1 in [0, 1] is in ``score`` (``f1``: its
    mean in %). "all": ``value`` is the mean of every question's graded score (F1 for descriptions, 0/1
    otherwise), listed in ``score``. ``predictions``: when a list, one record per question
    (:func:`fusion_vlm.demo.scoring.prediction_record`) is appended, in the order of "all".

    Questions of :data:`LONG_ANSWERS` families are generated with up to ``max_new_tokens`` new tokens, the
    others (one-word answers) in a separate call with up to ``short_new_tokens`` (None: the same), so that
    one description does not make a whole batch of yes/no answers decode its length.
    """
    model.eval()
    records = []
    short = max_new_tokens if short_new_tokens is None else short_new_tokens
    for start in range(0, len(examples), batch_images):
        chunk = examples[start:start + batch_images]
        answers = [[""] * len(ex.qas) for ex in chunk]
        for long in (False, True):
            asked = [[j for j, qa in enumerate(ex.qas) if (qa.family in LONG_ANSWERS) == long] for ex in chunk]
            keep = [i for i, js in enumerate(asked) if js]
            if not keep:
                continue
            out = model.generate([chunk[i].image for i in keep], [[chunk[i].qas[j].question for j in asked[i]]
                                                                  for i in keep],
                                 max_new_tokens=max_new_tokens if long else short, n_queries=n_queries,
                                 n_queries_later=n_queries, use_question=use_question, conversation=False)
            for i, preds in zip(keep, out):
                for j, pred in zip(asked[i], preds):
                    answers[i][j] = pred
        for i, (ex, preds) in enumerate(zip(chunk, answers), start):
            records += [prediction_record(ex, i, qa, pred) for qa, pred in zip(ex.qas, preds)]
    records.sort(key=lambda r: FAMILIES.index(r["family"]))  # stable: question order within a family
    if predictions is not None:
        predictions += records
    return family_scores(records)


def items_path(json_path: str | Path) -> Path:
    """Where the per-question predictions of an evaluation JSON live: ``<name>.items.jsonl`` beside it."""
    p = Path(json_path)
    return p.with_name(p.stem + ".items.jsonl")


def write_eval(json_path: str | Path, scores: dict, predictions: list[dict]) -> None:
    """Write the scores JSON and the predictions (one JSON line each) beside it; predictions first, so
    that a JSON on disk always has its predictions."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items_path(path).write_text("".join(json.dumps(r) + "\n" for r in predictions))
    path.write_text(json.dumps(scores, indent=2))


def evaluate_to(json_path: str | Path, load_model: Callable[[], object], examples: list[Example], n_queries: int,
                use_question: bool, batch_images: int = 16, max_new_tokens: int = 48,
                label: str = "", short_new_tokens: int | None = None) -> dict:
    """Evaluate ``load_model()`` (called only when needed) at N = ``n_queries`` unless ``json_path`` and its
    predictions exist; writes both (:func:`write_eval`) and returns the scores JSON's content."""
    path = Path(json_path)
    if not (path.is_file() and items_path(path).is_file()):
        predictions = []
        scores = evaluate(load_model(), examples, n_queries, use_question, batch_images, max_new_tokens,
                          predictions, short_new_tokens)
        write_eval(path, scores, predictions)
        print(f"[demo] N={n_queries:<3} {label:<7} " + "  ".join(
            f"{f} {v['value']:.1f}" for f, v in scores.items()), flush=True)
    return json.loads(path.read_text())
