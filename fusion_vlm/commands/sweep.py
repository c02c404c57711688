"""``fusion-vlm sweep``: every N x mode x benchmark, resumable, into one tidy CSV.

    fusion-vlm sweep --checkpoint 1=ckpt/n1 8=ckpt/n8 ... --ft-checkpoint 1=ckpt/n1_noq ... \\
        --data MME POPE MMStar --out runs/sweep

``--checkpoint`` gives the stage-3 checkpoint per N (modes vqq and vq),
``--ft-checkpoint`` the one fine-tuned without the question (mode vq_ft); a
bare DIR takes N from its config.yaml. One model for every N (trained with
``n_queries_choices``, e.g. the stage2_elastic preset) is swept with

    fusion-vlm sweep --checkpoint runs/stage2_elastic/final --n-queries 1 8 16 32 64 128 256 384 512 768 \\
        --data MME POPE --out runs/sweep_elastic

(each of --checkpoint / --ft-checkpoint then takes one DIR, run at every N). Finished cells are skipped on
rerun.
The CSV (default <out>/scores.csv) has the columns metric,mode,n_queries,score
of paper_appendix_scores.csv, ready for ``fusion-vlm fit --csv``; the set-up of
every cell (prompt set, max_new_tokens, judge, batch size, seed, N, mode,
package versions) is in its cell file and in <csv stem>.setup.json, and its
per-item records (question, prediction, answer, per-item score) in
<csv stem>.items.jsonl, which ``fusion-vlm fit`` bootstraps over. Prompts and
answer lengths default to the authors' (see ``fusion-vlm eval --help``).
Needs the eval extra (``bash scripts/install_eval.sh``).
"""

from __future__ import annotations

import argparse

from fusion_vlm.commands.eval import add_eval_generation_arguments, generation_options, parse_judge_args
from fusion_vlm.commands.generate import add_trust_argument
from fusion_vlm.errors import UsageError, user_input


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="evaluate checkpoints over N, modes and benchmarks into one CSV",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=[], help="N=DIR (or DIR) per N, trained with the question")
    p.add_argument("--ft-checkpoint", nargs="+", default=[], help="N=DIR per N, fine-tuned without the question")
    p.add_argument("--n-queries", type=int, nargs="+", default=None, metavar="N",
                   help="run one checkpoint (one --checkpoint DIR, one --ft-checkpoint DIR) at every N given")
    p.add_argument("--mode", nargs="+", default=None, choices=["vqq", "vq_ft", "vq"],
                   help="modes to run (default: vqq and vq, plus vq_ft when --ft-checkpoint is given)")
    p.add_argument("--data", nargs="+", required=True, help="VLMEvalKit dataset names")
    p.add_argument("--out", default="outputs/sweep", help="sweep folder (cells, VLMEvalKit work dirs, CSV)")
    p.add_argument("--csv", default=None, help="CSV path (default <out>/scores.csv)")
    p.add_argument("--data-root", default=None, help="folder of benchmark TSVs, used as $LMUData")
    p.add_argument("--judge", default="exact_matching", help="VLMEvalKit judge (default exact_matching)")
    p.add_argument("--judge-args", default=None, help="JSON object of extra judge kwargs")
    p.add_argument("--nproc", type=int, default=1, help="judge worker processes (default 1)")
    add_eval_generation_arguments(p)
    add_trust_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from fusion_vlm.evaluation.sweep import (
        check_done_cells,
        elastic_checkpoints,
        parse_checkpoints,
        plan_cells,
        run_sweep,
    )

    with user_input(UsageError):  # N=DIR specs, modes and dataset names
        if args.n_queries:  # one elastic model for every N
            checkpoints = elastic_checkpoints(args.checkpoint, args.n_queries) if args.checkpoint else {}
            ft = elastic_checkpoints(args.ft_checkpoint, args.n_queries, "--ft-checkpoint") \
                if args.ft_checkpoint else {}
        else:
            checkpoints = parse_checkpoints(args.checkpoint)
            ft = parse_checkpoints(args.ft_checkpoint)
        modes = args.mode or (["vqq", "vq_ft", "vq"] if ft else ["vqq", "vq"])
        cells = plan_cells(checkpoints, args.data, modes, ft)
    judge_kwargs = parse_judge_args(args.judge_args)
    options = generation_options(args)
    check_done_cells(args.out, cells, args.prompt_set, args.max_new_tokens, args.do_sample)
    try:
        from fusion_vlm.evaluation.registry import cell_evaluator, import_vlmeval

        import_vlmeval()
    except ImportError as err:
        print(f"fusion-vlm sweep: error: {err}", file=sys.stderr)
        return 2
    evaluate = cell_evaluator(judge=args.judge, judge_kwargs=judge_kwargs, nproc=args.nproc,
                              data_root=args.data_root, batch_size=args.batch_size,
                              trust_remote_code=args.trust_remote_code, **options)
    run_sweep(args.out, cells, evaluate, csv_path=args.csv)
    return 0
