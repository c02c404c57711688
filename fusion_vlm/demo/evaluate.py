"""Score a model on the synthetic world's test split, per question family.

Every question is asked on its own with N fused tokens (as a benchmark asks
it, ``generate(conversation=False)``), so the vision prefix of each image is
computed once and shared by its questions.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from fusion_vlm.demo.world import FAMILIES, Example, description_f1, score


@torch.no_grad()
def evaluate(model, examples: list[Example], n_queries: int, use_question: bool, batch_images: int = 16,
             max_new_tokens: int = 48) -> dict[str, dict[str, float]]:
    """Accuracy (%) per family: {family: {"accuracy", "n", "correct", "image"}} (+ "f1" for description), and
    "all". ``correct`` (0/1) and ``image`` (index of the question's image in ``examples``) list the family's
    questions in order (the same order for every model and N), for paired and image-level bootstraps."""
    model.eval()
    right, f1, image = defaultdict(list), [], defaultdict(list)
    for start in range(0, len(examples), batch_images):
        chunk = examples[start:start + batch_images]
        answers = model.generate([ex.image for ex in chunk], [[qa.question for qa in ex.qas] for ex in chunk],
                                 max_new_tokens=max_new_tokens, n_queries=n_queries, n_queries_later=n_queries,
                                 use_question=use_question, conversation=False)
        for i, (ex, preds) in enumerate(zip(chunk, answers), start):
            for qa, pred in zip(ex.qas, preds):
                right[qa.family].append(score(pred, qa.answer, qa.family))
                image[qa.family].append(i)
                if qa.family == "description":
                    f1.append(description_f1(pred, qa.answer))
    out = {fam: {"accuracy": 100.0 * sum(v) / len(v), "n": len(v), "correct": [int(x) for x in v],
                 "image": image[fam]}
           for fam, v in sorted(right.items(), key=lambda kv: FAMILIES.index(kv[0]))}
    if f1 and "description" in out:
        out["description"]["f1"] = 100.0 * sum(f1) / len(f1)
    every = [x for fam in out for x in out[fam]["correct"]]
    images = [i for fam in out for i in out[fam]["image"]]
    out["all"] = {"accuracy": 100.0 * sum(every) / max(len(every), 1), "n": len(every), "correct": every,
                  "image": images}
    return out
