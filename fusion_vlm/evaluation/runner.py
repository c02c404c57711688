"""Plain inference over a checkpoint: the shared back end of ``fusion-vlm generate`` and the VLMEvalKit wrapper."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from fusion_vlm.evaluation.messages import load_image


def checkpoint_n_queries(checkpoint: str | Path) -> int:
    """N the checkpoint was trained with (``fusion.n_queries`` of its ``config.yaml``)."""
    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{checkpoint}': no config.yaml (not a FusionVLM checkpoint)")
    cfg = yaml.safe_load(path.read_text()) or {}
    n = (cfg.get("fusion") or {}).get("n_queries")
    if not isinstance(n, int):
        raise ValueError(f"checkpoint '{checkpoint}': config.yaml has no integer fusion.n_queries")
    return n


@dataclass
class GenerationSettings:
    """How a checkpoint is run: N, N', question fused or not, and decoding."""

    n_queries: int | None = None  # None = the checkpoint's own N
    n_queries_later: int | None = None  # None = min(N, checkpoint N')
    use_question: bool = True  # False = the vq / vq_ft modes: question dropped from the fusion input
    max_new_tokens: int = 64
    do_sample: bool = False
    batch_size: int = 8  # images per generate call


class Runner:
    """A loaded :class:`~fusion_vlm.model.FusionVLM` plus settings; answers (image, questions) pairs."""

    def __init__(self, checkpoint: str | Path, settings: GenerationSettings | None = None, device: str = "cpu",
                 model=None):
        self.checkpoint = Path(checkpoint)
        self.settings = settings or GenerationSettings()
        if self.settings.batch_size < 1:
            raise ValueError(f"batch_size={self.settings.batch_size}: must be >= 1")
        if model is None:
            from fusion_vlm.model import FusionVLM  # torch-heavy: only when a model is actually needed

            model = FusionVLM.from_pretrained(self.checkpoint, device=device)
        self.model = model
        self.model.eval()

    def answer(self, images: list, questions: list[list[str]]) -> list[list[str]]:
        """Answers per image (one per question, in order), generated in batches of ``batch_size`` images."""
        s = self.settings
        out: list[list[str]] = []
        for start in range(0, len(images), s.batch_size):
            imgs = [load_image(x) for x in images[start:start + s.batch_size]]
            out += self.model.generate(imgs, questions[start:start + s.batch_size], max_new_tokens=s.max_new_tokens,
                                       n_queries=s.n_queries, n_queries_later=s.n_queries_later,
                                       use_question=s.use_question, do_sample=s.do_sample)
        return out


def read_requests(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Lines of a JSONL file ``{"image": PATH, "questions": [Q, ...]}`` (or ``"question": Q``), checked.

    Relative image paths are resolved against the JSONL file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"requests file not found: {path}")
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
            if not isinstance(rec, dict) or "image" not in rec:
                raise ValueError(f"{path}:{lineno}: needs an object with an 'image' field")
            qs = rec.get("questions", [rec["question"]] if "question" in rec else None)
            if isinstance(qs, str):
                qs = [qs]
            if not qs or not all(isinstance(q, str) and q.strip() for q in qs):
                raise ValueError(f"{path}:{lineno}: needs 'questions' (non-empty list of strings) or 'question'")
            image = Path(rec["image"])
            if not image.is_absolute():
                image = path.parent / image
            yield lineno, {**rec, "image": str(image), "questions": qs}


def answer_file(runner: Runner, requests: str | Path, output: str | Path) -> int:
    """Answer every request of a JSONL file; write one JSONL line per request with ``answers`` added.

    Returns the number of records written.
    """
    records = [rec for _, rec in read_requests(requests)]
    for rec in records:
        if not Path(rec["image"]).is_file():
            raise FileNotFoundError(f"image not found: {rec['image']}")
    answers = runner.answer([r["image"] for r in records], [r["questions"] for r in records])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as fh:
        for rec, ans in zip(records, answers):
            fh.write(json.dumps({**rec, "answers": ans}, ensure_ascii=False) + "\n")
    return len(records)
