"""Section 5.2: per-benchmark, per-N difference between two evaluation modes (paper Figures 11, 12).

For a metric m, token count N and modes A, B (e.g. A = ``vqq``, B = ``vq_ft``
or ``vq``):

    diff(m, N)     = P_A(m, N) - P_B(m, N)                     (units of the metric)
    relative(m, N) = diff(m, N) / range(m)
    range(m)       = max - min of P(m, N') over every N' and over BOTH modes A and B

i.e. the range is pooled over the two compared curves (not over all modes in the
file), so metrics on different scales (MME ~ 1500, BLEU-4 ~ 10) share one axis
and +1.0 means "A beats B by the whole spread of scores seen in this
comparison". A metric whose pooled range is 0 gets relative 0. Only N values
present in both modes are compared. Positive (A better) is drawn green,
negative red. The plots (:func:`fusion_vlm.analysis.plots.plot_mode_differences`)
show ``diff`` by default, as the paper's figures do; ``relative`` is the option.
"""

from __future__ import annotations

from dataclasses import dataclass

#: bar colours: A better / B better (paper: green / red)
POSITIVE_COLOR = "#2e9b45"
NEGATIVE_COLOR = "#d64541"


@dataclass(frozen=True)
class ModeDifference:
    """One bar: ``metric``, ``n_queries``; ``score_a``/``score_b`` in metric units;
    ``diff`` = score_a - score_b (metric units); ``relative`` = diff / ``range``
    (unitless, in [-1, 1]); ``range`` = pooled max - min of both modes' curves."""

    metric: str
    n_queries: float
    score_a: float
    score_b: float
    diff: float
    relative: float
    range: float

    @property
    def color(self) -> str:
        """Green when A is better (diff > 0), red when B is better (diff < 0), grey when equal."""
        return bar_color(self.diff)


def bar_color(value: float) -> str:
    """Colour of a difference bar: green for > 0, red for < 0, grey for 0."""
    if value > 0:
        return POSITIVE_COLOR
    if value < 0:
        return NEGATIVE_COLOR
    return "#999999"


def mode_differences(rows, mode_a: str, mode_b: str) -> list[ModeDifference]:
    """Differences mode_a - mode_b for every metric and every N both modes have.

    ``rows``: long rows (metric, mode, n_queries, score). Returns ModeDifference
    records, metrics in first-seen order, N ascending. Raises ValueError when a
    mode is absent or the two modes share no (metric, N).
    """
    scores: dict[str, dict[str, dict[float, float]]] = {mode_a: {}, mode_b: {}}
    order: list[str] = []
    for r in rows:
        if r["mode"] in scores:
            scores[r["mode"]].setdefault(r["metric"], {})[float(r["n_queries"])] = float(r["score"])
            if r["metric"] not in order:
                order.append(r["metric"])
    for mode in (mode_a, mode_b):
        if not scores[mode]:
            raise ValueError(f"mode {mode!r} has no rows (modes compared: {mode_a} - {mode_b})")
    out = []
    for metric in order:
        a, b = scores[mode_a].get(metric, {}), scores[mode_b].get(metric, {})
        common = sorted(set(a) & set(b))
        if not common:
            continue
        pooled = list(a.values()) + list(b.values())
        span = max(pooled) - min(pooled)
        for n in common:
            d = a[n] - b[n]
            out.append(ModeDifference(metric=metric, n_queries=n, score_a=a[n], score_b=b[n], diff=d,
                                      relative=d / span if span > 0 else 0.0, range=span))
    if not out:
        raise ValueError(f"modes {mode_a!r} and {mode_b!r} share no (metric, N) to compare")
    return out


def summarise(diffs: list[ModeDifference]) -> dict[str, dict]:
    """Per metric: number of N where A wins / loses, and the mean and [min, max] of ``relative``."""
    out: dict[str, dict] = {}
    for d in diffs:
        s = out.setdefault(d.metric, {"wins": 0, "losses": 0, "rel": []})
        s["wins"] += d.diff > 0
        s["losses"] += d.diff < 0
        s["rel"].append(d.relative)
    for s in out.values():
        rel = s.pop("rel")
        s.update(mean_relative=sum(rel) / len(rel), min_relative=min(rel), max_relative=max(rel))
    return out
