"""The demo's report: scores.csv (long format), scaling fits with intervals, plots and report.md.

Every figure of the report comes with a 95 % bootstrap interval over test images (every question of a drawn
image counts; :func:`fusion_vlm.analysis.intervals.resample_means`), and the verdicts are decided from those
intervals by rules stated in the report itself; nothing here is tuned to make a verdict appear. Modes are
handled generically: a mode run at several N is a curve, a mode run at one N is one cell, and the shortcut
rules (:func:`fusion_vlm.demo.scoring.shortcut_rules`) are rows beside the models.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from fusion_vlm.analysis.compare import mode_differences
from fusion_vlm.analysis.intervals import ItemCurve, curve_intervals, item_intervals
from fusion_vlm.analysis.plots import plot_mode_differences, plot_scaling_fits
from fusion_vlm.analysis.scaling import fit_scaling_law
from fusion_vlm.demo.report_sections import plot_scores, run_section
from fusion_vlm.demo.results import (  # noqa: F401  (names callers of the report import from here)
    B_TOL, ELASTIC, GLOBAL, LOCALIZED, METRIC_LABEL, MODE_NAMES, N_BOOT, R2_MIN, SMALL_N, _families, as_rules, cell,
    combo, decide, fmt, items, metric_name, mode_ns, mode_order, n_key, n_label, value)


# ---------------------------------------------------------------- tables
def long_rows(results: dict) -> list[dict]:
    """{(mode, N): {family: result}} -> rows {metric, mode, n_queries, score}: the family's reported metric
    (Accuracy@family, F1@description, Score@all). Modes without N (all_tokens) are left out: the rows are
    points of N curves (the paper appendix's CSV, read by ``fusion-vlm fit``); the report shows those modes."""
    rows = []
    for (mode, n), fams in sorted(results.items(), key=lambda kv: (kv[0][0], n_key(kv[0][1]))):
        if n is None:
            continue
        for fam, v in fams.items():
            rows.append({"metric": metric_name(fam, v), "mode": mode, "n_queries": n, "score": round(value(v), 3)})
    return rows


def score_table(results: dict, rules: dict, n_boot: int = N_BOOT) -> list[str]:
    """Markdown rows: per family, every mode (a curve over the sweep's N, or one cell for a one-N mode) and
    every shortcut rule, figure (%) with its 95 % interval."""
    ns_of, rules = mode_ns(results), as_rules(rules)
    sweep = sorted({n for m, ns in ns_of.items() if len(ns) > 1 for n in ns}, key=n_key) or \
        sorted({n for _, n in results}, key=n_key)
    single = [m for m in mode_order(results) if len(ns_of[m]) == 1 and ns_of[m][0] not in sweep]
    out = ["| family | metric | mode | " + " | ".join(n_label(n) for n in sweep) + " | one setting |",
           "|---|---|---|" + "---|" * (len(sweep) + 1)]
    for fam in _families(results):
        metric = metric_name(fam).split("@")[0]
        for mode in mode_order(results):
            cells = [results.get((mode, n), {}).get(fam) for n in sweep]
            if mode in single:
                n = ns_of[mode][0]
                v = results[(mode, n)].get(fam)
                row = ["-"] * len(sweep) + ["-" if v is None else f"{cell(v, n_boot)} ({n_label(n)})"]
            else:
                row = [cell(v, n_boot) for v in cells] + ["-"]
            out.append(f"| {fam} | {metric} | {mode} | " + " | ".join(row) + " |")
        for rule, fams in rules.items():
            v = fams.get(fam)
            out.append(f"| {fam} | {metric} | rule: {rule} | " + " | ".join(["-"] * len(sweep)) +
                       f" | {cell(v, n_boot)} |")
    return out


def difference_table(results: dict, n_values, small_n: int = SMALL_N, n_boot: int = N_BOOT) -> list[str]:
    """Markdown rows: for every family, vqq - vq_ft and vqq - vq, mean over N <= small_n, with paired 95 %
    bootstrap intervals over test images (points)."""
    small = [n for n in n_values if n <= small_n]
    rows = ["| family | vqq - vq_ft | vqq - vq |", "|---|---|---|"]
    for fam in _families(results):
        cells = [small_diff(results, fam, "vqq", other, small, n_boot) for other in ("vq_ft", "vq")]
        rows.append(f"| {fam} | " + " | ".join(fmt(c, signed=True) for c in cells) + " |")
    return rows


def small_diff(results: dict, fam: str, a: str, b: str, ns, n_boot: int = N_BOOT):
    """Mean over N in ``ns`` of figure(a) - figure(b) on ``fam``, paired bootstrap interval; None when an N
    lacks a mode."""
    pa = [results.get((a, n), {}).get(fam) for n in ns]
    pb = [results.get((b, n), {}).get(fam) for n in ns]
    if not ns or any(v is None for v in pa + pb):
        return None
    return combo(pa, pb, n_boot)


def fit_curves(results: dict, n_boot: int = N_BOOT) -> tuple[dict, dict, dict]:
    """Every (metric, mode) curve with >= 2 N: ({key: (N (K,), P (K,))}, {key: ScalingFit or None},
    {key: FitInterval or None}); intervals from the paired item bootstrap over test images where the
    per-question scores exist (else the residual bootstrap, K >= 3)."""
    curves, item_curves, fits = {}, {}, {}
    for mode, ns in mode_ns(results).items():
        ns = [n for n in ns if n is not None]
        if len(ns) < 2:
            continue
        for fam in _families(results):
            vs = [results[(mode, n)].get(fam) for n in ns]
            if any(v is None for v in vs):
                continue
            key = (metric_name(fam, vs[0]), mode)
            curves[key] = (np.array(ns, float), np.array([value(v) for v in vs]))
            try:
                fits[key] = fit_scaling_law(*curves[key])
            except ValueError:  # a score of 0: no log-space fit
                fits[key] = None
            xs = [items(v) for v in vs]
            if all(x is not None for x in xs) and all(v["image"] == vs[0]["image"] for v in vs):
                item_curves[key] = ItemCurve(curves[key][0], np.array(xs, float), 100.0,
                                             np.asarray(vs[0]["image"]))
    ivs = curve_intervals({k: c for k, c in curves.items() if fits[k] is not None}, item_curves, n_boot, 0)
    return curves, fits, {k: ivs.get(k) for k in curves}


def follows(fit, iv) -> bool:
    """The verdict (a) rule: b's 95 % interval lies below 0 (P rises with N) and R² >= R2_MIN."""
    return fit is not None and iv is not None and iv.b[1] < -B_TOL and fit.r2 >= R2_MIN


def fit_table(fits: dict, ivs: dict) -> list[str]:
    """Markdown rows: a, b (95 % intervals), R² and the (a) rule per curve."""
    rows = ["| metric | mode | a [95 %] | b [95 %] | R² | follows (a/N)^b? |", "|---|---|---|---|---|---|"]
    for (m, mode), fit in fits.items():
        iv = ivs.get((m, mode))
        if fit is None:
            rows.append(f"| {m} | {mode} | - | - | - | not fittable (a score of 0) |")
            continue
        a = ("inf" if fit.a > 0 else "0") + " (degenerate)" if fit.degenerate else f"{fit.a:.3g}"
        a_iv = "" if iv is None else (f" [{iv.a[0]:.3g}, {iv.a[1]:.3g}]" if iv.b_excludes_zero else " [0, inf]")
        b_iv = "" if iv is None else f" [{iv.b[0]:+.4f}, {iv.b[1]:+.4f}]"
        why = "yes" if follows(fit, iv) else "no" + (" (no interval)" if iv is None else
                                                      " (b's interval holds 0)" if not iv.b_excludes_zero or
                                                      max(abs(iv.b[0]), abs(iv.b[1])) < B_TOL else
                                                      " (b > 0: falls with N)" if iv.b[0] > 0 else
                                                      f" (R² < {R2_MIN:g})")
        rows.append(f"| {m} | {mode} | {a}{a_iv} | {fit.b:+.4f}{b_iv} | {fit.r2:.3f} | {why} |")
    return rows


# ---------------------------------------------------------------- verdicts
def verdicts(results: dict, fits: dict, ivs: dict, rules: dict | None = None, small_n: int = SMALL_N,
             n_boot: int = N_BOOT) -> list[str]:
    """The report's verdicts, each with the numbers and the rule that decides it:

    (a) does each curve follow (a/N)^b (:func:`follows`); (b) does question fusion (vqq) beat the model
    fine-tuned without the question (vq_ft) at N <= ``small_n`` (paired interval of the mean difference
    above 0), on "all" and every localized family; (c) is the description F1 above 0 (per mode, mean over
    its N; interval above 0); shortcuts: the (mode, N) cells whose paired difference to the family's best
    shortcut rule lies above 0.
    """
    lines, rules = [], as_rules(rules)
    paper = [k for k in fits if k[1] in MODE_NAMES]
    yes = [k for k in paper if follows(fits[k], ivs.get(k))]
    listed = "; ".join(f"{m} {mode}: b={fits[(m, mode)].b:+.3f} [{ivs[(m, mode)].b[0]:+.3f}, "
                       f"{ivs[(m, mode)].b[1]:+.3f}], R²={fits[(m, mode)].r2:.2f}" for m, mode in yes)
    overall = "yes" if paper and len(yes) == len(paper) else "partly" if yes else "no"
    others = [k for k in fits if k[1] not in MODE_NAMES]
    lines.append(f"(a) Weak scaling P(N) = (a/N)^b: do the curves follow it? {overall}: {len(yes)} of {len(paper)} "
                 f"(metric, mode) curves of the paper's modes have b's 95 % interval below 0 and R² >= {R2_MIN:g}" +
                 (f" ({listed})" if yes else "") + f"; not fittable (a score of 0): "
                 f"{sum(fits[k] is None for k in paper)}." + (
                     f" Other modes: {sum(follows(fits[k], ivs.get(k)) for k in others)} of {len(others)} curves "
                     f"({', '.join(sorted({k[1] for k in others}))})." if others else "") +
                 " Table: 'Scaling-law fits'.")
    ns = sorted({n for m, n in results if m == "vqq"} & {n for m, n in results if m == "vq_ft"})
    small = [n for n in ns if n <= small_n]
    if small:
        parts = []
        for fam in ["all", *[f for f in LOCALIZED if f in _families(results)]]:
            d = small_diff(results, fam, "vqq", "vq_ft", small, n_boot)
            parts.append(f"{fam} {fmt(d, signed=True)} -> {decide(d)}")
        lines.append(f"(b) Does question fusion (vqq) beat the model fine-tuned without the question (vq_ft) at "
                     f"small N? vqq - vq_ft, mean over N in {small}, points with paired 95 % intervals: "
                     + "; ".join(parts) + ". Rule: yes when the interval lies above 0, no when below.")
    else:
        lines.append(f"(b) Question fusion at small N: not computable (vqq and vq_ft share no N <= {small_n}).")
    desc = []
    for mode, mns in mode_ns(results).items():
        vs = [results[(mode, n)].get(GLOBAL) for n in mns]
        if all(v is not None for v in vs):
            iv = combo(vs, n_boot=n_boot)
            desc.append((mode, iv))
    if desc:
        above = [m for m, iv in desc if iv is not None and iv[1] > 0]
        ref = (rules or {}).get("majority", {}).get(GLOBAL)
        lines.append(f"(c) Is the description F1 above 0? {'yes' if above else 'no'} ({len(above)} of {len(desc)} "
                     f"modes): item F1 (%) per mode, mean over its N, 95 % interval: " +
                     "; ".join(f"{m} {fmt(iv)}" for m, iv in desc) +
                     ("" if ref is None else f" (majority-answer rule: {fmt(combo([ref], n_boot=n_boot))})") +
                     ". Rule: yes when the interval's lower end is above 0.")
    if rules:
        parts = []
        for fam in _families(results):
            best = max(((r, v[fam]) for r, v in rules.items() if fam in v), key=lambda rv: value(rv[1]),
                       default=None)
            cells = [(m, n) for m, n in results if fam in results[(m, n)]]
            if best is None or not cells:
                continue
            above = [c for c in cells if (d := combo([results[c][fam]], [best[1]], n_boot)) is not None and d[1] > 0]
            parts.append(f"{fam}: {len(above)} of {len(cells)} (best rule '{best[0]}' {value(best[1]):.1f})")
        lines.append("Shortcuts: (mode, N) cells above the family's best shortcut rule (paired 95 % interval of "
                     "the difference above 0): " + "; ".join(parts) + ".")
    return lines


# ---------------------------------------------------------------- the elastic section
def _exponent(results: dict, mode: str, fam: str, ns, n_boot: int = N_BOOT) -> str:
    """b of the family's curve with its 95 % image-bootstrap interval, or '-'."""
    rows = [results.get((mode, n), {}).get(fam) for n in ns]
    if len(ns) < 2 or any(r is None or items(r) is None for r in rows) or any(r["image"] != rows[0]["image"]
                                                                             for r in rows):
        return "-"
    try:
        fit, iv = item_intervals(ns, [items(r) for r in rows], n_boot, 0, 100.0, groups=rows[0]["image"])
    except ValueError:  # a figure of 0 at some N: no log-space fit
        return "-"
    return f"{fit.b:+.3f} [{iv.b[0]:+.3f}, {iv.b[1]:+.3f}]"


def elastic_table(results: dict, n_values, n_boot: int = N_BOOT) -> list[str]:
    """Markdown rows: per family and N, per-N vqq (stage 3 at that N) vs elastic (stage 2 at that N), figure
    with 95 % intervals and the paired difference elastic - per-N, all bootstrapped over test images."""
    rows = ["| family | N | per-N (vqq) | elastic | elastic - per-N |", "|---|---|---|---|---|"]
    for fam in _families(results):
        for n in n_values:
            a, b = results.get((ELASTIC, n), {}).get(fam), results.get(("vqq", n), {}).get(fam)
            if a is None or b is None:
                continue
            rows.append(f"| {fam} | {n} | {fmt(combo([b], n_boot=n_boot))} | {fmt(combo([a], n_boot=n_boot))} | "
                        f"{fmt(combo([a], [b], n_boot), signed=True)} |")
    return rows


def item_records(results: dict) -> list[dict]:
    """Per-question records of every evaluation (mode, n_queries, dataset = family, index, score = the graded
    score behind the family's figure, group = test image), the format of :mod:`fusion_vlm.evaluation.items`,
    for ``fusion-vlm fit --csv scores.csv``; like :func:`long_rows`, without modes that have no N."""
    out = []
    for (mode, n), fams in sorted(results.items(), key=lambda kv: (kv[0][0], n_key(kv[0][1]))):
        if n is None:
            continue
        for fam, v in fams.items():
            xs = items(v)
            if xs is None:
                continue
            out += [{"mode": mode, "n_queries": n, "dataset": fam, "index": str(k), "score": float(c),
                     "group": int(img)} for k, (c, img) in enumerate(zip(xs, v.get("image", [])))]
    return out


def write_report(out: Path, results: dict, rules: dict, cfg, timings: dict, context_probe: dict) -> Path:
    """Write scores.csv (+ scores.items.jsonl), fits.csv/fits.json, the PNG plots, versions.json and
    report.md into ``out``; returns report.md's path.

    ``results``: {(mode, N): evaluation JSON}; ``rules``: {rule: the same layout}
    (:func:`fusion_vlm.demo.scoring.shortcut_rules`); ``cfg``: the run's DemoConfig (any object with
    train_images, test_images; seed, eval.n_boot and eval.small_n when present); ``context_probe``:
    {context kind: {family: accuracy %}} of the frozen stage-0 LLM on text contexts.
    """
    from fusion_vlm.commands.fit import write_fit_table
    from fusion_vlm.evaluation.items import item_path, write_items

    rules = as_rules(rules)
    ev = getattr(cfg, "eval", None)
    n_boot, small_n = getattr(ev, "n_boot", N_BOOT), getattr(ev, "small_n", SMALL_N)
    rows = long_rows(results)
    with (out / "scores.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["metric", "mode", "n_queries", "score"])
        w.writeheader()
        w.writerows(rows)
    recs = item_records(results)
    if recs:  # `fusion-vlm fit --csv scores.csv` finds them and bootstraps over test questions
        write_items(item_path(out / "scores.csv"), recs)
    curves, fits, ivs = fit_curves(results, n_boot)
    write_fit_table(fits, str(out), ivs)
    plot_scaling_fits(curves, fits, out / "scaling.png", cols=3, intervals=ivs,
                      title="Demo scores vs N (log axis), fitted (a/N)^b with 95 % bootstrap bands")
    plot_scores(results, rules, out / "scores.png", n_boot)
    for other in ("vq_ft", "vq"):
        if any(m == other for m, _ in results) and any(m == "vqq" for m, _ in results):
            plot_mode_differences(mode_differences(rows, "vqq", other), out / f"diff_vqq_{other}.png", "vqq", other)
    ns = sorted({n for _, n in results if n is not None})
    modes = mode_order(results)
    md = ["# fusion_vlm CPU demo report", ""]
    md += run_section(out, cfg, ns, timings)
    md += ["", "## Scores on the test split, with 95 % intervals", "",
           f"Accuracy (%) per family; descriptions are scored by item F1 (%), and `all` is the mean over every "
           f"question of its score (F1 for descriptions, 0/1 otherwise). Brackets: 95 % interval from {n_boot} "
           f"bootstrap replicates over test images. Rules (`rule: ...`) answer without a model, from the "
           f"ground truth of each test image; they do not depend on N.", ""]
    md += score_table(results, rules, n_boot)
    md += ["", "Modes: " + "; ".join(f"`{k}` = {v}" for k, v in MODE_NAMES.items() if k in modes) + (
        f"; `{ELASTIC}` = the stage-2 model (N drawn per micro-batch) at every N, no stage-3 fine-tune"
        if ELASTIC in modes else "") + ("; other modes: " + ", ".join(f"`{m}`" for m in modes if m not in
                                                                       (*MODE_NAMES, ELASTIC))
                                        if any(m not in (*MODE_NAMES, ELASTIC) for m in modes) else "") + ".",
           "", "Rules: " + "; ".join(f"`{k}` = {v}" for k, v in _rule_text(rules).items()) + ".",
           "", "## Scaling-law fits (log space, BFGS) with 95 % intervals", "",
           f"a and b of P(N) = (a/N)^b per curve, intervals from {n_boot} bootstrap replicates over test images "
           "(the same images at every N); a's interval is [0, inf] when b's holds 0.", ""]
    md += fit_table(fits, ivs)
    md += ["", "## Verdicts", ""] + [f"- {v}" for v in verdicts(results, fits, ivs, rules, small_n, n_boot)]
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
    small = [n for n in ns if n <= small_n]
    md += ["", f"## Mode differences at N <= {small_n}, every family", "",
           f"Points, mean over N in {small}, with paired 95 % bootstrap intervals over test images (positive: "
           f"question fusion better).", ""] + difference_table(results, ns, small_n, n_boot)
    if ELASTIC in modes:
        s3 = timings.get("stage3 N-sweep fine-tunes")
        md += ["", "## Elastic vs per-N: one stage-2 model for every N, or a stage-3 fine-tune per N", "",
               "`per-N` = the stage-3 `vqq` model fine-tuned at that N; `elastic` = the stage-2 model (N drawn "
               "from the sweep per micro-batch, nested query slots) evaluated at that N with no fine-tune. "
               f"Figures (%) with 95 % intervals, and the paired difference, from {n_boot} bootstrap "
               "replicates over test images (every question of a drawn image counts).", ""]
        md += elastic_table(results, ns, n_boot)
        md += ["", "Exponent b of each curve (P(N) = (a/N)^b) with its 95 % image-bootstrap interval:",
               "", "| family | b, per-N (vqq) | b, elastic |", "|---|---|---|"]
        md += [f"| {fam} | {_exponent(results, 'vqq', fam, ns, n_boot)} | "
               f"{_exponent(results, ELASTIC, fam, ns, n_boot)} |" for fam in _families(results)]
        if s3 is not None:
            md += ["", f"Training the elastic rows cost nothing beyond stage 2; the per-N `vqq` fine-tunes took "
                       f"about {s3 / 2:.0f} s of the {s3:.0f} s of stage 3 (half of its {2 * len(ns)} runs)."]
    md += ["", "## Files", "", "- `config.yaml`: the run's recipe (`fusion-vlm demo --config config.yaml` reruns "
           "it); `versions.json`: package versions, git commit, seed",
           "- `eval/<mode>_n<N>.json`: scores per family; `eval/<mode>_n<N>.items.jsonl`: every test question "
           "with its prediction, answer, family, image, 0/1 correctness and graded score",
           "- `scores.csv`: long format (metric, mode, n_queries, score), like the paper's appendix CSV; "
           "`scores.items.jsonl`: the per-question scores behind it (`fusion-vlm fit --csv scores.csv` "
           "bootstraps over them); `fits.csv`, `fits.json`: a, b, c, R² and 95 % intervals per curve",
           "- `scores.png`: every figure vs N with 95 % error bars, shortcut rules as bands; `scaling.png`: "
           "fitted curves with 95 % bootstrap bands",
           "- `diff_vqq_vq_ft.png`, `diff_vqq_vq.png`: mode differences (green: vqq better, red: worse)"]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _rule_text(rules: dict) -> dict[str, str]:
    from fusion_vlm.demo.scoring import SHORTCUTS

    return {r: SHORTCUTS.get(r, "a shortcut rule") for r in rules}


def load_results(eval_dir: str | Path) -> dict:
    """{(mode, N): evaluation JSON} of every ``<mode>_n<N>.json`` in ``eval_dir`` (to rebuild a report)."""
    out = {}
    for p in sorted(Path(eval_dir).glob("*_n*.json")):
        mode, _, n = p.stem.rpartition("_n")
        if n.isdigit():
            out[(mode, int(n))] = json.loads(p.read_text())
    return out
