"""``fusion-vlm demo``: the paper's method end to end on a synthetic visual-QA world, on the CPU."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train, sweep N, evaluate and fit on a synthetic world (CPU, minutes)")
    p.add_argument("--out", default="demo_out", help="output directory (rerunning skips finished stages)")
    p.add_argument("--quick", action="store_true", help="a small run for tests and CI (about 6 minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from fusion_vlm.demo.pipeline import run_demo

    report = run_demo(args.out, "quick" if args.quick else "full", args.seed)
    print(report.read_text())
    return 0
