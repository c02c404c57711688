"""Score a model on the synthetic world's test split, per question family, and keep every prediction.

Every question is asked on its own with N fused tokens (as a benchmark asks
it, ``generate(conversation=False)``), so the vision prefix of each image is
computed once and shared by its questions. Descriptions are scored by item F1
(graded, :func:`fusion_vlm.demo.world.description_f1`), every other family by
its exact rule (:func:`fusion_vlm.demo.world.score`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from fusion_vlm.demo.world import FAMILIES, Example, family_scores, prediction_record


@torch.no_grad()
def evaluate(model, examples: list[Example], n_queries: int, use_question: bool, batch_images: int = 16,
             max_new_tokens: int = 48, predictions: list | None = None) -> dict[str, dict]:
    """Scores per family: {family: {"accuracy", "n", "correct", "image", "metric", "value"}} and "all"
    (:func:`fusion_vlm.demo.world.family_scores`).

    ``accuracy``: exact-match accuracy (%); ``correct`` (0/1) and ``image`` (index of the question's image
    in ``examples``) list the family's questions in order (the same order for every model and N), for
    paired and image-level bootstraps; ``metric``/``value``: the family's reported metric and its value
    (%): accuracy, or item F1 for descriptions, whose per-question F1 in [0, 1] is in ``score`` (``f1``: its
    mean in %). "all": ``value`` is the mean of every question's graded score (F1 for descriptions, 0/1
    otherwise), listed in ``score``. ``predictions``: when a list, one record per question
    (:func:`fusion_vlm.demo.world.prediction_record`) is appended, in the order of "all".
    """
    model.eval()
    records = []
    for start in range(0, len(examples), batch_images):
        chunk = examples[start:start + batch_images]
        answers = model.generate([ex.image for ex in chunk], [[qa.question for qa in ex.qas] for ex in chunk],
                                 max_new_tokens=max_new_tokens, n_queries=n_queries, n_queries_later=n_queries,
                                 use_question=use_question, conversation=False)
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
                label: str = "") -> dict:
    """Evaluate ``load_model()`` (called only when needed) at N = ``n_queries`` unless ``json_path`` and its
    predictions exist; writes both (:func:`write_eval`) and returns the scores JSON's content."""
    path = Path(json_path)
    if not (path.is_file() and items_path(path).is_file()):
        predictions = []
        scores = evaluate(load_model(), examples, n_queries, use_question, batch_images, max_new_tokens,
                          predictions)
        write_eval(path, scores, predictions)
        print(f"[demo] N={n_queries:<3} {label:<7} " + "  ".join(
            f"{f} {v['value']:.1f}" for f, v in scores.items()), flush=True)
    return json.loads(path.read_text())
