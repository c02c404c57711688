"""``fusion-vlm info``: parameter counts and token accounting for a config and an image size."""

from __future__ import annotations

import json

from fusion_vlm.errors import ConfigError, UsageError, user_input


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="parameter counts and token accounting of a model config")
    p.add_argument("--config", default="tiny", help="preset name (tiny, paper) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. fusion.n_queries=64 (repeatable)")
    p.add_argument("--image-size", default="1008x1008", help="WIDTHxHEIGHT of the image")
    p.add_argument("--questions", type=int, default=1, help="number of questions about the image")
    p.add_argument("--device", default="meta", help="device to build the model on (meta: no memory)")
    p.add_argument("--no-params", action="store_true", help="skip building the model (token counts only)")
    p.add_argument("--llm", default=None, metavar="SPEC",
                   help="cost model of an LLM (preset such as llama-2-7b, or a config.json): prefill FLOPs, KV cache")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080); raises ValueError naming the input."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or min(int(p) for p in parts) < 1:
        raise UsageError(f"--image-size {text!r}: expected WIDTHxHEIGHT with positive integers, e.g. 1008x1008")
    return int(parts[0]), int(parts[1])


def run(args) -> int:
    from fusion_vlm.config import load_model_config
    from fusion_vlm.info import as_dict, parameter_counts, prompt_length, token_accounting

    width, height = parse_size(args.image_size)
    if args.questions < 1:
        raise UsageError(f"--questions {args.questions}: must be >= 1")
    with user_input(ConfigError):  # a missing preset / YAML file or a bad --set
        cfg = load_model_config(args.config, args.overrides)
    acct = token_accounting(cfg, width, height, args.questions)
    params = None
    if not args.no_params:
        from fusion_vlm.model import FusionVLM

        model = FusionVLM(cfg, device=args.device)
        params = parameter_counts(model)
        acct.llm_prompt_tokens = prompt_length(model, acct)
    if args.llm:
        from fusion_vlm.tokens import cost

        with user_input(UsageError, "--llm"):
            cost.load_llm_config(args.llm)
    costs = _costs(cfg, acct, args.llm) if args.llm else None
    if args.json:
        print(json.dumps({"config": args.config, "tokens": as_dict(acct), "parameters": params, "cost": costs},
                         indent=2))
        return 0
    print(f"config {args.config}  image {width}x{height}  questions {args.questions}")
    print(f"views        {acct.grid[0]}x{acct.grid[1]} local + 1 global = {acct.n_views}")
    print(f"patch tokens {acct.n_views} x {acct.patches_per_view} = {acct.vision_tokens_before_merge}")
    print(f"vision tokens after merge {acct.n_views} x {acct.tokens_per_view} = {acct.vision_tokens}")
    print(f"fused tokens per question {acct.fused_per_question} (total {acct.fused_total}, "
          f"{acct.reduction:.1f}x fewer than the vision tokens)")
    if acct.llm_prompt_tokens is not None:
        print(f"LLM prompt length {acct.llm_prompt_tokens} tokens (chat template + fused tokens)")
    if costs:
        print(f"cost ({costs['llm']}): prefill {costs['fusion_path_tflops']:.2f} TFLOPs with fusion (module "
              f"{costs['fusion_module_tflops']:.2f}) vs {costs['baseline_tflops']:.2f} feeding all vision tokens "
              f"({costs['speedup']:.2f}x); KV cache {costs['kv_mib_fusion']:.1f} vs {costs['kv_mib_baseline']:.1f} MiB")
    if params:
        print(f"{'component':<18}{'total':>16}{'trainable':>16}")
        for name, c in params.items():
            print(f"{name:<18}{c['total']:>16,}{c['trainable']:>16,}")
    return 0


def _costs(cfg, acct, llm_spec: str) -> dict:
    """Predicted prefill cost of the fusion path vs the LLaVA-style baseline (fusion_vlm.tokens.cost)."""
    from fusion_vlm.tokens import cost

    llm = cost.load_llm_config(llm_spec)
    f = cfg.fusion
    fusion = cost.TransformerConfig("fusion", hidden=f.hidden_size, layers=f.num_layers, heads=f.num_heads,
                                    kv_heads=f.num_kv_heads, intermediate=f.intermediate_size, vocab=0)
    n, later = acct.fused_per_question[0], (acct.fused_per_question[1:] or [min(acct.fused_per_question[0], 8)])[0]
    rep = cost.prefill_speedup(n, later, len(acct.fused_per_question), vision_tokens=acct.vision_tokens, llm=llm,
                               fusion=fusion, vision_width=cfg.vision.width)
    return {"llm": llm.name, "baseline_tflops": rep.baseline_flops / 1e12,
            "fusion_module_tflops": rep.fusion_module_flops / 1e12,
            "fusion_path_tflops": (rep.fusion_module_flops + rep.fusion_llm_flops) / 1e12, "speedup": rep.speedup,
            "kv_mib_baseline": cost.kv_cache_bytes(llm, rep.baseline_context) / 2**20,
            "kv_mib_fusion": cost.kv_cache_bytes(llm, rep.fusion_context) / 2**20}
