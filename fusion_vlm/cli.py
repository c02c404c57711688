"""The ``fusion-vlm`` command line.

Every subcommand lives in its own module under :mod:`fusion_vlm.commands`; a
module there exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a function taking the parsed namespace. Commands translate the
namespace into plain library calls: nothing in the library sees argparse.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from fusion_vlm import commands


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every command module registered."""
    parser = argparse.ArgumentParser(
        prog="fusion-vlm",
        description="Question-fused visual-token reduction for vision-language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as err:  # user errors: one line, no traceback
        print(f"fusion-vlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
