"""``fusion-vlm tokens``: visual tokens per model for one image size, optionally with LLM cost.

    fusion-vlm tokens --size 1920x1080 [--model NAME ...] [--json] [--n-queries N --n-later N'
        --questions K] [--config paper|MODEL.yaml]
        [--pan-and-scan] [--llm llama-2-7b|CONFIG.json] [--kv-dtype bf16] [--plot OUT.png]

Translates arguments into :mod:`fusion_vlm.tokens` calls; see docs/tokens.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from fusion_vlm.config import load_model_config
from fusion_vlm.errors import UsageError, user_input
from fusion_vlm.tokens import cost
from fusion_vlm.tokens.calculator import count_visual_tokens, list_models, model_knobs, parse_size


def register(subparsers) -> None:
    """Add the ``tokens`` parser to ``subparsers`` with ``func=run``."""
    p = subparsers.add_parser("tokens", help="count visual tokens per model for an image size",
                              description="Visual tokens one image costs in each model's LLM context "
                                          "(rules mirror the transformers processors; see docs/tokens.md).")
    p.add_argument("--size", required=True, metavar="WxH", help="image size in pixels, e.g. 1920x1080")
    p.add_argument("--model", action="extend", nargs="+", metavar="NAME", default=None,
                   help=f"models to show (default all): {', '.join(list_models())}")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--n-queries", type=int, default=None, metavar="N",
                   help="fusion-vlm: N slots, first question (default: the model config's fusion.n_queries)")
    p.add_argument("--n-later", type=int, default=None, metavar="N'",
                   help="fusion-vlm: N' slots per later question (default: the config's rule, min(N, 8))")
    p.add_argument("--config", default="paper", metavar="MODEL",
                   help="fusion-vlm: model preset or YAML whose views/merge/fusion settings give its counts "
                        "(default paper)")
    p.add_argument("--questions", type=int, default=1, metavar="K", help="fusion-vlm: questions about the image")
    p.add_argument("--pan-and-scan", action="store_true", help="gemma3: enable Pan&Scan with its default knobs")
    p.add_argument("--llm", metavar="CONFIG", default=None,
                   help=f"add LLM prefill FLOPs and KV cache: preset ({', '.join(cost.PRESETS)}) or config.json")
    p.add_argument("--kv-dtype", default="bfloat16", help="KV-cache element type (default bfloat16)")
    p.add_argument("--question-tokens", type=int, default=32, help="tokens per question for the speed-up estimate")
    p.add_argument("--prompt-tokens", type=int, default=32, help="chat-template tokens for the speed-up estimate")
    p.add_argument("--plot", metavar="OUT.png", default=None, help="also write the tokens-vs-resolution figure")
    p.add_argument("-v", "--verbose", action="store_true", help="add a column saying how each count was made")
    p.set_defaults(func=run)


def _knobs(args) -> dict[str, dict]:
    given = {"n_queries": args.n_queries, "n_later": args.n_later, "n_questions": args.questions,
             "pan_and_scan": args.pan_and_scan, "config": args.model_config}
    return {m: {k: v for k, v in given.items() if k in model_knobs(m) and v is not None} for m in list_models()}


def _rows(args, names, width: int, height: int, llm):
    knobs = _knobs(args)
    rows = []
    for name in names:
        try:
            count = count_visual_tokens(name, width, height, **knobs[name])
        except ValueError as err:  # a size this model's processor refuses (e.g. Qwen aspect > 200)
            rows.append({"model": name, "error": str(err)})
            continue
        row = asdict(count)
        if llm is not None:
            row["llm"] = {"prefill_flops": cost.prefill_flops(llm, count.total, lm_head_tokens=0),
                          "kv_cache_bytes": cost.kv_cache_bytes(llm, count.total, args.kv_dtype)}
        rows.append(row)
    return rows


def _check_args(args) -> list[str]:
    """Validate model names and fusion knobs up front; returns the canonical model names."""
    names = [n.strip().lower() for n in (args.model or list_models())]
    for name in names:
        model_knobs(name)  # raises ValueError naming an unknown model
    for flag, val in (("--n-queries", 1 if args.n_queries is None else args.n_queries),
                      ("--questions", args.questions), ("--n-later", 1 if args.n_later is None else args.n_later)):
        if val < 1:
            raise UsageError(f"{flag} must be >= 1, got {val}")
    return names


def _fusion_summary(args, rows, llm):
    row = next((r for r in rows if r.get("model") == "fusion-vlm" and "error" not in r), None)
    if row is None or llm is None:
        return None
    d = row["details"]
    cfg = args.model_config
    rep = cost.prefill_speedup(n_queries=d["n_queries"], n_later=d["n_later"], n_questions=d["n_questions"],
                               question_tokens=args.question_tokens, prompt_tokens=args.prompt_tokens,
                               vision_tokens=d["fusion_vision_tokens"], llm=llm,
                               fusion=cost.fusion_transformer(cfg.fusion), vision_width=cfg.vision.width)
    return asdict(rep)


def _table(rows, width, height, llm, args) -> str:
    head = ["model", "image", "specials", "total"] + (["LLM prefill TFLOPs", "KV-cache MiB"] if llm else [])
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], "-", f"error: {r['error']}", "-"] + (["-", "-"] if llm else []))
            continue
        spec = ", ".join(f"{k}={v}" for k, v in r["special_tokens"].items()) or "-"
        line = [r["model"], str(r["image_tokens"]), spec, str(r["total"])]
        if llm:
            line += [f"{r['llm']['prefill_flops'] / 1e12:.2f}", f"{r['llm']['kv_cache_bytes'] / 2**20:.1f}"]
        if args.verbose:
            line.append(r["note"])
        body.append(line)
    if args.verbose:
        head.append("how")
    widths = [max(len(x[i]) for x in [head] + body if i < len(x)) for i in range(len(head))]
    numeric = {1, 3, 4, 5}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [f"visual tokens for a {width}x{height} image" + (f"; LLM = {llm.name}, KV {args.kv_dtype}" if llm else ""),
             fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    return "\n".join(lines)


def run(args) -> int:
    """Print the table (or JSON) for ``args.size``; returns 0. Bad input raises UsageError."""
    with user_input(UsageError, "--size"):
        width, height = parse_size(args.size)
    with user_input(UsageError, "--llm"):
        llm = cost.load_llm_config(args.llm) if args.llm else None
    if llm is not None:
        with user_input(UsageError, "--kv-dtype"):
            cost.kv_cache_bytes(llm, 0, args.kv_dtype)  # validates the dtype before any output
    with user_input(UsageError, "--model"):
        names = _check_args(args)
    with user_input(UsageError, "--config"):
        args.model_config = load_model_config(args.config)
    rows = _rows(args, names, width, height, llm)
    fusion = _fusion_summary(args, rows, llm)
    if args.json:
        out = {"width": width, "height": height, "models": rows}
        if llm is not None:
            out["llm"] = asdict(llm)
            out["kv_dtype"] = args.kv_dtype
        if fusion is not None:
            out["fusion_speedup"] = fusion
        print(json.dumps(out, indent=2))
    else:
        print(_table(rows, width, height, llm, args))
        fv = next((r for r in rows if r.get("model") == "fusion-vlm" and "error" not in r), None)
        if fv is not None:
            d = fv["details"]
            print(f"\nfusion-vlm: {d['fusion_vision_tokens']} vision tokens ({d['local_views']} local views + global)"
                  f" enter the fusion module; the LLM gets N={d['n_queries']}"
                  + (f" + {d['n_questions'] - 1} x N'={d['n_later']}" if d["n_questions"] > 1 else "") + ".")
        if fusion is not None:
            print(f"predicted prefill speed-up vs feeding all {fv['details']['fusion_vision_tokens']} vision tokens "
                  f"to {llm.name}: {fusion['speedup']:.2f}x (fusion module {fusion['fusion_module_flops'] / 1e12:.2f}"
                  f" + LLM {fusion['fusion_llm_flops'] / 1e12:.2f} vs {fusion['baseline_flops'] / 1e12:.2f} TFLOPs;"
                  f" {args.question_tokens} question / {args.prompt_tokens} prompt tokens per turn)")
    if args.plot:
        from fusion_vlm.tokens.plot import plot_tokens_vs_resolution

        path = plot_tokens_vs_resolution(args.plot, models=names, knobs=_knobs(args))
        if not args.json:
            print(f"wrote {path}")
    return 0
