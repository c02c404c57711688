"""``fusion-vlm info``: parameter counts and token accounting for a config and an image size."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="parameter counts and token accounting of a model config")
    p.add_argument("--config", default="tiny", help="preset name (tiny, paper) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. fusion.n_queries=64 (repeatable)")
    p.add_argument("--image-size", default="1008x1008", help="WIDTHxHEIGHT of the image")
    p.add_argument("--questions", type=int, default=1, help="number of questions about the image")
    p.add_argument("--device", default="meta", help="device to build the model on (meta: no memory)")
    p.add_argument("--no-params", action="store_true", help="skip building the model (token counts only)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080); raises ValueError naming the input."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or min(int(p) for p in parts) < 1:
        raise ValueError(f"--image-size {text!r}: expected WIDTHxHEIGHT with positive integers, e.g. 1008x1008")
    return int(parts[0]), int(parts[1])


def run(args) -> int:
    from fusion_vlm.config import load_model_config
    from fusion_vlm.info import as_dict, parameter_counts, prompt_length, token_accounting

    width, height = parse_size(args.image_size)
    cfg = load_model_config(args.config, args.overrides)
    acct = token_accounting(cfg, width, height, args.questions)
    params = None
    if not args.no_params:
        from fusion_vlm.model import FusionVLM

        model = FusionVLM(cfg, device=args.device)
        params = parameter_counts(model)
        acct.llm_prompt_tokens = prompt_length(model, acct)
    if args.json:
        print(json.dumps({"config": args.config, "tokens": as_dict(acct), "parameters": params}, indent=2))
        return 0
    print(f"config {args.config}  image {width}x{height}  questions {args.questions}")
    print(f"views        {acct.grid[0]}x{acct.grid[1]} local + 1 global = {acct.n_views}")
    print(f"patch tokens {acct.n_views} x {acct.patches_per_view} = {acct.vision_tokens_before_merge}")
    print(f"vision tokens after merge {acct.n_views} x {acct.tokens_per_view} = {acct.vision_tokens}")
    print(f"fused tokens per question {acct.fused_per_question} (total {acct.fused_total}, "
          f"{acct.reduction:.1f}x fewer than the vision tokens)")
    if acct.llm_prompt_tokens is not None:
        print(f"LLM prompt length {acct.llm_prompt_tokens} tokens (chat template + fused tokens)")
    if params:
        print(f"{'component':<18}{'total':>16}{'trainable':>16}")
        for name, c in params.items():
            print(f"{name:<18}{c['total']:>16,}{c['trainable']:>16,}")
    return 0
