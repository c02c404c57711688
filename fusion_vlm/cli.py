"""The ``fusion-vlm`` command line.

Every subcommand lives in its own module under :mod:`fusion_vlm.commands`; a
module there exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a function taking the parsed namespace. Commands translate the
namespace into plain library calls: nothing in the library sees argparse.

Exit codes: 0 success; 2 bad input -- a :class:`fusion_vlm.errors.UserError`
(bad argument, config, image, checkpoint or data file, or a missing file the
user named), printed as one line ``fusion-vlm COMMAND: error: ...`` naming the
input. Any other exception is a bug and keeps its traceback (exit 1).
Commands may define more codes (``generate``: 3 when some batch requests
failed; ``train``: 143 when stopped by a signal).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from fusion_vlm import commands
from fusion_vlm.errors import UserError, one_line

USER_ERROR = 2  # exit code of a UserError (argparse uses 2 for bad usage too)


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
    except UserError as err:  # bad input: one line naming it, no traceback; anything else is a bug and raises
        print(f"fusion-vlm {args.command}: error: {one_line(err)}", file=sys.stderr)
        return USER_ERROR
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
