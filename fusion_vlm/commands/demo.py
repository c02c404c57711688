"""``fusion-vlm demo``: the paper's method end to end on a synthetic visual-QA world, on the CPU."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train, sweep N, evaluate and fit on a synthetic world (CPU, minutes)")
    p.add_argument("--out", default="demo_out", help="output directory (rerunning skips finished stages)")
    p.add_argument("--config", default=None, metavar="quick|full|PATH",
                   help="demo recipe: a preset of configs/demo/ or a YAML file (default: full)")
    p.add_argument("--quick", action="store_true",
                   help="short for --config quick: a small run for tests and CI (about 6 minutes on 2 cores)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set stage1.steps=50 --set n_values=[1,8] (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed of the whole run (default: the config's, 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from fusion_vlm.demo.pipeline import run_demo
    from fusion_vlm.errors import UserError

    if args.quick and args.config not in (None, "quick"):
        raise UserError(f"--quick and --config {args.config} disagree: give one of them")
    config = "quick" if args.quick else (args.config or "full")
    report = run_demo(args.out, config, args.seed, args.overrides)
    print(report.read_text())
    return 0
