"""``fusion-vlm eval``: run VLMEvalKit benchmarks on FusionVLM checkpoints, in-process.

Every checkpoint x N x mode becomes a VLMEvalKit model entry (registered in
``vlmeval.config.supported_VLM`` at run time); each is run on every dataset.
Benchmark TSVs are read from ``--data-root`` ($LMUData). The judge defaults to
exact matching (no API key); ``--judge NAME`` passes another VLMEvalKit judge.
Needs the eval extra (``bash scripts/install_eval.sh``).
"""

from __future__ import annotations

import argparse
import json

from fusion_vlm.commands.generate import add_generation_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="run VLMEvalKit benchmarks on checkpoints",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint directories")
    p.add_argument("--data", nargs="+", required=True, help="VLMEvalKit dataset names (e.g. POPE MMStar)")
    p.add_argument("--n-queries", type=int, nargs="+", default=None,
                   help="N values to run each checkpoint with (default: each checkpoint's own N)")
    p.add_argument("--mode", nargs="+", default=["vqq"], choices=["vqq", "vq_ft", "vq"],
                   help="vqq fuses the question; vq and vq_ft drop it (default vqq)")
    p.add_argument("--work-dir", default="outputs/eval", help="where predictions and scores go")
    p.add_argument("--data-root", default=None, help="folder of benchmark TSVs, used as $LMUData")
    p.add_argument("--judge", default="exact_matching",
                   help="VLMEvalKit judge model (default exact_matching: no API calls)")
    p.add_argument("--judge-args", default=None, help="JSON object of extra judge kwargs (e.g. api_base)")
    p.add_argument("--nproc", type=int, default=1, help="judge worker processes (default 1)")
    add_generation_arguments(p)
    p.set_defaults(func=run)


def parse_judge_args(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--judge-args is not JSON: {err.msg}") from None
    if not isinstance(value, dict):
        raise ValueError("--judge-args must be a JSON object")
    return value


def run(args) -> int:
    import sys

    from fusion_vlm.evaluation.registry import grid_entries, run_eval
    from fusion_vlm.evaluation.sweep import write_csv

    judge_kwargs = parse_judge_args(args.judge_args)
    entries = grid_entries(args.checkpoint, args.n_queries or [None], args.mode,
                           max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                           batch_size=args.batch_size, device=args.device)
    try:
        results = run_eval(entries, args.data, args.work_dir, judge=args.judge, judge_kwargs=judge_kwargs,
                           nproc=args.nproc, data_root=args.data_root, batch_size=args.batch_size)
    except ImportError as err:
        print(f"fusion-vlm eval: error: {err}", file=sys.stderr)
        return 2
    rows = []
    by_name = {e.name: e for e in entries}
    from fusion_vlm.evaluation.runner import checkpoint_n_queries

    for name, per_dataset in results.items():
        e = by_name[name]
        n = e.n_queries if e.n_queries is not None else checkpoint_n_queries(e.checkpoint)
        for metrics in per_dataset.values():
            rows += [{"metric": k, "mode": e.mode, "n_queries": n, "score": v} for k, v in metrics.items()]
    path = write_csv(rows, f"{args.work_dir}/scores.csv")
    print(f"wrote {path}")
    return 0
