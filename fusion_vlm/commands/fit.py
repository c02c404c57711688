"""``fusion-vlm fit``: fit P(N) = (a/N)^b to every (metric, mode) of a long score CSV, write tables and plots.

Every fit gets bootstrap 95 % intervals of a, b and c (:mod:`fusion_vlm.analysis.intervals`): over the
benchmark's items when the per-item records of the sweep are found (``<csv stem>.items.jsonl`` beside the
CSV, or ``--items``) and the curve is a mean over them, else over the fit's log-space residuals.
"""

from __future__ import annotations

import csv
import json
import os

from fusion_vlm.errors import DataError, UsageError, user_input


def register(subparsers) -> None:
    p = subparsers.add_parser("fit", help="scaling-law fits, clusters and mode comparisons of a score CSV")
    p.add_argument("--csv", required=True, help="long CSV with columns metric, mode, n_queries, score")
    p.add_argument("--out", default="fit_out", help="output directory (default: fit_out)")
    p.add_argument("--modes", nargs="+", default=None, help="modes to use, in this order (default: all)")
    p.add_argument("--compare", nargs="+", default=None, metavar="A:B",
                   help="mode pairs to compare (default: the first mode against each other mode)")
    p.add_argument("--clusters", type=int, default=4, help="K-means clusters per mode (default 4)")
    p.add_argument("--seed", type=int, default=0, help="K-means and bootstrap seed (default 0)")
    p.add_argument("--items", default=None,
                   help="per-item records (*.items.jsonl, or a sweep folder with cells/) for the item bootstrap "
                        "(default: <csv stem>.items.jsonl beside the CSV when it exists)")
    p.add_argument("--n-boot", type=int, default=2000,
                   help="bootstrap replicates of the 95%% intervals (default 2000; 0 = no intervals)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    p.add_argument("--costs", default=None, metavar="COSTS.json",
                   help="stage timings from scripts/bench_efficiency.py --json: also write score vs measured "
                        "time to first token (accuracy_vs_ttft.csv/.png)")
    p.add_argument("--relative", action="store_true",
                   help="draw the mode differences as %% of each metric's range over both modes, on one axis "
                        "(default: raw differences P_A - P_B per metric, as the paper's Figs. 11-12)")
    p.set_defaults(func=run)


def parse_pairs(specs, modes: list[str]) -> list[tuple[str, str]]:
    """['vqq:vq'] -> [('vqq', 'vq')]; default: modes[0] against every other mode. ValueError names a bad spec."""
    if specs is None:
        return [(modes[0], m) for m in modes[1:]]
    pairs = []
    for spec in specs:
        a, sep, b = spec.partition(":")
        if not sep or a not in modes or b not in modes or a == b:
            raise UsageError(f"--compare {spec!r}: expected A:B with two different modes of {', '.join(modes)}")
        pairs.append((a, b))
    return pairs


INTERVAL_FIELDS = ["a_lo", "a_hi", "b_lo", "b_hi", "c_lo", "c_hi", "b_excludes_zero", "interval_method", "n_boot"]


def _interval_columns(iv) -> dict:
    """The flat 95 % interval columns of fits.csv for one FitInterval (empty cells for None)."""
    if iv is None:
        return {k: None for k in INTERVAL_FIELDS}
    d = iv.as_dict()
    return {"a_lo": d["a"][0], "a_hi": d["a"][1], "b_lo": iv.b[0], "b_hi": iv.b[1], "c_lo": iv.c[0],
            "c_hi": iv.c[1], "b_excludes_zero": iv.b_excludes_zero, "interval_method": iv.method,
            "n_boot": iv.n_boot}


def write_fit_table(fits: dict, out_dir: str, intervals: dict | None = None) -> tuple[str, str]:
    """fits.csv and fits.json in ``out_dir`` (one row / object per (metric, mode)).

    ``intervals``: {(metric, mode): FitInterval or None}; adds the 95 % interval columns
    (:data:`INTERVAL_FIELDS`) to fits.csv and an ``interval`` object to fits.json.
    """
    csv_path, json_path = os.path.join(out_dir, "fits.csv"), os.path.join(out_dir, "fits.json")
    fields = ["metric", "mode", "a", "b", "c", "r2", "n_points", "degenerate", "message"]
    if intervals is not None:
        fields += INTERVAL_FIELDS
    records, objects = [], []
    for (metric, mode), fit in fits.items():
        rec = {"metric": metric, "mode": mode}
        rec.update(fit.as_dict() if fit is not None else
                   {"a": None, "b": None, "c": None, "r2": None, "n_points": None,
                    "degenerate": True, "message": "not fittable (fewer than 2 distinct N or a score <= 0)"})
        obj = dict(rec)
        if intervals is not None:
            iv = intervals.get((metric, mode))
            rec.update(_interval_columns(iv))
            obj["interval"] = None if iv is None else iv.as_dict()
        records.append(rec)
        objects.append(obj)
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(objects, fh, indent=2)
    return csv_path, json_path


def _fmt(fit, iv=None) -> str:
    if fit is None:
        return f"{'not fittable':>12}"
    a = f"{fit.a:.4e}" if not fit.degenerate else ("inf" if fit.a > 0 else "0") + " (degenerate)"
    if iv is None:
        return f"{a:>22}{'':>23}{fit.b:>9.4f}{'':>20}{fit.c:>9.4f}{fit.r2:>7.3f}{fit.n_points:>4}"
    a_iv = f"[{iv.a[0]:.2e}, {iv.a[1]:.2e}]" if iv.b_excludes_zero else "[0, inf]"
    b_iv = f"[{iv.b[0]:+.4f}, {iv.b[1]:+.4f}]"
    return (f"{a:>22} {a_iv:<22}{fit.b:>9.4f} {b_iv:<19}{fit.c:>9.4f}{fit.r2:>7.3f}{fit.n_points:>4}  "
            f"{iv.method}{'' if iv.b_excludes_zero else ' (b ~ 0)'}")


def find_items(args):
    """Per-item records for the item bootstrap: ``--items``, else ``<csv stem>.items.jsonl`` beside the CSV;
    [] when there are none."""
    from fusion_vlm.evaluation.items import item_path, read_items

    path = args.items or item_path(args.csv)
    if args.items is None and not os.path.isfile(path):
        return []
    with user_input(DataError):  # a missing or malformed items file (the messages name it)
        return read_items(path)


def run(args) -> int:
    from fusion_vlm.analysis.clustering import cluster_mode
    from fusion_vlm.analysis.compare import mode_differences, summarise
    from fusion_vlm.analysis.scaling import fit_all, group_curves, load_scores_csv

    with user_input(DataError):  # a missing or malformed score CSV (the messages name the file)
        rows = load_scores_csv(args.csv)
    present = list(dict.fromkeys(r["mode"] for r in rows))
    modes = args.modes or present
    unknown = [m for m in modes if m not in present]
    if unknown:
        raise UsageError(f"--modes {' '.join(unknown)}: not in {args.csv} (modes there: {', '.join(present)})")
    pairs = parse_pairs(args.compare, modes)
    os.makedirs(args.out, exist_ok=True)

    if args.n_boot < 0 or 0 < args.n_boot < 100:
        raise UsageError(f"--n-boot {args.n_boot}: use 0 (no intervals) or at least 100 replicates")
    fits = fit_all(rows, modes)
    intervals = None
    if args.n_boot:
        from fusion_vlm.analysis.intervals import curve_intervals, match_items

        records = find_items(args)
        item_curves, _ = match_items(group_curves(rows, modes), records)
        intervals = curve_intervals(group_curves(rows, modes), item_curves, args.n_boot, args.seed)
        by_method = [iv.method for iv in intervals.values() if iv is not None]
        print(f"95 % bootstrap intervals ({args.n_boot} replicates): {by_method.count('items')} curves over items"
              f"{f' ({len(records)} item records)' if records else ''}, {by_method.count('residuals')} over "
              f"log-space residuals, {len(intervals) - len(by_method)} without "
              f"(fewer than 3 N or a score <= 0)")
    print(f"{'metric':<28}{'mode':<8}{'a':>22} {'[95 % interval]':<22}{'b':>9} {'[95 % interval]':<19}"
          f"{'c':>9}{'R²':>7}{'n':>4}")
    for (metric, mode), fit in fits.items():
        print(f"{metric:<28}{mode:<8}{_fmt(fit, (intervals or {}).get((metric, mode)))}")
    written = list(write_fit_table(fits, args.out, intervals))

    clusters = {mode: cluster_mode(rows, mode, k=args.clusters, seed=args.seed) for mode in modes}
    cpath = os.path.join(args.out, "clusters.csv")
    with open(cpath, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["mode", "metric", "cluster"])
        for mode, res in clusters.items():
            w.writerows([mode, name, int(lab) + 1] for name, lab in zip(res.names, res.labels))
    written.append(cpath)

    diffs = {(a, b): mode_differences(rows, a, b) for a, b in pairs}
    dpath = os.path.join(args.out, "mode_differences.csv")
    with open(dpath, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["mode_a", "mode_b", "metric", "n_queries", "score_a", "score_b", "diff", "relative", "range"])
        for (a, b), ds in diffs.items():
            w.writerows([a, b, d.metric, d.n_queries, d.score_a, d.score_b, d.diff, d.relative, d.range] for d in ds)
    written.append(dpath)
    for (a, b), ds in diffs.items():
        s = summarise(ds)
        wins = sum(v["wins"] for v in s.values())
        losses = sum(v["losses"] for v in s.values())
        print(f"{a} - {b}: {a} better at {wins} of {len(ds)} (metric, N) points, worse at {losses}")

    if not args.no_plots:
        from fusion_vlm.analysis.plots import plot_clusters, plot_mode_differences, plot_scaling_fits

        written.append(plot_scaling_fits(group_curves(rows, modes), fits, os.path.join(args.out, "scaling_fits.png"),
                                         intervals=intervals))
        for mode, res in clusters.items():
            written.append(plot_clusters(res, os.path.join(args.out, f"clusters_{mode}.png"),
                                         title=f"K-means clusters (k={args.clusters}) of normalised curves, "
                                               f"mode {mode}"))
        for (a, b), ds in diffs.items():
            written.append(plot_mode_differences(ds, os.path.join(args.out, f"diff_{a}-{b}.png"), a, b,
                                                 relative=args.relative))
    if args.costs:
        from fusion_vlm.bench import write_cost_join

        written += write_cost_join(rows, modes, args.costs, args.out, plots=not args.no_plots)
    print("wrote " + ", ".join(written))
    return 0
