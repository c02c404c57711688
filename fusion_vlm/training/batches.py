"""Records -> samples -> micro-batches, in a seeded order that can resume mid-epoch.

:class:`SampleDataset` builds one :class:`~fusion_vlm.processor.Sample` per
record and turns image / text failures into :class:`Skipped` markers instead
of exceptions; :class:`Collator` drops those from the batch and passes them on
(so skip counts survive DataLoader worker processes); :class:`ResumableBatchSampler`
yields the per-rank micro-batches of an epoch from any position, each optionally
with its own number of query slots N (``n_queries_choices``: one fusion trained
for every N of a sweep).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Sampler

from fusion_vlm.processor import Batch, collate
from fusion_vlm.views import load_image


@dataclass
class Skipped:
    """A record that failed when its sample was built."""

    key: int  # record index (unique, unlike ids)
    id: str
    reason: str  # one of fusion_vlm.training.data.SKIP_REASONS
    message: str


@dataclass
class MicroBatch:
    """One micro-batch: the collated good samples (None if all were skipped) and the skips."""

    batch: Batch | None
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return 0 if self.batch is None else len(self.batch.views_per_sample)

    @property
    def n_tokens(self) -> int:
        return 0 if self.batch is None else self.batch.num_tokens


class SampleDataset(Dataset):
    """Validated records (a ``datasets.Dataset``) -> :class:`Sample` or :class:`Skipped`.

    An index is a record number, or ``(record number, N)`` to build that sample
    with N query slots (N' = min(N, the dataset's or the model's N')), as
    :class:`ResumableBatchSampler` yields with ``n_choices``. ``independent``: each question of a
    record is its own LLM row with N slots (see :meth:`FusionProcessor.build`).
    """

    def __init__(self, records, processor, stage: str, n_queries: int | None = None,
                 n_queries_later: int | None = None, use_question: bool | None = None, independent: bool = False):
        self.records = records
        self.independent = independent
        self.processor = processor
        self.contrastive = stage == "contrastive"
        self.n_queries, self.n_queries_later, self.use_question = n_queries, n_queries_later, use_question
        self.max_pixels = processor.cfg.views.max_image_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int | tuple[int, int]):
        n_queries, n_later = self.n_queries, self.n_queries_later
        if isinstance(index, (tuple, list)):
            index, n_queries = index
            n_later = min(n_queries, self.processor.cfg.fusion.later_for(n_queries, n_later))
        rec = self.records[int(index)]
        key, sid = rec["key"], rec["id"]
        try:
            image = load_image(rec["image"], self.max_pixels)
        except FileNotFoundError as err:
            return Skipped(key, sid, "missing_image", str(err))
        except (ValueError, OSError) as err:  # ImageError is a ValueError
            return Skipped(key, sid, "unreadable_image", str(err))
        try:
            return self.processor.build(image, list(zip(rec["questions"], rec["answers"])), n_queries,
                                        n_later, self.use_question,
                                        with_answers_for_contrastive=self.contrastive, sample_id=sid,
                                        independent=self.independent)
        except ValueError as err:
            msg = str(err)
            reason = "too_long" if ("exceeds" in msg or "max_length" in msg or "too long" in msg) else "invalid_text"
            return Skipped(key, sid, reason, msg)


class Collator:
    """Collate the good samples of a micro-batch; keep the :class:`Skipped` markers (picklable)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list) -> MicroBatch:
        good = [x for x in items if not isinstance(x, Skipped)]
        skipped = [x for x in items if isinstance(x, Skipped)]
        return MicroBatch(collate(good, self.pad_id) if good else None, skipped)


class ResumableBatchSampler(Sampler):
    """Per-rank micro-batches of one epoch, starting at micro-batch ``start``.

    The epoch order is a permutation seeded by ``seed + epoch`` (identity when
    not shuffling), wrapped round so every rank gets the same number of
    micro-batches; rank r takes every world-th index from r.

    With ``n_choices`` each micro-batch is a list of ``(index, N)`` pairs: one N
    per micro-batch, drawn uniformly from ``n_choices`` by a generator seeded
    with (seed, epoch, micro-batch number), so every rank draws the same N and
    a resumed run draws the ones it would have drawn.
    """

    def __init__(self, n: int, micro_batch: int, seed: int, epoch: int = 0, start: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, n_choices: list[int] | tuple[int, ...] = ()):
        if n < 1:
            raise ValueError("no usable training records (every record was skipped or the files are empty)")
        self.n, self.micro_batch, self.seed, self.epoch, self.start = n, micro_batch, seed, epoch, start
        self.shuffle, self.rank, self.world, self.n_choices = shuffle, rank, world, tuple(n_choices)

    def n_for_batch(self, b: int) -> int | None:
        """N of micro-batch ``b`` of this epoch (None without ``n_choices``)."""
        if not self.n_choices:
            return None
        return random.Random(f"{self.seed}:{self.epoch}:{b}").choice(self.n_choices)

    @staticmethod
    def batches_per_epoch(n: int, micro_batch: int, world: int = 1) -> int:
        """Micro-batches each rank runs per epoch."""
        return -(-n // (micro_batch * world))

    def __len__(self) -> int:
        return max(self.batches_per_epoch(self.n, self.micro_batch, self.world) - self.start, 0)

    def indices(self) -> list[int]:
        """This rank's record order for the epoch."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        total = self.batches_per_epoch(self.n, self.micro_batch, self.world) * self.micro_batch * self.world
        while len(order) < total:
            order += order[: total - len(order)]
        return order[self.rank::self.world]

    def __iter__(self):
        mine = self.indices()
        for b in range(self.start, len(mine) // self.micro_batch):
            batch = mine[b * self.micro_batch:(b + 1) * self.micro_batch]
            n = self.n_for_batch(b)
            yield batch if n is None else [(i, n) for i in batch]
