"""Weak scaling law in token space: fit P(N) = (a / N)^b per benchmark (paper Section 5.1, Table 1).

The fit follows DESIGN.md section 6 exactly: with c = b log a the law reads
``log P = c - b log N``; the objective

    L(c, b) = sum_k (log P_k - c + b log N_k)^2

is minimised with ``scipy.optimize.minimize(method="BFGS")`` (default
options) and then ``a = exp(c / b)``.

Starting point. BFGS starts from the closed-form least-squares solution of the
same objective, so the result is the exact minimiser rather than wherever
BFGS's gradient tolerance stops it. This matters only for ``a``: ``c / b`` is
~ -135 for MME, so a change of 1e-6 in ``b`` moves the 4th digit of ``a``. No
starting point reproduces every printed ``a`` of the paper's Table 1 to its 5
digits from the Appendix D scores: those scores are rounded to 3 decimals and
that rounding alone moves ``log a`` by up to ~1e-2 (the authors fitted unrounded
scores). What does reproduce: every ``b`` to its 4 printed decimals, ``a`` to 2
significant digits (33 of 34 cells; 3 for 22), and ``a`` to all 5 digits where
the printed scores are exact (OCRBench, ChartQA, TextVQA, MME vqq). ``x0``
lets a caller choose another start.

``a`` is numerically wild (1e-68 .. 1e+49); when ``|c / b|`` exceeds the
float64 exponent range (``b`` ~ 0) the fit is flagged ``degenerate`` and ``a``
is reported as 0 or inf with a message, while ``c`` and ``b`` (which define
the curve) stay valid. :func:`evaluate` therefore uses ``c`` and ``b``.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

#: columns of the long score CSV (one row per metric, mode, N)
CSV_COLUMNS = ("metric", "mode", "n_queries", "score")


@dataclass(frozen=True)
class ScalingFit:
    """One fitted curve P(N) = (a / N)^b = exp(c - b log N).

    ``a``: scale in units of N (0.0 or inf when degenerate); ``b``: exponent
    (negative when P grows with N); ``c = b log a``: log-intercept (log P at
    N = 1); ``r2``: coefficient of determination of the fit in log space;
    ``n_points``: number of (N, P) points; ``degenerate``: True when a is not
    a finite positive float; ``message``: why (empty otherwise).
    """

    a: float
    b: float
    c: float
    r2: float
    n_points: int
    degenerate: bool = False
    message: str = ""

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready; inf written as the string 'inf')."""
        out = asdict(self)
        out["a"] = self.a if math.isfinite(self.a) else str(self.a)
        return out


def _log_space_objective(x: np.ndarray, log_n: np.ndarray, log_p: np.ndarray) -> float:
    c, b = x
    return float(np.sum((log_p - c + b * log_n) ** 2))


def fit_scaling_law(n_tokens, scores, x0=None) -> ScalingFit:
    """Fit P(N) = (a / N)^b in log space with BFGS (DESIGN.md section 6).

    ``n_tokens``: shape (K,), positive token counts N_k; ``scores``: shape
    (K,), positive performances P_k (any unit; b is unit-free, a is in units of
    N, c in log units of P). ``x0``: optional start (c0, b0); default the
    closed-form least-squares solution. Needs K >= 2 distinct N. Raises
    ValueError for non-positive, non-finite or too few values.
    """
    n = np.asarray(n_tokens, dtype=float).ravel()
    p = np.asarray(scores, dtype=float).ravel()
    if n.shape != p.shape:
        raise ValueError(f"n_tokens and scores differ in length ({n.size} vs {p.size})")
    if not (np.all(np.isfinite(n)) and np.all(np.isfinite(p))):
        raise ValueError("n_tokens and scores must be finite")
    if np.any(n <= 0) or np.any(p <= 0):
        raise ValueError("the log-space fit needs positive n_tokens and scores")
    if np.unique(n).size < 2:
        raise ValueError(f"need at least 2 distinct N to fit a power law, got {np.unique(n).tolist()}")
    log_n, log_p = np.log(n), np.log(p)
    if x0 is None:
        design = np.stack([np.ones_like(log_n), -log_n], axis=1)
        x0 = np.linalg.lstsq(design, log_p, rcond=None)[0]
    res = minimize(_log_space_objective, np.asarray(x0, dtype=float), args=(log_n, log_p), method="BFGS")
    c, b = (float(v) for v in res.x)
    ss_res = float(np.sum((log_p - c + b * log_n) ** 2))
    ss_tot = float(np.sum((log_p - log_p.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    a, degenerate, message = _scale_from(c, b)
    return ScalingFit(a=a, b=b, c=c, r2=r2, n_points=int(n.size), degenerate=degenerate, message=message)


def _scale_from(c: float, b: float) -> tuple[float, bool, str]:
    """a = exp(c / b), or (0/inf, True, why) when it is not a finite positive float."""
    if b == 0.0:
        return (math.inf, True, f"b = 0: P is flat at exp(c) = {math.exp(c):.6g}, a = exp(c/b) is undefined")
    log_a = c / b
    if log_a > 709.0 or log_a < -708.0:
        a = math.inf if log_a > 0 else 0.0
        return (a, True, f"b = {b:.4g} is ~0: a = exp(c/b) = exp({log_a:.4g}) "
                         f"{'overflows' if log_a > 0 else 'underflows'}; the curve is log P = {c:.4f} - b log N")
    return (math.exp(log_a), False, "")


def evaluate(fit: ScalingFit, n_tokens) -> np.ndarray:
    """P(N) = exp(c - b log N) at ``n_tokens`` (array-like of positive N); same shape, units of P.

    Uses c and b, so it is valid for degenerate fits too.
    """
    n = np.asarray(n_tokens, dtype=float)
    return np.exp(fit.c - fit.b * np.log(n))


def load_scores_csv(path) -> list[dict]:
    """Read the long score CSV (columns metric, mode, n_queries, score; extra columns ignored).

    Returns a list of dicts {metric: str, mode: str, n_queries: int, score:
    float}. Raises FileNotFoundError for a missing file and ValueError (naming
    the file and line) for missing columns or unparsable numbers.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such score CSV")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; "
                             f"expected {', '.join(CSV_COLUMNS)}, found {', '.join(header) or 'none'}")
        rows = []
        for line, raw in enumerate(reader, start=2):
            raw = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            try:
                n = float(raw["n_queries"])
                rows.append({"metric": raw["metric"], "mode": raw["mode"],
                             "n_queries": int(n) if n.is_integer() else n, "score": float(raw["score"])})
            except ValueError:
                raise ValueError(f"{path}:{line}: bad number in n_queries={raw['n_queries']!r} "
                                 f"or score={raw['score']!r}") from None
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows


def group_curves(rows, modes=None) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Group long rows into curves: {(metric, mode): (N sorted ascending, scores)}, first-seen order.

    ``modes``: optional iterable restricting (and ordering) the modes kept.
    """
    keep = list(modes) if modes is not None else None
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        if keep is not None and r["mode"] not in keep:
            continue
        points.setdefault((r["metric"], r["mode"]), []).append((float(r["n_queries"]), float(r["score"])))
    out = {}
    for key, pts in points.items():
        pts.sort()
        out[key] = (np.array([q for q, _ in pts]), np.array([s for _, s in pts]))
    if keep is not None:
        out = dict(sorted(out.items(), key=lambda kv: keep.index(kv[0][1])))
    return out


def fit_all(rows, modes=None) -> dict[tuple[str, str], ScalingFit | None]:
    """Fit every (metric, mode) curve of the long rows (see :func:`load_scores_csv`).

    Returns {(metric, mode): ScalingFit}, or None for a curve that cannot be
    fitted at all (fewer than 2 distinct N, or a score <= 0). Order: modes in
    the order given (else first seen), metrics in first-seen order.
    """
    fits = {}
    for key, (n, p) in group_curves(rows, modes).items():
        try:
            fits[key] = fit_scaling_law(n, p)
        except ValueError:
            fits[key] = None
    return fits
