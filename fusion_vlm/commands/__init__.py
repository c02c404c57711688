"""Subcommands of ``fusion-vlm``: one module each, discovered by :mod:`fusion_vlm.cli`."""
