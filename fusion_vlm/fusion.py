"""Step 4 of the data path: fuse vision tokens, question text and learnable query slots.

The fusion module is a transformers ``LlamaModel`` (causal, RoPE) driven by
``inputs_embeds``. One sequence per image reads::

    [vision tokens][question 1][N slots][question 2][N' slots] ...

Question text is tokenised by open_clip's CLIP BPE tokenizer and embedded by
the module's own table (the LlamaModel's ``embed_tokens``). Slots come from a
learnable codebook: a group of n slots uses codebook rows 0..n-2 followed by the
learnable ``<eos>`` slot, so the last slot of every group is ``<eos>``. With
``use_question=False`` the question tokens are dropped. The outputs at the slot
positions (after the final RMSNorm) are the fused tokens.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel

from fusion_vlm import attention  # noqa: F401  (registers the sdpa_blocked attention implementation)
from fusion_vlm.config import FusionConfig


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> SimpleTokenizer:
    return SimpleTokenizer()


class QuestionTokenizer:
    """CLIP BPE for question text: ``text -> list[int]`` without start/end tokens, at most ``context_length`` ids."""

    vocab_size = 49408

    def __init__(self, context_length: int = 512):
        self.context_length = context_length
        self.bpe = _clip_bpe()

    def __call__(self, text: str) -> list[int]:
        """Token ids of ``text`` (lower-cased, cleaned by CLIP's rules), truncated with a warning."""
        ids = self.bpe.encode(text)
        if len(ids) > self.context_length:
            warnings.warn(f"question of {len(ids)} CLIP tokens truncated to fusion.text_context_length="
                          f"{self.context_length}: {text[:60]!r}...", stacklevel=2)
            ids = ids[: self.context_length]
        return ids


@dataclass(frozen=True)
class FusionLayout:
    """Where everything sits in one fusion sequence (half-open ``(start, end)`` spans)."""

    n_vision: int
    question_spans: tuple[tuple[int, int], ...]  # one per group; empty spans when questions are dropped
    slot_spans: tuple[tuple[int, int], ...]  # one per group; the last position of each is <eos>
    length: int

    @property
    def eos_positions(self) -> list[int]:
        """Position of the ``<eos>`` slot of each group."""
        return [end - 1 for _, end in self.slot_spans]


def group_sizes(n_groups: int, n_queries: int, n_later: int) -> list[int]:
    """Slots per question group: ``[N, N', N', ...]`` for ``n_groups`` questions."""
    return [n_queries if g == 0 else n_later for g in range(n_groups)]


def plan_layout(n_vision: int, question_lengths: list[int], n_queries: int, n_later: int,
                use_question: bool = True) -> FusionLayout:
    """Lay out ``[vision][q1][N slots][q2][N' slots]...`` for questions of the given token lengths."""
    if not question_lengths:
        raise ValueError("a fusion sequence needs at least one question group")
    if n_queries < 1 or n_later < 1:
        raise ValueError(f"n_queries={n_queries}, n_queries_later={n_later}: both must be >= 1")
    pos = n_vision
    q_spans, s_spans = [], []
    for n_q, n_slots in zip(question_lengths, group_sizes(len(question_lengths), n_queries, n_later)):
        q_len = n_q if use_question else 0
        q_spans.append((pos, pos + q_len))
        pos += q_len
        s_spans.append((pos, pos + n_slots))
        pos += n_slots
    return FusionLayout(n_vision, tuple(q_spans), tuple(s_spans), pos)


@dataclass
class FusionOutput:
    """Fused tokens per sample and group: ``groups[b][g]`` is float [n_slots_g, H]."""

    groups: list[list[torch.Tensor]]

    def per_group(self) -> list[torch.Tensor]:
        """Every group in (sample, group) order: list of G_total float [n_g, H]."""
        return [g for sample in self.groups for g in sample]

    def eos(self) -> torch.Tensor:
        """The ``<eos>`` slot output of every group, in order: float [G_total, H]."""
        return torch.stack([g[-1] for g in self.per_group()])

    def non_eos(self) -> list[torch.Tensor]:
        """The non-``<eos>`` slot outputs of every group: list of float [n_g - 1, H]."""
        return [g[:-1] for g in self.per_group()]

    def per_sample(self) -> list[torch.Tensor]:
        """All fused tokens of each sample, groups concatenated: list of float [sum n_g, H]."""
        return [torch.cat(sample, dim=0) for sample in self.groups]


@dataclass
class VisionPrefix:
    """Keys and values of one image's vision tokens in every fusion layer.

    Vision tokens come first and attention is causal, so these do not depend on
    the question: compute them once per image, reuse them for every question.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values float [1, kv_heads, T, head_dim]
    length: int  # T, the number of vision tokens


class FusionModule(nn.Module):
    """Llama-style decoder over vision tokens, question tokens and query slots."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        llama = LlamaConfig(
            vocab_size=QuestionTokenizer.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_positions,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=False,
        )
        llama._attn_implementation = cfg.attn_implementation
        self.decoder = LlamaModel(llama)
        self.queries = nn.Parameter(torch.randn(max(cfg.max_queries - 1, 0), cfg.hidden_size) * 0.02)
        self.eos_slot = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        if cfg.grad_checkpointing:
            self.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # noqa: E501

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The question-token embedding table, [49408, H]."""
        return self.decoder.embed_tokens

    def slots(self, n: int) -> torch.Tensor:
        """Embeddings of one group of ``n`` slots: float [n, H], the last one ``<eos>``.

        Nested: the group is always the *first* ``n - 1`` codebook rows plus ``<eos>``, so the slots of a
        smaller N are a prefix of those of a larger one, and one model trained with N drawn per micro-batch
        (``n_queries_choices``) serves every N <= ``fusion.max_queries`` from one codebook.
        """
        if not 1 <= n <= self.cfg.max_queries:
            raise ValueError(f"n_queries={n}: must be between 1 and fusion.max_queries={self.cfg.max_queries}")
        return torch.cat([self.queries[: n - 1], self.eos_slot[None]], dim=0)

    def embed_questions(self, questions: list[list[int]]) -> list[torch.Tensor]:
        """Embed K questions in one table lookup: K id lists -> K float [len_k, H].

        One lookup per batch, not per question: the backward of an embedding lookup writes a dense
        [49408, H] gradient, so per-question lookups would cost that once for every question.
        """
        ids = torch.as_tensor([t for q in questions for t in q], dtype=torch.long, device=self.eos_slot.device)
        return list(torch.split(self.embed_tokens(ids), [len(q) for q in questions]))

    def build_sequence(self, vision: torch.Tensor, questions: list[list[int]], n_queries: int, n_later: int,
                       use_question: bool, question_embeds: list[torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, FusionLayout]:
        """Input embeddings of one sample: vision float [T, H] -> ([L, H], layout).

        ``question_embeds`` (optional) are the questions already embedded (see :meth:`embed_questions`).
        """
        layout = plan_layout(vision.shape[0], [len(q) for q in questions], n_queries, n_later, use_question)
        if use_question and question_embeds is None:
            question_embeds = self.embed_questions(questions)
        parts = [vision]
        for g, ((start, end), (s0, s1)) in enumerate(zip(layout.question_spans, layout.slot_spans)):
            if end > start:
                parts.append(question_embeds[g])
            parts.append(self.slots(s1 - s0))
        dtype = self.eos_slot.dtype
        return torch.cat([p.to(dtype) for p in parts], dim=0), layout

    def forward(self, vision: list[torch.Tensor], questions: list[list[list[int]]], n_queries: int | None = None,
                n_later: int | None = None, use_question: bool | None = None,
                independent: bool = False) -> FusionOutput:
        """Fuse a batch.

        ``vision[b]`` is float [T_b, H] (merged vision tokens of sample b),
        ``questions[b][g]`` the CLIP ids of question g of sample b. Returns the
        fused tokens of every group (``n_queries`` slots for the first group,
        ``n_later`` for the others; defaults: the config's N and min(N, N'_config)).
        ``independent``: every group is fused alone, as ``[vision][q_g][N slots]``
        (``n_later`` is ignored), from one pass over each sample's vision tokens.
        """
        n_queries = self.cfg.n_queries if n_queries is None else n_queries
        n_later = self.cfg.later_for(n_queries, n_later)
        if n_later > n_queries:
            raise ValueError(f"n_queries_later={n_later} must be <= n_queries={n_queries}")
        use_question = self.cfg.use_question if use_question is None else use_question
        if len(vision) != len(questions):
            raise ValueError(f"got {len(vision)} vision sequences but {len(questions)} question lists")
        if independent:
            return self._forward_independent(vision, questions, n_queries, use_question)
        embedded = iter(self.embed_questions([q for qs in questions for q in qs]) if use_question else [])
        seqs, layouts = zip(*(self.build_sequence(v, q, n_queries, n_later, use_question,
                                                  [next(embedded) for _ in q] if use_question else None)
                              for v, q in zip(vision, questions)))
        embeds, mask = self._right_pad(seqs)
        if bool(mask.all()):
            mask = None  # no padding: lets attention take its plain causal path
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        groups = [[hidden[b, s0:s1] for s0, s1 in layout.slot_spans] for b, layout in enumerate(layouts)]
        return FusionOutput(groups)

    def _right_pad(self, seqs: list[torch.Tensor], prefix_length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad B sequences float [L_b, H] behind a shared prefix of ``prefix_length`` cached positions.

        Returns (embeds float [B, L, H] with zeros after each sequence, attention mask long
        [B, prefix_length + L]: 1 on the prefix and the sequence, 0 on the padding), L = max L_b; a total
        length above ``fusion.max_positions`` is a one-line ``ValueError``.
        """
        length = max(s.shape[0] for s in seqs)
        if prefix_length + length > self.cfg.max_positions:
            raise ValueError(f"fusion sequence of {prefix_length + length} tokens exceeds fusion.max_positions="
                             f"{self.cfg.max_positions}")
        embeds = seqs[0].new_zeros(len(seqs), length, seqs[0].shape[-1])
        mask = torch.zeros(len(seqs), prefix_length + length, dtype=torch.long, device=embeds.device)
        for b, s in enumerate(seqs):
            embeds[b, : s.shape[0]] = s
            mask[b, : prefix_length + s.shape[0]] = 1
        return embeds, mask

    def _forward_independent(self, vision: list[torch.Tensor], questions: list[list[list[int]]], n_queries: int,
                             use_question: bool) -> FusionOutput:
        """Every group alone with N slots, in two decoder calls for the whole batch: every sample's vision
        tokens (:meth:`encode_prefixes`), then every question of every sample as one row ``[q][N slots]``
        reading its sample's keys/values (:meth:`fuse_with_prefixes`). The same outputs as
        ``[vision][q][N slots]`` per group.

        Gradient checkpointing drops the key/value cache, so with it each group gets its own full
        ``[vision][q][N slots]`` sequence instead (the same outputs, the vision part recomputed).
        """
        if self.decoder.gradient_checkpointing and self.training:
            flat = self.forward([v for v, qs in zip(vision, questions) for _ in qs],
                                [[q] for qs in questions for q in qs], n_queries, n_queries, use_question)
            groups = iter(flat.per_group())
            return FusionOutput([[next(groups) for _ in qs] for qs in questions])
        return FusionOutput(self.fuse_with_prefixes(self.encode_prefixes(vision), questions, n_queries, use_question))

    def _cache_kw(self, cache: DynamicCache) -> dict:
        """``{"cache": cache}`` where the decoder takes ``cache`` (transformers >= 5.2x), else ``past_key_values``."""
        name = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        return {name: cache}

    def encode_prefixes(self, vision: list[torch.Tensor]) -> list[VisionPrefix]:
        """Run B samples' vision tokens (float [T_b, H] each, right-padded into one call) and keep each
        sample's keys/values: B prefixes of T_b positions (views into the batch's cache tensors)."""
        embeds, mask = self._right_pad([v.to(self.eos_slot.dtype) for v in vision])
        cache = DynamicCache(config=self.decoder.config)
        self.decoder(inputs_embeds=embeds, attention_mask=None if bool(mask.all()) else mask, use_cache=True,
                     **self._cache_kw(cache))
        return [VisionPrefix([(layer.keys[b:b + 1, :, :t], layer.values[b:b + 1, :, :t]) for layer in cache.layers], t)
                for b, t in enumerate(v.shape[0] for v in vision)]

    def encode_prefix(self, vision: torch.Tensor) -> VisionPrefix:
        """Run the vision tokens float [T, H] alone and keep their keys/values."""
        return self.encode_prefixes([vision])[0]

    def fuse_with_prefixes(self, prefixes: list[VisionPrefix], questions: list[list[list[int]]], n_queries: int,
                           use_question: bool = True) -> list[list[torch.Tensor]]:
        """Fuse the K_b independent questions of B images, each as a first group after its image's prefix, in
        one decoder call: ``out[b][k]`` float [N, H].

        Equivalent to ``forward`` on ``[vision_b][q_bk][N slots]`` for every (b, k), but the vision part is
        read from ``prefixes[b]`` (padded to the longest prefix and masked; positions continue after T_b).
        """
        if len(prefixes) != len(questions):
            raise ValueError(f"got {len(prefixes)} vision prefixes but {len(questions)} question lists")
        flat = [q for qs in questions for q in qs]
        embedded = self.embed_questions(flat) if use_question else [None] * len(flat)
        empty = self.eos_slot.new_zeros(0, self.cfg.hidden_size)
        seqs = [self.build_sequence(empty, [q], n_queries, n_queries, use_question, [e] if use_question else None)[0]
                for q, e in zip(flat, embedded)]
        longest = max(p.length for p in prefixes)
        embeds, mask = self._right_pad(seqs, longest)
        device = embeds.device
        owner = torch.tensor([b for b, qs in enumerate(questions) for _ in qs], device=device)
        lengths = torch.tensor([p.length for p in prefixes], device=device)
        mask[:, :longest] = (torch.arange(longest, device=device) < lengths[owner, None]).long()
        cache = DynamicCache(config=self.decoder.config)
        for layer in range(len(prefixes[0].kv)):
            keys, values = (torch.cat([nn.functional.pad(p.kv[layer][i], (0, 0, 0, longest - p.length))
                                       for p in prefixes]) for i in (0, 1))
            cache.update(keys[owner], values[owner], layer)
        positions = lengths[owner, None] + torch.arange(embeds.shape[1], device=device)
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                              use_cache=True, **self._cache_kw(cache)).last_hidden_state
        fused = iter(hidden[r, s.shape[0] - n_queries: s.shape[0]] for r, s in enumerate(seqs))
        return [[next(fused) for _ in qs] for qs in questions]

    def fuse_with_prefix(self, prefix: VisionPrefix, questions: list[list[int]], n_queries: int,
                         use_question: bool = True) -> list[torch.Tensor]:
        """Fuse K independent questions about one image, each as a first group: list of K float [N, H]
        (:meth:`fuse_with_prefixes` for one image)."""
        return self.fuse_with_prefixes([prefix], [questions], n_queries, use_question)[0]
