#!/usr/bin/env python
"""Convert BAAI-SVIT's native annotation files to the LLaVA conversation format used for training.

Input (SVIT ``data/*.json`` -- conversation, complex_reasoning, detail_description,
referring_qa): a JSON list (or JSONL) of records with

* ``image_id``  Visual Genome image id (int or str); the image path is built with
  ``--image-template`` (default ``VG_100K/{image_id}.jpg``); a record that already has
  ``image`` keeps it;
* ``conversations``  either one conversation -- a list of ``{"from": "user"|"human"|"gpt",
  "value": str}`` turns -- or several: a list of objects each holding such a turn list under
  ``conversation``, ``conversations`` or ``qas`` (SVIT's conversation task has 3 per image);
  each becomes its own LLaVA record (id ``<image_id>_<k>``).

Referring-QA markers ``<st>object<ed> [x1, y1, x2, y2]`` are kept as written unless
``--strip-markers`` (removes ``<st>``/``<ed>``, keeps the boxes). ``<image>`` is put at the
start of the first human turn. Output: ``{"id", "image", "conversations"}`` records, JSON list
or JSONL by the output file's extension. Records that cannot be converted are counted and
reported by reason; training applies its own validation on top.

    python scripts/convert_svit.py data/svit/conversation.json data/svit/complex_reasoning.json \\
        -o data/svit_llava.json --image-template "VG_100K/{image_id}.jpg"
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROLE = {"user": "human", "human": "human", "gpt": "gpt", "assistant": "gpt"}


def load_any(path: Path) -> list:
    """Records of a JSON list or JSONL file (a bad JSONL line becomes None)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(None)
    return out


def split_conversations(conv) -> list[list[dict]]:
    """SVIT ``conversations`` -> a list of turn lists."""
    if not isinstance(conv, list) or not conv:
        return []
    if all(isinstance(t, dict) and "from" in t for t in conv):
        return [conv]
    out = []
    for item in conv:
        if isinstance(item, dict):
            for key in ("conversation", "conversations", "qas"):
                if isinstance(item.get(key), list):
                    out.append(item[key])
                    break
    return out


def convert_turns(turns: list[dict], strip_markers: bool) -> list[dict] | None:
    """SVIT turns -> LLaVA turns with ``<image>`` in the first human turn; None if malformed."""
    out = []
    for t in turns:
        role = ROLE.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
        value = t.get("value") if isinstance(t, dict) else None
        if role is None or not isinstance(value, str):
            return None
        value = value.replace("<image>", "").strip()
        if strip_markers:
            value = re.sub(r"</?(st|ed)>", "", value)
        out.append({"from": role, "value": value})
    if not out or out[0]["from"] != "human":
        return None
    out[0]["value"] = "<image>\n" + out[0]["value"]
    return out


def convert(records: list, image_template: str, strip_markers: bool, stats: Counter) -> list[dict]:
    out = []
    for rec in records:
        if not isinstance(rec, dict):
            stats["bad_json"] += 1
            continue
        image = rec.get("image")
        if not image:
            if rec.get("image_id") is None:
                stats["no_image_id"] += 1
                continue
            image = image_template.format(image_id=rec["image_id"])
        base = str(rec.get("id", rec.get("image_id")))
        convs = split_conversations(rec.get("conversations"))
        if not convs:
            stats["no_conversations"] += 1
            continue
        for k, turns in enumerate(convs):
            conv = convert_turns(turns, strip_markers)
            if conv is None:
                stats["bad_turns"] += 1
                continue
            out.append({"id": base if len(convs) == 1 else f"{base}_{k}", "image": image, "conversations": conv})
            stats["converted"] += 1
    return out


def write(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="SVIT JSON/JSONL files")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .json or .jsonl")
    p.add_argument("--image-template", default="VG_100K/{image_id}.jpg", help="image path from {image_id}")
    p.add_argument("--strip-markers", action="store_true", help="remove <st>/<ed> from referring QAs")
    args = p.parse_args(argv)
    stats, out = Counter(), []
    for path in args.inputs:
        if not path.is_file():
            print(f"convert_svit: error: input '{path}' does not exist", file=sys.stderr)
            return 2
        try:
            out += convert(load_any(path), args.image_template, args.strip_markers, stats)
        except json.JSONDecodeError as err:
            print(f"convert_svit: error: '{path}' is not valid JSON ({err})", file=sys.stderr)
            return 2
    write(out, args.output)
    print(json.dumps({"output": str(args.output), **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
