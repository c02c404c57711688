"""LLaVA-format conversation data -> model samples, with bad samples skipped and counted.

A record is ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}...]}``
(JSON list or JSONL; ``user``/``assistant`` roles are accepted too, a leading
``system`` turn is ignored). The ``<image>`` tag in the first human turn is
removed. Each record becomes one image with its question groups: the first
question gets N query slots, later ones N'.

Bad records never stop a run: :func:`parse_record` raises :class:`SkipSample`
with a reason from :data:`SKIP_REASONS`; structural problems are found when
the files are loaded, image and length problems when a sample is built. A
:class:`SkipCounter` counts them by reason, prints the first few with their
ids and aborts (``TooManySkipped``) when the skipped fraction passes a ceiling,
so a wrong image root cannot silently skip everything.

Image paths stay inside ``data.image_root``: a path that leaves it (absolute,
``..``, or a symlink pointing out, checked on the resolved real path) is
skipped as ``outside_image_root`` unless ``data.allow_outside_image_root`` is
set, so a data file cannot make training read arbitrary files.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from fusion_vlm.errors import DataError, MissingFileError

SKIP_REASONS = ("bad_record", "no_image", "no_human_turn", "turn_order", "empty_answer", "missing_image",
                "unreadable_image", "too_long", "invalid_text", "outside_image_root")
HUMAN, GPT = ("human", "user"), ("gpt", "assistant")
IMAGE_TAG = "<image>"


class SkipSample(Exception):
    """A record that cannot be trained on; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, sample_id: str, message: str):
        super().__init__(f"sample '{sample_id}': {reason}: {message}")
        self.reason, self.sample_id, self.message = reason, sample_id, message


class TooManySkipped(RuntimeError):
    """The skipped fraction passed ``data.max_skip_fraction``."""


@dataclass
class SkipCounter:
    """Counts skipped records by reason (each record once), prints the first few, enforces the ceiling.

    ``total`` is the number of records considered at load time. Skips found at
    load time and while training (unreadable image, text too long) are counted
    once per record. The ceiling is checked on all records after loading and,
    while training, on the samples attempted so far (a wrong image root or an
    unreadable image store is caught after ``min_seen`` attempts).
    """

    max_fraction: float = 0.5  # abort above this skipped fraction...
    min_seen: int = 20  # ...once this many samples were attempted in training
    log_first: int = 5  # print this many skips with their ids
    total: int = 0
    reasons: dict = field(default_factory=dict)  # record key (str) -> reason
    attempts: int = 0
    failed_attempts: int = 0
    logged: int = 0

    @property
    def counts(self) -> Counter:
        """Skipped records by reason."""
        return Counter(self.reasons.values())

    @property
    def skipped(self) -> int:
        return len(self.reasons)

    def attempt(self, ok: bool) -> None:
        """Record one sample built while training (``ok`` False when it was skipped)."""
        self.attempts += 1
        self.failed_attempts += 0 if ok else 1

    def skip(self, reason: str, sample_id: str, message: str = "", key=None) -> None:
        """Record a skipped record (once per ``key``, default its id); logs the first ``log_first``."""
        key = str(sample_id if key is None else key)
        if key in self.reasons:
            return
        self.reasons[key] = reason
        if self.logged < self.log_first:
            self.logged += 1
            print(f"[data] skipped sample '{sample_id}' ({reason}): {message}", file=sys.stderr)

    def check(self, final: bool = False, attempts: int | None = None, failed: int | None = None) -> None:
        """Raise :class:`TooManySkipped` when the ceiling is passed.

        ``final``: over all records (after loading). Otherwise over the samples
        attempted in training: this process's, or ``attempts``/``failed`` summed
        over all ranks (so every rank stops together).
        """
        attempts = self.attempts if attempts is None else attempts
        failed = self.failed_attempts if failed is None else failed
        frac = None
        if final and self.total:
            frac, seen, skipped = self.skipped / self.total, self.total, self.skipped
        elif not final and attempts >= max(self.min_seen, 1):
            frac, seen, skipped = failed / attempts, attempts, failed
        if frac is None or frac <= self.max_fraction:
            return
        counts = self.counts
        top = ", ".join(f"{k}={v}" for k, v in counts.most_common())
        hint = " -- is data.image_root right?" if counts.get("missing_image", 0) * 2 > self.skipped else ""
        raise TooManySkipped(f"{skipped} of {seen} samples skipped ({frac:.0%} > data.max_skip_fraction="
                             f"{self.max_fraction}): {top}{hint}")

    def summary(self) -> dict:
        """Counts as a plain dict: {"records", "skipped", "by_reason": {...}}."""
        return {"records": self.total, "skipped": self.skipped, "by_reason": dict(sorted(self.counts.items()))}

    def state(self) -> dict:
        """JSON-safe state (for checkpoints and for gathering across ranks)."""
        return {"total": self.total, "reasons": dict(self.reasons), "attempts": self.attempts,
                "failed_attempts": self.failed_attempts, "logged": self.logged}

    def load_state(self, state: dict) -> None:
        """Restore a :meth:`state`."""
        self.total, self.reasons = state["total"], dict(state["reasons"])
        self.attempts, self.failed_attempts = state["attempts"], state["failed_attempts"]
        self.logged = state.get("logged", self.log_first)

    def merge(self, state: dict) -> None:
        """Add the skips another rank found (same records, different samples)."""
        for key, reason in state["reasons"].items():
            self.reasons.setdefault(key, reason)
        self.attempts += state["attempts"]
        self.failed_attempts += state["failed_attempts"]


def read_records(path: str | Path) -> list[dict | SkipSample]:
    """Records of a JSON-list or JSONL file; an unparsable JSONL line becomes a ``bad_record`` skip."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"data file '{path}': not UTF-8 text ({err})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"data file '{path}': invalid JSON ({err})") from None
        return list(data)
    out: list[dict | SkipSample] = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            out.append(SkipSample("bad_record", f"{path.name}:{i + 1}", f"invalid JSON line ({err})"))
    return out


def image_path(image: str, image_root: str | None, sample_id: str, allow_outside_root: bool = False) -> str:
    """``image`` resolved against ``image_root``; raises :class:`SkipSample` (``outside_image_root``) when its
    real path (symlinks resolved) is not inside the real ``image_root``, unless ``allow_outside_root``."""
    if image_root is None:
        return image
    path = os.path.join(image_root, image)  # an absolute `image` stays as it is
    if allow_outside_root:
        return path
    root, real = os.path.realpath(image_root), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise SkipSample("outside_image_root", sample_id, f"image '{image}' resolves to '{real}', outside "
                         f"data.image_root '{root}' (set data.allow_outside_image_root=true to allow it)")
    return path


def parse_record(raw, image_root: str | None, max_questions: int | None = None, index: int = 0,
                 allow_outside_root: bool = False) -> dict:
    """Validate one LLaVA record -> {"id", "image", "questions", "answers"}; raises :class:`SkipSample`.

    ``image`` is resolved with :func:`image_path` (kept inside ``image_root`` unless ``allow_outside_root``).
    """
    if not isinstance(raw, dict):
        raise SkipSample("bad_record", f"#{index}", f"expected an object, got {type(raw).__name__}")
    sid = str(raw.get("id", f"#{index}"))
    image = raw.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if not image:
        raise SkipSample("no_image", sid, "no 'image' field (text-only records are not used)")
    if not isinstance(image, str):
        raise SkipSample("bad_record", sid, f"'image' must be one path, got {image!r:.80}")
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
        raise SkipSample("bad_record", sid, "'conversations' must be a list of {from, value} objects")
    turns = [t for t in conv if str(t.get("from", "")).lower() != "system"]
    roles = [str(t.get("from", "")).lower() for t in turns]
    if not any(r in HUMAN for r in roles):
        raise SkipSample("no_human_turn", sid, f"no human turn among roles {roles}")
    questions, answers = [], []
    for k, (role, turn) in enumerate(zip(roles, turns)):
        want = HUMAN if k % 2 == 0 else GPT
        if role not in want:
            raise SkipSample("turn_order", sid, f"turn {k} is '{role}', expected {want[0]} (turns must alternate "
                                                f"human, gpt, ...)")
        value = turn.get("value")
        if not isinstance(value, str):
            raise SkipSample("bad_record", sid, f"turn {k}: 'value' must be a string")
        if k % 2 == 0:
            questions.append(value.replace(IMAGE_TAG, "").strip())
        else:
            if not value.strip():
                raise SkipSample("empty_answer", sid, f"turn {k} (answer {k // 2 + 1}) is empty")
            answers.append(value.strip())
    if len(answers) < len(questions):
        raise SkipSample("turn_order", sid, "the last human turn has no gpt answer")
    if max_questions is not None:
        questions, answers = questions[:max_questions], answers[:max_questions]
    path = image_path(image, image_root, sid, allow_outside_root)
    return {"id": sid, "image": path, "questions": questions, "answers": answers}


def subset_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded random ``fraction`` of range(n), in order (at least one when n > 0)."""
    if fraction >= 1.0:
        return list(range(n))
    k = max(1, round(n * fraction)) if n else 0
    return sorted(random.Random(seed).sample(range(n), k))


def load_llava(files: list[str], image_root: str | None, counter: SkipCounter, fraction: float = 1.0,
               seed: int = 0, max_questions: int | None = None, check_images: bool = True,
               allow_outside_root: bool = False) -> datasets.Dataset:
    """Load and validate LLaVA files into a ``datasets.Dataset`` of {key, id, image, questions, answers}.

    Bad records are counted in ``counter`` (with ``check_images``, missing image
    files too: that catches a wrong image root before training starts; image paths
    leaving ``image_root`` too, unless ``allow_outside_root``).
    """
    if not files:
        raise DataError("data.files is empty: give at least one LLaVA-format JSON/JSONL file")
    raw: list = []
    for f in files:
        raw.extend(read_records(f))
    rows = {"key": [], "id": [], "image": [], "questions": [], "answers": []}
    chosen = subset_indices(len(raw), fraction, seed)
    counter.total = len(chosen)
    for i in chosen:
        try:
            if isinstance(raw[i], SkipSample):
                raise raw[i]
            rec = parse_record(raw[i], image_root, max_questions, i, allow_outside_root)
            if check_images and not os.path.isfile(rec["image"]):
                raise SkipSample("missing_image", rec["id"], f"image file '{rec['image']}' does not exist")
        except SkipSample as skip:
            counter.skip(skip.reason, skip.sample_id, skip.message, key=i)
            continue
        rec["key"] = i
        for key in rows:
            rows[key].append(rec[key])
    features = datasets.Features({"key": datasets.Value("int64"), "id": datasets.Value("string"),
                                  "image": datasets.Value("string"),
                                  "questions": datasets.Sequence(datasets.Value("string")),
                                  "answers": datasets.Sequence(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict(rows, features=features)
    counter.check(final=True)
    return ds
