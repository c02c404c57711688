"""``fusion-vlm fit``: fit P(N) = (a/N)^b to every (metric, mode) of a long score CSV, write tables and plots."""

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
    p.add_argument("--seed", type=int, default=0, help="K-means seed (default 0)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
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


def write_fit_table(fits: dict, out_dir: str) -> tuple[str, str]:
    """fits.csv and fits.json in ``out_dir`` (one row / object per (metric, mode))."""
    csv_path, json_path = os.path.join(out_dir, "fits.csv"), os.path.join(out_dir, "fits.json")
    fields = ["metric", "mode", "a", "b", "c", "r2", "n_points", "degenerate", "message"]
    records = []
    for (metric, mode), fit in fits.items():
        rec = {"metric": metric, "mode": mode}
        rec.update(fit.as_dict() if fit is not None else
                   {"a": None, "b": None, "c": None, "r2": None, "n_points": None,
                    "degenerate": True, "message": "not fittable (fewer than 2 distinct N or a score <= 0)"})
        records.append(rec)
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(records, fh, indent=2)
    return csv_path, json_path


def _fmt(fit) -> str:
    if fit is None:
        return f"{'not fittable':>12}"
    a = f"{fit.a:.4e}" if not fit.degenerate else ("inf" if fit.a > 0 else "0") + " (degenerate)"
    return f"{a:>22}{fit.b:>9.4f}{fit.c:>9.4f}{fit.r2:>7.3f}{fit.n_points:>4}"


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

    fits = fit_all(rows, modes)
    print(f"{'metric':<28}{'mode':<8}{'a':>22}{'b':>9}{'c':>9}{'R²':>7}{'n':>4}")
    for (metric, mode), fit in fits.items():
        print(f"{metric:<28}{mode:<8}{_fmt(fit)}")
    written = list(write_fit_table(fits, args.out))

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

        written.append(plot_scaling_fits(group_curves(rows, modes), fits, os.path.join(args.out, "scaling_fits.png")))
        for mode, res in clusters.items():
            written.append(plot_clusters(res, os.path.join(args.out, f"clusters_{mode}.png"),
                                         title=f"K-means clusters (k={args.clusters}) of normalised curves, "
                                               f"mode {mode}"))
        for (a, b), ds in diffs.items():
            written.append(plot_mode_differences(ds, os.path.join(args.out, f"diff_{a}-{b}.png"), a, b,
                                                 relative=args.relative))
    print("wrote " + ", ".join(written))
    return 0
