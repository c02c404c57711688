"""The demo's report: scores.csv (long format), scaling fits, plots and report.md.

The claims section is computed from the numbers with fixed rules stated in
the report itself; nothing here is tuned to make a claim appear.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fusion_vlm.analysis.compare import mode_differences
from fusion_vlm.analysis.intervals import item_intervals, resample_means
from fusion_vlm.analysis.plots import plot_mode_differences, plot_scaling_fits
from fusion_vlm.analysis.scaling import fit_all, group_curves

LOCALIZED = ("attribute", "reading")  # questions that point at a region of the image
GLOBAL = "description"  # the question that needs the whole image
SMALL_N = 4  # "small N" for the question-fusion claim: N <= 4
YES_NO = "existence"  # the yes/no family (POPE-like)
YES_NO_MARGIN = 5.0  # points above the majority answer that count as beating it
MODE_NAMES = {"vqq": "vision+question+queries", "vq_ft": "vision+queries, fine-tuned without question",
              "vq": "vision+queries, question dropped (no fine-tune)"}
ELASTIC = "elastic"  # the stage-2 model (N drawn per micro-batch) at every N, no stage-3 fine-tune
N_BOOT = 2000  # bootstrap replicates of the report's 95 % intervals (over test images, seed 0)


def long_rows(results: dict) -> list[dict]:
    """{(mode, N): {family: {"accuracy", ...}}} -> rows {metric, mode, n_queries, score} (metric = Accuracy@family)."""
    rows = []
    for (mode, n), fams in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        for fam, v in fams.items():
            rows.append({"metric": f"Accuracy@{fam}", "mode": mode, "n_queries": n, "score": round(v["accuracy"], 3)})
            if "f1" in v:
                rows.append({"metric": f"F1@{fam}", "mode": mode, "n_queries": n, "score": round(v["f1"], 3)})
    return rows


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mode_diff(results: dict, fam: str, a: str, b: str, ns) -> tuple[float, float] | None:
    """Mean over N in ``ns`` of accuracy(a) - accuracy(b) on ``fam`` and two binomial standard errors of that
    mean, both in points; None when no N has both modes."""
    pairs = [(results[(a, n)][fam], results[(b, n)][fam]) for n in ns
             if fam in results.get((a, n), {}) and fam in results.get((b, n), {})]
    if not pairs:
        return None
    var = sum((x["accuracy"] * (100 - x["accuracy"]) + y["accuracy"] * (100 - y["accuracy"])) / max(x["n"], 1)
              for x, y in pairs)
    return _mean([x["accuracy"] - y["accuracy"] for x, y in pairs]), 2 * var ** 0.5 / len(pairs)


def claims(results: dict, fits: dict, n_values, baseline: dict | None = None) -> list[str]:
    """Plain-language findings, each with the numbers and the rule that decides it.

    ``baseline`` ({family: majority-answer accuracy as a fraction}) adds the yes/no line: does every model
    beat the majority by more than YES_NO_MARGIN points at every N?
    """
    lines = []
    good = [(m, mode, f) for (m, mode), f in fits.items() if f is not None and not f.degenerate]
    follows = [(m, mode, f) for m, mode, f in good if f.b < 0 and f.r2 >= 0.5]
    lines.append(f"(a) Weak scaling P(N) = (a/N)^b: {len(follows)} of {len(fits)} (metric, mode) curves have b < 0 "
                 f"and R² >= 0.5 in log space (rule of this report). Non-degenerate curves: " + ("; ".join(
                     f"{m} {mode}: b={f.b:.3f}, R²={f.r2:.2f}" for m, mode, f in good) or
                     "none (every fit is degenerate, e.g. a flat curve)") + ".")
    small = [n for n in n_values if n <= SMALL_N]

    def verdict(*ds: tuple[float, float]) -> str:
        if all(d > noise for d, noise in ds):
            return "yes"
        if any(d < -noise for d, noise in ds):
            return "no"
        return "not distinguishable from noise"

    for fam in LOCALIZED:
        d_ft, d_vq = mode_diff(results, fam, "vqq", "vq_ft", small), mode_diff(results, fam, "vqq", "vq", small)
        if d_ft is None or d_vq is None:
            continue
        lines.append(f"(b) Localized family '{fam}', N <= {SMALL_N}: vqq - vq_ft = {d_ft[0]:+.1f} +- {d_ft[1]:.1f} "
                     f"points, vqq - vq = {d_vq[0]:+.1f} +- {d_vq[1]:.1f} points (mean over N in {small}; +- two "
                     f"binomial standard errors). Does question fusion beat both no-question models by more than "
                     f"the noise? {verdict(d_ft, d_vq)}.")
    d_ft, d_vq = mode_diff(results, GLOBAL, "vqq", "vq_ft", small), mode_diff(results, GLOBAL, "vqq", "vq", small)
    if d_ft is not None and d_vq is not None:
        seen = "seen here" if d_ft[0] < -d_ft[1] else "not seen here"
        lines.append(f"(c) Global family '{GLOBAL}', N <= {SMALL_N}: vqq - vq_ft = {d_ft[0]:+.1f} +- {d_ft[1]:.1f} "
                     f"points, vqq - vq = {d_vq[0]:+.1f} +- {d_vq[1]:.1f} points. The paper found the opposite sign "
                     f"for global descriptions (COCO): {seen} (rule: vqq - vq_ft below minus two standard errors).")
    if baseline and YES_NO in baseline:
        floor = 100 * baseline[YES_NO] + YES_NO_MARGIN
        worst = {mode: min((results[(mode, n)][YES_NO]["accuracy"], n) for n in n_values
                           if YES_NO in results.get((mode, n), {})) for mode in MODE_NAMES
                 if any(YES_NO in results.get((mode, n), {}) for n in n_values)}
        every = all(acc > floor for acc, _ in worst.values())
        lines.append(f"Yes/no ('{YES_NO}') against the majority answer ({100 * baseline[YES_NO]:.1f}): lowest "
                     f"accuracy over N per mode " + ", ".join(f"{mode} {acc:.1f} (N={n})" for mode, (acc, n) in
                                                              worst.items()) +
                     f". Does every model beat the majority by more than {YES_NO_MARGIN:g} points at every N? "
                     f"{'yes' if every else 'no'}.")
    return lines


def _families(results: dict) -> list[str]:
    """The question families of ``results`` in their order, "all" last."""
    return [f for f in next(iter(results.values())) if f != "all"] + ["all"]


def difference_table(results: dict, n_values) -> list[str]:
    """Markdown rows: for every family, vqq - vq_ft and vqq - vq at N <= SMALL_N (mean +- two SE, points)."""
    small = [n for n in n_values if n <= SMALL_N]
    fams = _families(results)
    rows = ["| family | vqq - vq_ft | vqq - vq |", "|---|---|---|"]
    for fam in fams:
        cells = [mode_diff(results, fam, "vqq", other, small) for other in ("vq_ft", "vq")]
        rows.append(f"| {fam} | " + " | ".join("-" if c is None else f"{c[0]:+.1f} +- {c[1]:.1f}" for c in cells)
                    + " |")
    return rows


def _paired(a: dict, b: dict | None = None) -> tuple[float, float, float] | None:
    """Accuracy of family result ``a`` (or ``a - b``, paired) in points with its 95 % bootstrap interval over
    test images: (point, low, high); None when the per-item results are missing or not aligned."""
    rows = [a] if b is None else [a, b]
    if any("correct" not in r or "image" not in r for r in rows) or (b is not None and (
            a["image"] != b["image"] or len(a["correct"]) != len(b["correct"]))) or len(a["correct"]) < 2:
        return None
    x = np.array([r["correct"] for r in rows], float)
    reps = 100 * resample_means(x, N_BOOT, 0, groups=a["image"])  # [B, 1 or 2]
    vals = reps[:, 0] if b is None else reps[:, 0] - reps[:, 1]
    point = 100 * (x[0].mean() - (x[1].mean() if b is not None else 0.0))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(point), float(lo), float(hi)


def _exponent(results: dict, mode: str, fam: str, ns) -> str:
    """b of the family's accuracy curve with its 95 % image-bootstrap interval, or '-'."""
    rows = [results.get((mode, n), {}).get(fam) for n in ns]
    if len(ns) < 2 or any(r is None or "correct" not in r for r in rows) or any(r["image"] != rows[0]["image"]
                                                                                 for r in rows):
        return "-"
    try:
        fit, iv = item_intervals(ns, [r["correct"] for r in rows], N_BOOT, 0, 100.0, groups=rows[0]["image"])
    except ValueError:  # an accuracy of 0 at some N: no log-space fit
        return "-"
    return f"{fit.b:+.3f} [{iv.b[0]:+.3f}, {iv.b[1]:+.3f}]"


def elastic_table(results: dict, n_values) -> list[str]:
    """Markdown rows: per family and N, per-N vqq (stage 3 at that N) vs elastic (stage 2 at that N), accuracy
    with 95 % intervals and the paired difference elastic - per-N, all bootstrapped over test images."""
    def fmt(v):
        return "-" if v is None else f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"

    def diff(v):
        return "-" if v is None else f"{v[0]:+.1f} [{v[1]:+.1f}, {v[2]:+.1f}]"

    rows = ["| family | N | per-N (vqq) | elastic | elastic - per-N |", "|---|---|---|---|---|"]
    for fam in _families(results):
        for n in n_values:
            a, b = results.get((ELASTIC, n), {}).get(fam), results.get(("vqq", n), {}).get(fam)
            if a is None or b is None:
                continue
            rows.append(f"| {fam} | {n} | {fmt(_paired(b))} | {fmt(_paired(a))} | {diff(_paired(a, b))} |")
    return rows


def item_records(results: dict) -> list[dict]:
    """Per-question records of every evaluation (mode, n_queries, dataset = family, index, score 0/1, group =
    test image), the format of :mod:`fusion_vlm.evaluation.items`, for ``fusion-vlm fit --csv scores.csv``."""
    out = []
    for (mode, n), fams in sorted(results.items()):
        for fam, v in fams.items():
            out += [{"mode": mode, "n_queries": n, "dataset": fam, "index": str(k), "score": float(c), "group": int(img)}
                    for k, (c, img) in enumerate(zip(v.get("correct", []), v.get("image", [])))]
    return out


def write_report(out: Path, results: dict, baseline: dict, size, timings: dict, context_probe: dict) -> Path:
    """Write scores.csv, fits.csv, the PNG plots and report.md into ``out``; returns report.md's path.

    ``context_probe`` is {context kind: {family: accuracy %}} of the frozen stage-0 LLM on text contexts.
    """
    rows = long_rows(results)
    with (out / "scores.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["metric", "mode", "n_queries", "score"])
        w.writeheader()
        w.writerows(rows)
    from fusion_vlm.evaluation.items import item_path, write_items

    items = item_records(results)
    if items:  # `fusion-vlm fit --csv scores.csv` finds them and bootstraps over test questions
        write_items(item_path(out / "scores.csv"), items)
    fit_rows = [r for r in rows if r["score"] > 0]
    fits = fit_all(fit_rows)
    modes = [m for m in (*MODE_NAMES, ELASTIC) if any(mode == m for mode, _ in results)]
    with (out / "fits.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "mode", "a", "b", "c", "r2", "n_points", "degenerate"])
        for (m, mode), fit in fits.items():
            if fit is not None:
                w.writerow([m, mode, f"{fit.a:.4e}", f"{fit.b:.4f}", f"{fit.c:.4f}", f"{fit.r2:.3f}", fit.n_points,
                            fit.degenerate])
    acc_rows = [r for r in fit_rows if r["metric"].startswith("Accuracy@")]
    plot_scaling_fits(group_curves(acc_rows, modes), fits, out / "scaling.png", cols=3,
                      title="Demo accuracy vs N (log axis) with fitted (a/N)^b")
    for other in ("vq_ft", "vq"):
        plot_mode_differences(mode_differences(rows, "vqq", other), out / f"diff_vqq_{other}.png", "vqq", other)
    ns = sorted({n for _, n in results})
    fams = _families(results)
    md = ["# fusion_vlm CPU demo report", "",
          f"Size: {size.train_images} train / {size.test_images} test images; N sweep {list(ns)} (N' = min(N, 8) "
          f"in training; every test question is asked alone with N fused tokens).", "",
          "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    md += [f"| total | {sum(timings.values()):.1f} |", "", "## Accuracy (%) on the test split", ""]
    md += ["| family | mode | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
    for fam in fams:
        for mode in modes:
            vals = [results.get((mode, n), {}).get(fam, {}).get("accuracy") for n in ns]
            md.append(f"| {fam} | {mode} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
    md += ["", "Majority-answer baseline (train's commonest answer per family): " + ", ".join(
        f"{k} {100 * v:.1f}" for k, v in baseline.items()), "", "Modes: " + "; ".join(
        f"`{k}` = {v}" for k, v in MODE_NAMES.items()) + (
        f"; `{ELASTIC}` = the stage-2 model (N drawn per micro-batch) at every N, no stage-3 fine-tune"
        if ELASTIC in modes else ""), "", "## Scaling-law fits (log space, BFGS)", "",
        "| metric | mode | a | b | R² | degenerate |", "|---|---|---|---|---|---|"]
    for (m, mode), fit in fits.items():
        if fit is not None:
            md.append(f"| {m} | {mode} | {fit.a:.3e} | {fit.b:.4f} | {fit.r2:.3f} | "
                      f"{'yes' if fit.degenerate else 'no'} |")
    probe_fams = list(next(iter(context_probe.values()), {}))
    md += ["", "## The frozen stage-0 LLM reading contexts (no image)", "",
           "Accuracy (%) on test questions opened by a text context in place of the fused tokens: `answer` = "
           "the answer itself, `evidence` = the phrases of the objects the question is about, "
           "`scene` = every object, `soft` = 4 fused positions holding mean embeddings of the scene's object "
           "phrases (vectors, not text), `none` = no context. "
           "It shows what this LLM makes of fused tokens that carry the same content as such a text.", "",
           "| context | " + " | ".join(probe_fams) + " |", "|---|" + "---|" * len(probe_fams)]
    md += [f"| {k} | " + " | ".join(f"{v.get(f, 0.0):.1f}" for f in probe_fams) + " |"
           for k, v in context_probe.items()]
    md += ["", f"## Mode differences at N <= {SMALL_N}, every family", "",
           f"Accuracy points, mean over N in {[n for n in ns if n <= SMALL_N]} +- two binomial standard errors "
           f"(positive: question fusion better).", ""] + difference_table(results, ns)
    if ELASTIC in modes:
        s3 = timings.get("stage3 N-sweep fine-tunes")
        md += ["", "## Elastic vs per-N: one stage-2 model for every N, or a stage-3 fine-tune per N", "",
               "`per-N` = the stage-3 `vqq` model fine-tuned at that N; `elastic` = the stage-2 model (N drawn "
               "from the sweep per micro-batch, nested query slots) evaluated at that N with no fine-tune. "
               f"Accuracy (%) with 95 % intervals, and the paired difference, from {N_BOOT} bootstrap "
               "replicates over test images (every question of a drawn image counts).", ""]
        md += elastic_table(results, ns)
        md += ["", "Exponent b of each accuracy curve (P(N) = (a/N)^b) with its 95 % image-bootstrap interval:",
               "", "| family | b, per-N (vqq) | b, elastic |", "|---|---|---|"]
        md += [f"| {fam} | {_exponent(results, 'vqq', fam, ns)} | {_exponent(results, ELASTIC, fam, ns)} |"
               for fam in fams]
        if s3 is not None:
            md += ["", f"Training the elastic rows cost nothing beyond stage 2; the per-N `vqq` fine-tunes took "
                       f"about {s3 / 2:.0f} s of the {s3:.0f} s of stage 3 (half of its {2 * len(ns)} runs)."]
    paper_fits = {k: f for k, f in fits.items() if k[1] in MODE_NAMES}
    md += ["", "## What the numbers say", ""] + [f"- {c}" for c in claims(results, paper_fits, ns, baseline)]
    md += ["", "## Files", "", "- `scores.csv`: long format (metric, mode, n_queries, score), like the paper's "
           "appendix CSV; `fits.csv`: a, b, c, R² per curve; `scores.items.jsonl`: every test question's 0/1 "
           "score per (mode, N) (`fusion-vlm fit --csv scores.csv` bootstraps over them)", "- `scaling.png`: accuracy vs N with fitted curves",
           "- `diff_vqq_vq_ft.png`, `diff_vqq_vq.png`: mode differences (green: vqq better, red: worse)"]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
