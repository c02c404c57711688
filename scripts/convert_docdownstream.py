#!/usr/bin/env python
"""Convert mPLUG DocDownstream 1.0 (``train.jsonl``) to the LLaVA conversation format used for training.

Input: JSONL (or a JSON list) of records with

* ``image``  a list of image paths relative to the DocDownstream root (one per record in
  1.0; records with several images are skipped and counted as ``multi_image``), or one path;
* ``messages``  ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``; the image
  placeholder ``<|image|>`` in the first user turn becomes LLaVA's ``<image>`` tag, system
  turns are dropped;
* ``dataset_name`` / ``task_name`` (optional)  used for the record id
  ``<dataset_name>-<line number>`` (an ``id`` field wins when present).

Output: ``{"id", "image", "conversations"}`` records (``from`` human/gpt), JSON list or JSONL
by the output's extension; use the DocDownstream root as ``data.image_root`` when training.
``--datasets DocVQA,ChartQA`` keeps only those ``dataset_name`` values.

    python scripts/convert_docdownstream.py DocDownstream-1.0/train.jsonl -o data/docdownstream_llava.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROLE = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}
PLACEHOLDER = "<|image|>"


def convert_record(rec, line: int, keep: set[str] | None, stats: Counter) -> dict | None:
    if not isinstance(rec, dict):
        stats["bad_json"] += 1
        return None
    name = rec.get("dataset_name") or rec.get("task_name") or "doc"
    if keep is not None and name not in keep:
        stats["filtered"] += 1
        return None
    image = rec.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            stats["multi_image" if image else "no_image"] += 1
            return None
        image = image[0]
    if not isinstance(image, str) or not image:
        stats["no_image"] += 1
        return None
    msgs = rec.get("messages")
    if not isinstance(msgs, list):
        stats["no_messages"] += 1
        return None
    conv = []
    for m in msgs:
        role = ROLE.get(str(m.get("role", "")).lower()) if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(m, dict) and str(m.get("role", "")).lower() == "system":
            continue
        if role is None or not isinstance(content, str):
            stats["bad_messages"] += 1
            return None
        conv.append({"from": role, "value": content.replace(PLACEHOLDER, "").strip()})
    if not conv or conv[0]["from"] != "human":
        stats["bad_messages"] += 1
        return None
    conv[0]["value"] = "<image>\n" + conv[0]["value"]
    stats["converted"] += 1
    return {"id": str(rec.get("id", f"{name}-{line}")), "image": image.removeprefix("./"), "conversations": conv}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="DocDownstream train.jsonl")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .json or .jsonl")
    p.add_argument("--datasets", help="comma-separated dataset_name values to keep (default: all)")
    args = p.parse_args(argv)
    if not args.input.is_file():
        print(f"convert_docdownstream: error: input '{args.input}' does not exist", file=sys.stderr)
        return 2
    keep = set(args.datasets.split(",")) if args.datasets else None
    stats, out = Counter(), []
    text = args.input.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = enumerate(json.loads(text), 1)
    else:
        rows = ((i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip())
    for line, raw in rows:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raw = None
        rec = convert_record(raw, line, keep, stats)
        if rec is not None:
            out.append(rec)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.suffix == ".jsonl":
        args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    else:
        args.output.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    print(json.dumps({"output": str(args.output), **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
