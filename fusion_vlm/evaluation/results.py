"""VLMEvalKit evaluation results -> ``{"<metric>@<Benchmark Name>": score}`` (pure, duck-typed).

``dataset.evaluate`` returns a dict or a pandas DataFrame whose shape depends on
the benchmark. The names produced here follow the paper's Appendix D tables and
``paper_appendix_scores.csv``: the benchmark name has ``_`` replaced by a space
(``AI2D_TEST`` -> ``AI2D TEST``) and every score is a percentage (VLMEvalKit's
multiple-choice accuracy is a fraction and is scaled by 100), except MME's
summed scores and OCRBench's ``Final Score`` (a count out of 1000).

* MME: ``Overall`` = perception + reasoning, ``Perception``, ``Cognition`` (= reasoning);
* HallusionBench: ``aAcc``, ``fAcc``, ``qAcc`` of the ``Overall`` split and ``Overall`` = their mean;
* POPE: ``Overall`` (F1), ``acc``, ``precision``, ``recall`` of the ``Overall`` split;
* OCRBench: ``Final Score``;
* COCO_VAL: ``BLEU-1``, ``BLEU-4``, ``ROUGE-L``, ``CIDEr``;
* anything else: ``Overall`` (multiple choice, yes/no, short-answer VQA).
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def display_name(dataset: str) -> str:
    """The benchmark name as written in the paper's tables (``ChartQA_TEST`` -> ``ChartQA TEST``)."""
    return dataset.replace("_", " ")


def _is_frame(obj) -> bool:
    return hasattr(obj, "columns") and hasattr(obj, "iloc")


def _row(result, prefer=("Overall", "none", "test", "TEST")) -> dict:
    """One row of a result table as a dict: the split named in ``prefer`` if any, else the first."""
    if isinstance(result, Mapping):
        return dict(result)
    if not _is_frame(result):
        raise ValueError(f"unrecognised evaluation result of type {type(result).__name__}")
    if len(result) == 0:
        raise ValueError("evaluation result table is empty")
    if "split" in result.columns:
        splits = [str(s) for s in result["split"]]
        for p in prefer:
            if p in splits:
                return result.iloc[splits.index(p)].to_dict()
    return result.iloc[0].to_dict()


def _num(value, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"score {what}={value!r} is not a number") from err
    if math.isnan(x):
        raise ValueError(f"score {what} is NaN")
    return x


def extract_metrics(dataset: str, result, kind: str | None = None) -> dict[str, float]:
    """Turn one ``dataset.evaluate`` result into paper-style ``metric@Benchmark`` scores.

    ``kind`` is the prompt kind of the dataset (see :func:`fusion_vlm.evaluation.prompts.dataset_kind`);
    ``'mcq'`` results are fractions and are scaled to percent.
    """
    name = display_name(dataset)
    row = _row(result)
    out: dict[str, float] = {}
    if "MME" in dataset and "perception" in row and "reasoning" in row:
        p, r = _num(row["perception"], "perception"), _num(row["reasoning"], "reasoning")
        out = {"Overall": p + r, "Perception": p, "Cognition": r}
    elif "Hallusion" in dataset and {"aAcc", "fAcc", "qAcc"} <= set(row):
        accs = {k: _num(row[k], k) for k in ("aAcc", "fAcc", "qAcc")}
        out = {**accs, "Overall": sum(accs.values()) / 3}
    elif "POPE" in dataset and "Overall" in row:
        out = {k: _num(row[k], k) for k in ("Overall", "acc", "precision", "recall") if k in row}
    elif "Final Score" in row:
        out = {"Final Score": _num(row["Final Score"], "Final Score")}
    elif "Bleu" in row or "CIDEr" in row:
        bleu = row.get("Bleu")
        if bleu is not None:
            bleu = list(bleu)
            out["BLEU-1"] = _num(bleu[0], "Bleu[0]")
            if len(bleu) >= 4:
                out["BLEU-4"] = _num(bleu[3], "Bleu[3]")
        if "ROUGE_L" in row:
            out["ROUGE-L"] = _num(row["ROUGE_L"], "ROUGE_L")
        if "CIDEr" in row:
            out["CIDEr"] = _num(row["CIDEr"], "CIDEr")
    elif "Overall" in row:
        overall = _num(row["Overall"], "Overall")
        out = {"Overall": overall * 100 if kind == "mcq" else overall}
    else:
        raise ValueError(f"no known score in the {dataset} result (columns: {', '.join(map(str, row))})")
    return {f"{metric}@{name}": value for metric, value in out.items()}
