"""Turn (image, conversation) into model inputs, and collate samples into a batch.

:class:`FusionProcessor` runs the text side of every step of the data path:
views (:mod:`fusion_vlm.views`), question ids for the fusion module (CLIP BPE),
the LLM prompt with fused-token positions and labels
(:func:`fusion_vlm.language.build_prompt`) and, for stage 1, the answers as
CLIP text-tower tokens. :func:`collate` pads samples with different numbers of
views, questions and text lengths into one :class:`Batch`.

A sample's questions are either one conversation (one LLM row; N slots for the
first question, N' for each later one) or, with ``independent=True``, asked
each on its own as a benchmark asks them (one LLM row and N slots per
question), all from one vision pass of the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import open_clip
import torch

from fusion_vlm.config import ModelConfig
from fusion_vlm.fusion import QuestionTokenizer
from fusion_vlm.language import IGNORE_INDEX, build_prompt
from fusion_vlm.reducers import group_counts, vision_tokens
from fusion_vlm.views import ViewProcessor, load_image


@dataclass
class Sample:
    """One image with its question groups, ready for :func:`collate`."""

    pixel_values: torch.Tensor  # float [V, 3, S, S]
    questions: list[list[int]]  # CLIP ids per question group
    n_queries: int  # N (slots of the first group)
    n_queries_later: int  # N' (slots of each later group)
    use_question: bool  # feed question tokens to the fusion module
    input_ids: torch.Tensor  # long [R, L] LLM prompts: R = 1 (conversation) or G (independent), right-padded
    labels: torch.Tensor  # long [R, L], -100 except answers + eos
    fused_mask: torch.Tensor  # bool [R, L], True at fused-token positions
    attention_mask: torch.Tensor  # long [R, L], 0 at padding
    answer_tokens: torch.Tensor | None = None  # long [G, C] CLIP text tokens of the answers (stage 1)
    id: str | None = None
    independent: bool = False  # every question its own LLM row with N slots (n_queries_later == n_queries)


@dataclass
class Batch:
    """A padded batch of B samples (G question groups in total) in R LLM rows (R = B, or G when independent)."""

    pixel_values: torch.Tensor  # float [sum V_b, 3, S, S], views of all samples in order
    views_per_sample: list[int]  # V_b
    questions: list[list[list[int]]]  # [b][g] CLIP ids
    n_queries: int
    n_queries_later: int
    use_question: bool
    input_ids: torch.Tensor  # long [R, L] (right-padded with the pad id)
    attention_mask: torch.Tensor  # long [R, L]
    labels: torch.Tensor  # long [R, L]
    fused_mask: torch.Tensor  # bool [R, L]
    answer_tokens: torch.Tensor | None = None  # long [G, C]
    ids: list[str | None] | None = None
    independent: bool = False  # row r holds group r of the flattened (sample, group) order

    def to(self, device: str | torch.device) -> "Batch":
        """Move the tensors to ``device`` (returns self)."""
        for name in ("pixel_values", "input_ids", "attention_mask", "labels", "fused_mask", "answer_tokens"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    @property
    def num_tokens(self) -> int:
        """Non-padding LLM tokens in the batch."""
        return int(self.attention_mask.sum())


class FusionProcessor:
    """Builds :class:`Sample` objects for a :class:`~fusion_vlm.config.ModelConfig` and an LLM tokenizer."""

    def __init__(self, cfg: ModelConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.views = ViewProcessor(**asdict(cfg.views))
        self.question_tokenizer = QuestionTokenizer(cfg.fusion.text_context_length)
        self.clip_tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.vision.text_context_length)

    def resolve(self, n_queries: int | None, n_queries_later: int | None,
                use_question: bool | None) -> tuple[int, int, bool]:
        """Fill defaults from the config: N, N' = min(N, config N') and use_question."""
        f = self.cfg.fusion
        n = f.n_queries if n_queries is None else n_queries
        later = f.later_for(n, n_queries_later)
        if not 1 <= later <= n <= f.max_queries:
            raise ValueError(f"n_queries={n}, n_queries_later={later}: need 1 <= N' <= N <= fusion.max_queries"
                             f"={f.max_queries}")
        return n, later, f.use_question if use_question is None else use_question

    def pixel_values(self, image) -> torch.Tensor:
        """Views of an image given as a path, PIL image or ready float [V, 3, S, S] tensor."""
        if isinstance(image, torch.Tensor):
            return image
        if not hasattr(image, "mode"):
            image = load_image(image, self.cfg.views.max_image_pixels)
        return self.views(image)[0]

    def build(self, image, turns: list[tuple[str, str | None]], n_queries: int | None = None,
              n_queries_later: int | None = None, use_question: bool | None = None,
              with_answers_for_contrastive: bool = False, sample_id: str | None = None,
              independent: bool = False) -> Sample:
        """One sample from an image (path, PIL image or float [V, 3, S, S] views) and its turns.

        ``turns`` is [(question, answer)], answers may be None for the last turn
        (generation). ``independent``: each turn is its own one-question LLM row
        with N slots (N' is then N). Raises ValueError when an LLM prompt exceeds
        ``llm.max_length``.
        """
        if not turns:
            raise ValueError(f"sample {sample_id or ''}: no question")
        n, later, use_q = self.resolve(n_queries, n_queries_later, use_question)
        later = n if independent else later
        pixel_values = self.pixel_values(image)
        questions = [self.question_tokenizer(q) for q, _ in turns]
        system = self.cfg.llm.system_prompt
        # visual tokens per turn: N, N', ... (a baseline reducer: see fusion_vlm.reducers.group_counts)
        sizes = group_counts(self.cfg.reducer, vision_tokens(self.cfg, pixel_values.shape[0]), len(turns), n, later)
        prompts = ([build_prompt(self.tokenizer, [turn], [k], system) for turn, k in zip(turns, sizes)]
                   if independent else [build_prompt(self.tokenizer, turns, sizes, system)])
        longest = max(len(p.input_ids) for p in prompts)
        if longest > self.cfg.llm.max_length:
            raise ValueError(f"sample {sample_id or ''}: LLM prompt of {longest} tokens exceeds "
                             f"llm.max_length={self.cfg.llm.max_length}")
        answer_tokens = None
        if with_answers_for_contrastive:
            if any(a is None for _, a in turns):
                raise ValueError(f"sample {sample_id or ''}: the contrastive loss needs every answer")
            answer_tokens = self.clip_tokenizer([a for _, a in turns])
        input_ids, labels, fused, attention = _pad_rows(
            [(p.input_ids, p.labels, p.fused_mask) for p in prompts], self.tokenizer.pad_token_id or 0)
        return Sample(pixel_values, questions, n, later, use_q, input_ids, labels, fused, attention,
                      answer_tokens, sample_id, independent)


def _pad_rows(rows: list[tuple], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """R rows of (input_ids, labels, fused_mask), each of length L_r -> four [R, max L_r] tensors
    (input_ids, labels, fused_mask, attention_mask), right-padded."""
    length = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    fused = torch.zeros((len(rows), length), dtype=torch.bool)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (ids, lab, mask) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n], labels[r, :n] = torch.as_tensor(ids), torch.as_tensor(lab)
        fused[r, :n], attention[r, :n] = torch.as_tensor(mask, dtype=torch.bool), 1
    return input_ids, labels, fused, attention


def collate(samples: list[Sample], pad_id: int = 0) -> Batch:
    """Pad samples into a :class:`Batch`: the LLM rows of all samples in order, right-padded to the longest."""
    if not samples:
        raise ValueError("collate: empty list of samples")
    first = samples[0]
    for s in samples[1:]:
        if (s.n_queries, s.n_queries_later, s.use_question, s.independent) != (
                first.n_queries, first.n_queries_later, first.use_question, first.independent):
            raise ValueError("collate: samples disagree on n_queries / n_queries_later / use_question / independent")
    rows = [(s.input_ids[r, :n], s.labels[r, :n], s.fused_mask[r, :n])
            for s in samples for r, n in enumerate(s.attention_mask.sum(dim=1).tolist())]
    input_ids, labels, fused, attention = _pad_rows(rows, pad_id)
    answers = None
    if all(s.answer_tokens is not None for s in samples):
        answers = torch.cat([s.answer_tokens for s in samples])
    return Batch(
        pixel_values=torch.cat([s.pixel_values for s in samples]),
        views_per_sample=[s.pixel_values.shape[0] for s in samples],
        questions=[s.questions for s in samples],
        n_queries=first.n_queries, n_queries_later=first.n_queries_later, use_question=first.use_question,
        input_ids=input_ids, attention_mask=attention, labels=labels, fused_mask=fused,
        answer_tokens=answers, ids=[s.id for s in samples], independent=first.independent,
    )
