"""Plain inference over a checkpoint: the shared back end of ``fusion-vlm generate`` and the VLMEvalKit wrapper."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from fusion_vlm.errors import CheckpointError, DataError, MissingFileError, UserError
from fusion_vlm.evaluation.items import jsonl_records
from fusion_vlm.evaluation.messages import load_image
from fusion_vlm.evaluation.settings import resolve_max_new_tokens
from fusion_vlm.images import DEFAULT_MAX_PIXELS


def checkpoint_n_queries(checkpoint: str | Path) -> int:
    """N the checkpoint was trained with (``fusion.n_queries`` of its ``config.yaml``)."""
    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        raise MissingFileError(f"checkpoint '{checkpoint}': no config.yaml (not a FusionVLM checkpoint)")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CheckpointError(f"checkpoint '{checkpoint}': config.yaml is not YAML ({' '.join(str(err).split())})")
    n = (cfg.get("fusion") or {}).get("n_queries") if isinstance(cfg, dict) else None
    if not isinstance(n, int):
        raise CheckpointError(f"checkpoint '{checkpoint}': config.yaml has no integer fusion.n_queries")
    return n


@dataclass
class GenerationSettings:
    """How a checkpoint is run: N, N', question fused or not, and decoding."""

    n_queries: int | None = None  # None = the checkpoint's own N
    n_queries_later: int | None = None  # None = min(N, checkpoint N')
    use_question: bool = True  # False = the vq / vq_ft modes: question dropped from the fusion input
    max_new_tokens: int | None = None  # None = per benchmark (settings.reference_max_new_tokens; 512 without one)
    do_sample: bool = False  # sample instead of greedy decoding
    batch_size: int = 8  # images per generate call
    seed: int | None = 0  # torch.manual_seed when the Runner is built (matters only with do_sample); None = unseeded
    min_new_tokens: int = 1  # at least this many tokens per answer (the reference's 1: no empty answer)
    dtype: str | None = None  # precision of the parts other than the LLM: llm (the LLM's, fast on a CPU) | float32
    #                           | bfloat16; None = as saved (float32) -- FusionVLM.cast_for_inference


class Runner:
    """A loaded :class:`~fusion_vlm.model.FusionVLM` plus settings; answers (image, questions) pairs."""

    def __init__(self, checkpoint: str | Path, settings: GenerationSettings | None = None, device: str = "cpu",
                 model=None, trust_remote_code: bool = False):
        self.checkpoint = Path(checkpoint)
        self.settings = settings or GenerationSettings()
        if self.settings.batch_size < 1:
            raise ValueError(f"batch_size={self.settings.batch_size}: must be >= 1")
        if self.settings.max_new_tokens is not None and self.settings.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.settings.max_new_tokens}: must be >= 1")
        if self.settings.seed is not None:
            import torch

            torch.manual_seed(self.settings.seed)
        if model is None:
            from fusion_vlm.model import FusionVLM  # torch-heavy: only when a model is actually needed

            model = FusionVLM.from_pretrained(self.checkpoint, device=device, trust_remote_code=trust_remote_code)
        self.model = model
        self.model.eval()
        if self.settings.dtype is not None:
            self.model.cast_for_inference(self.settings.dtype)

    def max_new_tokens_for(self, dataset: str | None = None, dataset_type: str | None = None) -> int:
        """Tokens per answer: the explicit setting, else the reference rule for ``dataset`` of VLMEvalKit ``TYPE``."""
        return resolve_max_new_tokens(self.settings.max_new_tokens, dataset, dataset_type)

    def n_queries_used(self) -> int | None:
        """N actually used: the setting, else the checkpoint's own (None when its config cannot be read)."""
        if self.settings.n_queries is not None:
            return self.settings.n_queries
        try:
            return checkpoint_n_queries(self.checkpoint)
        except (FileNotFoundError, ValueError):
            return None

    @property
    def max_pixels(self) -> int:
        """The model's ``views.max_image_pixels`` (the library default for a model without a config)."""
        views = getattr(getattr(self.model, "config", None), "views", None)
        return getattr(views, "max_image_pixels", DEFAULT_MAX_PIXELS)

    def load_image(self, image):
        """Decode one image (path, bytes or PIL image) exactly as training does: an 8-bit RGB ``PIL.Image``.

        Raises ``ImageError`` / ``MissingFileError`` in one line naming the image.
        """
        return load_image(image, self.max_pixels)

    def answer_each(self, images: list, questions: list[list[str]], **kwargs) -> list:
        """Like :meth:`answer` (same keyword arguments), but a bad image gives its error in its place.

        Returns, per image, its answers (list of str) or the ``UserError``
        (``ImageError`` / ``MissingFileError``) of its image; the other images are answered.
        """
        decoded: list = []
        for image in images:
            try:
                decoded.append(self.load_image(image))
            except UserError as err:
                decoded.append(err)
        good = [i for i, d in enumerate(decoded) if not isinstance(d, UserError)]
        answers = self.answer([decoded[i] for i in good], [questions[i] for i in good], **kwargs) if good else []
        out = list(decoded)
        for i, a in zip(good, answers):
            out[i] = a
        return out

    def answer(self, images: list, questions: list[list[str]], dataset: str | None = None,
               dataset_type: str | None = None) -> list[list[str]]:
        """Answers per image (one per question, in order), generated in batches of ``batch_size`` images.

        ``dataset`` / ``dataset_type`` (VLMEvalKit name and ``TYPE``) choose the answer
        length when no ``max_new_tokens`` is set (:meth:`max_new_tokens_for`).
        """
        s = self.settings
        max_new_tokens = self.max_new_tokens_for(dataset, dataset_type)
        out: list[list[str]] = []
        for start in range(0, len(images), s.batch_size):
            imgs = [self.load_image(x) for x in images[start:start + s.batch_size]]
            out += self.model.generate(imgs, questions[start:start + s.batch_size], max_new_tokens=max_new_tokens,
                                       n_queries=s.n_queries, n_queries_later=s.n_queries_later,
                                       use_question=s.use_question, do_sample=s.do_sample,
                                       min_new_tokens=min(s.min_new_tokens, max_new_tokens))
        return out


def read_requests(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Lines of a JSONL file ``{"image": PATH, "questions": [Q, ...]}`` (or ``"question": Q``), checked.

    Relative image paths are resolved against the JSONL file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"requests file not found: {path}")
    for lineno, rec in jsonl_records(path):
        if not isinstance(rec, dict) or "image" not in rec:
            raise DataError(f"{path}:{lineno}: needs an object with an 'image' field")
        qs = rec.get("questions", [rec["question"]] if "question" in rec else None)
        if isinstance(qs, str):
            qs = [qs]
        if not qs or not all(isinstance(q, str) and q.strip() for q in qs):
            raise DataError(f"{path}:{lineno}: needs 'questions' (non-empty list of strings) or 'question'")
        image = Path(rec["image"])
        if not image.is_absolute():
            image = path.parent / image
        yield lineno, {**rec, "image": str(image), "questions": qs}


def answer_requests(runner: Runner, requests: str | Path) -> list[dict]:
    """Answer every request of a JSONL file; returns one output record per request, in order.

    A request is answered with ``"answers"`` added; a request whose image
    cannot be read (missing, truncated, not an image...) gets an ``"error"``
    field instead (one line naming the image), and the others are still
    answered. So ``"error" in record`` tells exactly which requests failed.
    """
    records = [rec for _, rec in read_requests(requests)]
    results = runner.answer_each([r["image"] for r in records], [r["questions"] for r in records])
    out = []
    for rec, res in zip(records, results):
        rec = {k: v for k, v in rec.items() if k not in ("answers", "error")}
        out.append({**rec, "error": str(res)} if isinstance(res, UserError) else {**rec, "answers": res})
    return out


def answer_file(runner: Runner, requests: str | Path, output: str | Path) -> int:
    """:func:`answer_requests` written to ``output`` as JSONL; returns the number of records written."""
    records = answer_requests(runner, requests)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as fh:
        fh.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    return len(records)
