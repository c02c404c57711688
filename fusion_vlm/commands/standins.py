"""``fusion-vlm standins``: make or probe the demo's stand-in CLIP and text-only LLM."""

from __future__ import annotations

import json

from fusion_vlm.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("standins", help="make or probe the CPU demo's stand-in CLIP and text-only LLM")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    make = sub.add_parser("make", help="train both stand-ins from scratch, probe them, write MODEL_CARD.md")
    make.add_argument("--out", default="standins_out", help="output folder (the shipped ones: "
                      "fusion_vlm/demo/standins)")
    make.add_argument("--preset", default="ship", help="step counts: a preset of fusion_vlm.demo.stage0.PRESETS")
    make.add_argument("--seed", type=int, default=0, help="seed of the world, the training and the probes")
    make.add_argument("--threads", type=int, default=1, help="torch threads (the files' bits depend on it)")
    make.add_argument("--keep-work", action="store_true", help="keep the float32 training outputs in OUT/.work")
    probe = sub.add_parser("probe", help="probe stand-ins (default: the shipped ones) and print the figures")
    probe.add_argument("--dir", default=None, help="folder made by `standins make` (default: the shipped one)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the demo world to probe on")
    probe.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from fusion_vlm.demo import stage0, standins

    if args.action == "make":
        if args.preset not in stage0.PRESETS:
            raise UsageError(f"--preset {args.preset!r}: expected one of {sorted(stage0.PRESETS)}")
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads}: must be >= 1")
        result = standins.make_standins(args.out, preset=args.preset, seed=args.seed, threads=args.threads,
                                        keep_work=args.keep_work)
        for rel, digest in result["sha256"].items():
            print(f"{digest}  {rel}")
        print(f"[standins] {result['dir']}: train {result['seconds']['train']:.0f} s, probe "
              f"{result['seconds']['probe']:.0f} s, total {result['seconds']['total']:.0f} s")
        _print(result["probe"])
        return 0
    if args.action == "probe":
        from pathlib import Path

        d = Path(args.dir) if args.dir else standins.shipped_standins()["dir"]
        if not (d / standins.CLIP_FILE).is_file():
            raise UsageError(f"--dir {str(d)!r}: no {standins.CLIP_FILE} there (make one with `standins make`)")
        result = standins.probe_standins(d, seed=args.seed)
        print(json.dumps(result, indent=2)) if args.json else _print(result)
        return 0
    raise UsageError("expected an action: make or probe (fusion-vlm standins -h)")


def _print(probe: dict) -> None:
    from fusion_vlm.demo import standins

    v = probe["vision"]
    print("vision probe (test %): " + "  ".join(f"{t} {v[t]:.1f}" for t in standins.VISION_PROBES))
    if "vision_random" in probe:
        r = probe["vision_random"]
        print("random-init tower:     " + "  ".join(f"{t} {r[t]:.1f}" for t in standins.VISION_PROBES))
    for kind, row in probe["llm"].items():
        print(f"LLM from {kind:<7} " + "  ".join(f"{f} {a:.1f}" for f, a in row.items()))
