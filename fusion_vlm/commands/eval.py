"""``fusion-vlm eval``: run VLMEvalKit benchmarks on FusionVLM checkpoints, in-process.

Every checkpoint x N x mode becomes a VLMEvalKit model entry (registered in
``vlmeval.config.supported_VLM`` at run time); each is run on every dataset.
Benchmark TSVs are read from ``--data-root`` ($LMUData). The judge defaults to
exact matching (no API key); ``--judge NAME`` passes another VLMEvalKit judge.
As in the authors' evaluation, prompts are VLMEvalKit's own (``--prompt-set
vlmeval``; ``llava`` adds LLaVA-1.5 answer-format suffixes) and the answer
length is set per benchmark unless ``--max-new-tokens`` is given: 32 for
multiple choice, yes/no and COCO captions, 100 for OCRVQA/ChartQA/DocVQA,
10 for TextVQA, 512 otherwise. Every score is written with its set-up
(``<work-dir>/scores.setup.json``, ``<entry>/<dataset>.fusion_metrics.json``)
and its per-item records (question, prediction, answer, the judge's per-item
score: ``<work-dir>/scores.items.jsonl``, ``<entry>/<dataset>.items.jsonl``),
which ``fusion-vlm fit`` bootstraps over. ``--n-queries 1 4 16 ...`` runs one
checkpoint at several N (an elastic model trained with ``n_queries_choices``).
Needs the eval extra (``bash scripts/install_eval.sh``).
"""

from __future__ import annotations

import argparse
import json

from fusion_vlm.commands.generate import add_trust_argument
from fusion_vlm.errors import UsageError, user_input
from fusion_vlm.evaluation.prompts import DEFAULT_PROMPT_SET, PROMPT_SETS


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
    add_eval_generation_arguments(p)
    add_trust_argument(p)
    p.set_defaults(func=run)


def add_eval_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Prompt and decoding options shared by eval and sweep."""
    p.add_argument("--prompt-set", choices=PROMPT_SETS, default=DEFAULT_PROMPT_SET,
                   help="vlmeval: VLMEvalKit's dataset prompts (default, as the paper's authors); "
                        "llava: LLaVA-1.5 answer-format suffixes")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per answer for every benchmark (default: per benchmark, the reference rule: "
                        "32 MCQ, Y/N and COCO captions; 100 OCRVQA/ChartQA/DocVQA; 10 TextVQA; else 512)")
    p.add_argument("--seed", type=int, default=0, help="torch seed set before generating (default 0)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def generation_options(args) -> dict:
    """The model options of ``add_eval_generation_arguments`` (without batch size), checked."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "device": args.device,
            "prompt_set": args.prompt_set, "seed": args.seed}


def parse_judge_args(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--judge-args is not JSON: {err.msg}") from None
    if not isinstance(value, dict):
        raise UsageError("--judge-args must be a JSON object")
    return value


def run(args) -> int:
    import sys

    from fusion_vlm.evaluation.registry import grid_entries, run_eval
    from fusion_vlm.evaluation.sweep import write_csv

    judge_kwargs = parse_judge_args(args.judge_args)
    with user_input(UsageError):  # a checkpoint folder that is not one, a bad N or mode
        entries = grid_entries(args.checkpoint, args.n_queries or [None], args.mode, batch_size=args.batch_size,
                               trust_remote_code=args.trust_remote_code, **generation_options(args))
    try:
        results = run_eval(entries, args.data, args.work_dir, judge=args.judge, judge_kwargs=judge_kwargs,
                           nproc=args.nproc, data_root=args.data_root, batch_size=args.batch_size)
    except ImportError as err:
        print(f"fusion-vlm eval: error: {err}", file=sys.stderr)
        return 2
    rows, setups, items = [], [], []
    by_name = {e.name: e for e in entries}
    from fusion_vlm.evaluation.items import tag_items
    from fusion_vlm.evaluation.runner import checkpoint_n_queries

    for name, per_dataset in results.items():
        e = by_name[name]
        n = e.n_queries if e.n_queries is not None else checkpoint_n_queries(e.checkpoint)
        for dataset, result in per_dataset.items():
            rows += [{"metric": k, "mode": e.mode, "n_queries": n, "score": v} for k, v in result.metrics.items()]
            setups.append(result.setup)
            items += tag_items(result.items, e.mode, n, dataset)
    path = write_csv(rows, f"{args.work_dir}/scores.csv", setups=setups, items=items)
    print(f"wrote {path}")
    return 0
