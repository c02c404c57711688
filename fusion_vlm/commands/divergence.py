"""``fusion-vlm divergence``: estimate D(n), phi(n), the bound and both thresholds (paper Section 3)
for a local Hugging Face causal LM on a paired (chosen / rejected) data set."""

from __future__ import annotations

import csv
import json
import os

from fusion_vlm.errors import CheckpointError, DataError, UsageError, user_input


def register(subparsers) -> None:
    p = subparsers.add_parser("divergence", help="branch-divergence estimate of a causal LM on DPO-style pairs")
    p.add_argument("--model", required=True, help="local directory of a Hugging Face causal LM and its tokenizer")
    p.add_argument("--pairs", required=True,
                   help="JSON / JSONL / parquet file with fields system (optional), question, chosen, rejected")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-pairs", type=int, default=None, help="use at most this many pairs (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per forward pass (default 4)")
    p.add_argument("--max-answer-tokens", type=int, default=512, help="cap on compared answer tokens (default 512)")
    p.add_argument("--ratio-threshold", type=float, default=1.0,
                   help="threshold 1: first n with n / (n(n-1)phi(n)) below this (default 1)")
    p.add_argument("--phi-epsilon", type=float, default=1e-3,
                   help="threshold 2: first n >= 2 with |phi(n+1) - phi(n)| below this (default 1e-3)")
    p.add_argument("--delta-method", choices=("envelope", "lsq"), default="envelope",
                   help="envelope: smallest delta with bound >= mean D(n) everywhere; lsq: least squares")
    p.add_argument("--min-pairs", type=int, default=1, help="keep only n reached by at least this many pairs")
    p.add_argument("--phi-one", type=float, default=1.0, help="value given to phi(1), which has no pair (default 1)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 or auto")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model directory's own code")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from fusion_vlm.analysis.divergence import analyse, estimate_divergence, fit_phi_scaling, load_model, load_pairs
    from fusion_vlm.analysis.plots import plot_divergence

    for name, value in (("--batch-size", args.batch_size), ("--max-answer-tokens", args.max_answer_tokens),
                        ("--min-pairs", args.min_pairs)):
        if value < 1:
            raise UsageError(f"{name} {value}: must be >= 1")
    with user_input(DataError):  # the messages name the pairs file
        pairs = load_pairs(args.pairs, args.max_pairs)
    if not pairs:
        raise DataError(f"{args.pairs}: no pairs")
    with user_input(CheckpointError, f"model '{args.model}'"):
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                      trust_remote_code=args.trust_remote_code)
    curves = estimate_divergence(model, tokenizer, pairs, batch_size=args.batch_size,
                                 max_answer_tokens=args.max_answer_tokens, phi_one=args.phi_one,
                                 progress=not args.no_progress)
    with user_input(DataError, args.pairs):  # e.g. no n reached by --min-pairs pairs, every answer empty
        result = analyse(curves, ratio_value=args.ratio_threshold, phi_epsilon=args.phi_epsilon,
                         delta_method=args.delta_method, min_pairs=args.min_pairs)
    phi_fit = None
    try:
        phi_fit = fit_phi_scaling([result["phi"]])
        result["phi_fit"] = phi_fit.as_dict()
    except ValueError as err:  # fewer than 2 positive phi(n): no fit, said in the JSON
        result["phi_fit"] = {"error": str(err)}
    result.update(model=os.path.abspath(args.model), pairs_file=os.path.abspath(args.pairs), phi_one=args.phi_one)

    os.makedirs(args.out, exist_ok=True)
    jpath, cpath = os.path.join(args.out, "divergence.json"), os.path.join(args.out, "divergence.csv")
    with open(jpath, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    with open(cpath, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["n", "mean_distance", "std_distance", "phi", "bound", "ratio", "pairs"])
        w.writerows(zip(result["n"], result["mean_distance"], result["std_distance"], result["phi"],
                        result["bound"], result["ratio"], result["counts"]))
    ppath = plot_divergence(result, os.path.join(args.out, "divergence.png"), phi_fit=phi_fit,
                            title=f"Branch divergence of {os.path.basename(os.path.normpath(args.model))} "
                                  f"on {result['n_pairs']} pairs")
    n_max = result["n"][-1]
    print(f"pairs used {result['n_pairs']}, answer tokens compared up to n = {n_max}")
    print(f"delta ({args.delta_method}) = {result['delta']:.4g}")
    print(f"threshold 1 (first n with first/second term < {args.ratio_threshold:g}): {result['ratio_threshold']}")
    print(f"threshold 2 (first n >= 2 with |dphi| < {args.phi_epsilon:g}): {result['phi_threshold']}")
    if phi_fit is not None:
        print(f"phi(n) ~ (a/n)^b: b = {phi_fit.b:.4f}, c = {phi_fit.c:.4f}, R² = {phi_fit.r2:.3f}")
    for i in (i for i in sorted({0, 1, 3, 15, n_max - 1}) if i < n_max):
        print(f"  n={result['n'][i]:>4}  D={result['mean_distance'][i]:.4g}  phi={result['phi'][i]:.4f}  "
              f"bound={result['bound'][i]:.4g}  pairs={result['counts'][i]}")
    print(f"wrote {jpath}, {cpath}, {ppath}")
    return 0
