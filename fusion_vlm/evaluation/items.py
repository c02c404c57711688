"""Per-item results of an evaluation: what was asked, answered and judged, kept next to the scores.

A score table alone cannot be re-judged or bootstrapped; the items behind it can,
without rerunning a model. One JSON object per line (``*.items.jsonl``)::

    {"mode": "vqq", "n_queries": 64, "dataset": "POPE", "index": "17", "question": "...",
     "prediction": "Yes", "answer": "No", "score": 0.0, "score_source": "..._auxmatch.tsv:score"}

``score`` is the judge's own per-item score (1/0 for exact match, graded in
[0, 1] for VQA) or ``null`` where the judge gives none (captions, GPT judges
that only return totals); ``category`` and ``group`` (the cluster an item
belongs to, e.g. its image) are kept when known. VLMEvalKit leaves per-item
judgements in files next to its prediction file; :func:`items_from_tables`
reads them from plain row dicts, so this module imports neither VLMEvalKit nor
pandas. Where they go: ``<sweep>/cells/<mode>_N<n>/<dataset>.items.jsonl``,
``<work-dir>/<model>/<dataset>.items.jsonl`` and, gathered, ``<csv stem>.items.jsonl``
beside every scores CSV (read by ``fusion-vlm fit``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from fusion_vlm.errors import DataError

#: per-item score columns VLMEvalKit writes, first found wins: Y/N (``_auxmatch``), MCQ (``_result``), VQA
SCORE_COLUMNS = ("score", "hit", "eval_score")
KEPT = ("question", "prediction", "answer", "category")  # fields copied from the prediction table
KEY_FIELDS = ("mode", "n_queries", "dataset", "index")


def item_path(csv_path: str | Path) -> Path:
    """Where the items of a scores CSV go: ``scores.csv`` -> ``scores.items.jsonl``."""
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}.items.jsonl")


def _value(x):
    """A JSON-able plain value: numpy scalars unwrapped, NaN -> None."""
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (ValueError, TypeError):
            pass
    if isinstance(x, float) and math.isnan(x):
        return None
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def as_score(x) -> float | None:
    """A per-item judgement as a float: True/False (also as text) -> 1/0, numbers as they are, else None."""
    x = _value(x)
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        t = x.strip().lower()
        if t in ("true", "false"):
            return float(t == "true")
        try:
            v = float(t)
        except ValueError:
            return None
        return None if math.isnan(v) else v
    return None


def _score_table(judged: Iterable[tuple[str, list[dict]]]) -> tuple[dict[str, float | None], str] | None:
    """The first judged table with a unique ``index`` and a score column, as ({index: score}, source)."""
    tables = list(judged)
    for column in SCORE_COLUMNS:
        for name, rows in tables:
            if not rows or "index" not in rows[0] or column not in rows[0]:
                continue
            keys = [str(_value(r["index"])) for r in rows]
            if len(set(keys)) != len(keys):
                continue  # e.g. circular MCQ: several rows per question
            return {k: as_score(r[column]) for k, r in zip(keys, rows)}, f"{name}:{column}"
    return None


def items_from_tables(predictions: list[Mapping], judged: Iterable[tuple[str, list[Mapping]]] = ()) -> list[dict]:
    """One item record per prediction row (keys: index, question, prediction, answer, category, score, score_source).

    ``predictions``: rows of VLMEvalKit's prediction file (``index`` and ``prediction`` at least);
    ``judged``: (file name, rows) of the per-item files its ``evaluate`` left, searched for a
    score column (:data:`SCORE_COLUMNS`); without one every ``score`` is None.
    """
    found = _score_table(judged)
    scores, source = found if found else ({}, None)
    out = []
    for row in predictions:
        if "index" not in row:
            raise DataError("prediction table has no 'index' column")
        rec = {"index": str(_value(row["index"]))}
        rec.update({k: _value(row[k]) for k in KEPT if k in row})
        rec["score"] = scores.get(rec["index"])
        rec["score_source"] = source if rec["index"] in scores else None
        out.append(rec)
    return out


def tag_items(items: Iterable[Mapping], mode: str, n_queries: int, dataset: str) -> list[dict]:
    """Item records with their evaluation's key fields (mode, n_queries, dataset) first."""
    return [{"mode": mode, "n_queries": int(n_queries), "dataset": dataset,
             **{k: v for k, v in it.items() if k not in ("mode", "n_queries", "dataset")}} for it in items]


def write_items(path: str | Path, items: Iterable[Mapping]) -> Path:
    """Write item records as JSONL atomically (write then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(dict(it), ensure_ascii=False) + "\n" for it in items)
    os.replace(tmp, path)
    return path


def read_items(path: str | Path) -> list[dict]:
    """Item records of a ``*.items.jsonl`` file, or of every cell under a sweep folder (``cells/*/*.items.jsonl``).

    Raises ``FileNotFoundError`` for a missing path and ``DataError`` (file and line) for a bad record.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("cells/*/*.items.jsonl")) or sorted(path.glob("*.items.jsonl"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.items.jsonl files (nor cells/*/*.items.jsonl)")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such items file or folder")
    out = []
    for f in files:
        for line_no, rec in jsonl_records(f):
            missing = [k for k in KEY_FIELDS if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise DataError(f"{f}:{line_no}: item record lacks {', '.join(missing)}")
            out.append(rec)
    return out


def jsonl_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of every non-blank line of ``path``; a bad line is a one-line DataError."""
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not JSON ({err.msg})") from None
