"""Reading the demo's results: per-(mode, N) evaluation dicts, their figures and bootstrap intervals.

``results`` maps (mode, N) -> the dict of :func:`fusion_vlm.demo.evaluate.evaluate` ({family: {"value",
"correct", "image", ...}}); N is None for a mode that runs at one setting (e.g. all_tokens). Shared by the
report's tables (:mod:`fusion_vlm.demo.report`) and its extra sections (:mod:`fusion_vlm.demo.report_sections`).
"""

from __future__ import annotations

import numpy as np

from fusion_vlm.analysis.intervals import resample_means

LOCALIZED = ("attribute", "reading")  # questions that point at a region of the image
GLOBAL = "description"  # the question that needs the whole image
SMALL_N = 4  # "small N" of the question-fusion verdict (default; the config's eval.small_n)
MODE_NAMES = {"vqq": "vision+question+queries", "vq_ft": "vision+queries, fine-tuned without question",
              "vq": "vision+queries, question dropped (no fine-tune)"}
ELASTIC = "elastic"  # the stage-2 model (N drawn per micro-batch) at every N, no stage-3 fine-tune
N_BOOT = 2000  # bootstrap replicates of the report's 95 % intervals (over test images, seed 0; eval.n_boot)
R2_MIN = 0.5  # a curve "follows (a/N)^b" when b's interval lies below 0 and R² (log space) >= this
B_TOL = 1e-9  # |b| below this is 0 (a flat curve's replicates differ from 0 by rounding only)
METRIC_LABEL = {"accuracy": "Accuracy", "f1": "F1", "score": "Score"}


# ---------------------------------------------------------------- reading one evaluation
def value(v: dict) -> float:
    """The reported figure (%) of one family result: ``value`` (accuracy, or item F1 for descriptions),
    falling back to ``f1`` then ``accuracy`` for results written before ``value`` existed."""
    return float(v.get("value", v.get("f1", v["accuracy"])))


def items(v: dict) -> list[float] | None:
    """Per-question scores behind :func:`value` (``score`` if graded, else ``correct``); None when missing
    (e.g. an F1 family without per-question F1)."""
    if "score" in v:
        return v["score"]
    if "f1" in v or v.get("metric", "accuracy") not in ("accuracy",) or "correct" not in v:
        return None
    return v["correct"]


def metric_name(fam: str, v: dict | None = None) -> str:
    """Column name of a family in scores.csv: Accuracy@fam, F1@description, Score@all."""
    metric = (v or {}).get("metric") or ("score" if fam == "all" else "f1" if fam == GLOBAL else "accuracy")
    return f"{METRIC_LABEL.get(metric, metric.capitalize())}@{fam}"


def n_key(n) -> tuple:
    """Sort key of an N: numbers ascending, then None (a mode without a query count, e.g. all tokens)."""
    return (n is None, n if n is not None else 0)


def n_label(n) -> str:
    """'N=16', or 'all tokens' for a mode run without N (N = None)."""
    return "all tokens" if n is None else f"N={n}"


def as_rules(rules: dict | None) -> dict:
    """Shortcut rules as {rule: {family: result}}; an old-style majority baseline {family: fraction} becomes
    one rule ``majority`` without per-question scores."""
    if rules and all(isinstance(v, (int, float)) for v in rules.values()):
        return {"majority": {f: {"accuracy": 100.0 * v, "value": 100.0 * v} for f, v in rules.items()}}
    return dict(rules or {})


def _families(results: dict) -> list[str]:
    """The question families of ``results`` in their order, "all" last."""
    seen = dict.fromkeys(f for fams in results.values() for f in fams if f != "all")
    return list(seen) + ["all"]


def mode_order(results: dict) -> list[str]:
    """Modes of ``results``: the paper's (vqq, vq_ft, vq), elastic, then any other mode alphabetically."""
    modes = {m for m, _ in results}
    known = [m for m in (*MODE_NAMES, ELASTIC) if m in modes]
    return known + sorted(modes - set(known))


def mode_ns(results: dict) -> dict[str, list]:
    """{mode: its N values ascending}."""
    out: dict[str, list] = {}
    for m, n in results:
        out.setdefault(m, []).append(n)
    return {m: sorted(ns, key=n_key) for m, ns in out.items()}


# ---------------------------------------------------------------- intervals
def combo(plus: list[dict], minus: list[dict] = (), n_boot: int = N_BOOT, seed: int = 0):
    """Mean of the ``plus`` results' figures minus the mean of the ``minus`` ones, with its 95 % bootstrap
    interval over test images (the same images drawn for every row, so differences are paired):
    (point, low, high) in points, or None when per-question scores are missing or not aligned."""
    rows = list(plus) + list(minus)
    xs = [items(r) for r in rows]
    if not plus or any(x is None or "image" not in r for x, r in zip(xs, rows)):
        return None
    img = rows[0]["image"]
    if len(xs[0]) < 2 or any(len(x) != len(xs[0]) or r["image"] != img for x, r in zip(xs, rows)):
        return None
    x = np.array(xs, float)
    w = np.array([1 / len(plus)] * len(plus) + [-1 / max(len(minus), 1)] * len(minus))
    reps = 100 * resample_means(x, n_boot, seed, groups=img) @ w  # [B]
    lo, hi = np.percentile(reps, [2.5, 97.5])
    clean = lambda t: 0.0 if abs(t) < 1e-9 else float(t)  # noqa: E731  (no "-0.0" from rounding)
    return clean(100 * x.mean(axis=1) @ w), clean(lo), clean(hi)


def cell(v: dict | None, n_boot: int = N_BOOT) -> str:
    """One result's figure with its 95 % interval ('-' if absent; the bare figure without per-question scores)."""
    if v is None:
        return "-"
    iv = combo([v], n_boot=n_boot)
    return f"{value(v):.1f}" if iv is None else fmt(iv)


def fmt(iv, signed: bool = False) -> str:
    """'57.4 [55.1, 59.8]' (signed: '+1.2 [-0.3, +2.6]'), '-' for None."""
    if iv is None:
        return "-"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(iv[0])} [{f.format(iv[1])}, {f.format(iv[2])}]"


def decide(iv) -> str:
    """yes (interval above 0), no (below 0), or 'not distinguishable from 0'."""
    if iv is None:
        return "not computable"
    return "yes" if iv[1] > 0 else "no" if iv[2] < 0 else "not distinguishable from 0"
