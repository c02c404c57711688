"""Answering questions about images with a :class:`~fusion_vlm.model.FusionVLM` (inference only).

Two paths, both greedy by default:

* :func:`answer_conversations` -- the questions of an image form one multi-turn conversation: all its
  question groups are fused in one pass (N slots for the first question, N' for the later ones), and the
  LLM answers turn by turn, each turn seeing the earlier questions and its own answers;
* :func:`answer_independently` -- every question is asked on its own with N slots, as a benchmark asks
  it; the fusion keys/values of an image's vision tokens (its :class:`~fusion_vlm.fusion.VisionPrefix`)
  are computed once and shared by its questions, and kept in a :class:`VisionPrefixCache` for the next
  images.

:func:`generate` checks the input and picks the path; ``FusionVLM.generate`` calls it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fusion_vlm.fusion import VisionPrefix
from fusion_vlm.language import Prompt, build_prompt

if TYPE_CHECKING:  # type hints only: model.py imports this module
    from fusion_vlm.model import FusionVLM


class VisionPrefixCache:
    """The fusion vision prefixes of the last ``size`` images, keyed by the content of their views (LRU).

    ``size=0`` turns the cache off. A prefix depends on the weights: clear the cache when they change
    (``FusionVLM.train()`` does).
    """

    def __init__(self, size: int = 8):
        self.size = size  # images kept (0 = off)
        self._items: OrderedDict[str, VisionPrefix] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forget every stored prefix."""
        self._items.clear()

    def get(self, pixel_values: list[torch.Tensor], compute: Callable[[list[torch.Tensor]], list[VisionPrefix]]
            ) -> list[VisionPrefix]:
        """The prefixes of B images' views (float [V_b, 3, S, S] each): the stored ones, the others from one
        ``compute(views of the missing images)`` call.

        Computed prefixes are stored only when the cache is on and autograd is off (a prefix built under
        autograd holds a graph).
        """
        keys = [hashlib.sha1(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for p in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self._items]
        computed = dict(zip(missing, compute([pixel_values[i] for i in missing]) if missing else []))
        out = []
        for i, key in enumerate(keys):
            if i in computed:
                out.append(computed[i])
                if self.size > 0 and not torch.is_grad_enabled():  # a copy: not a view that holds the whole batch
                    self._items[key] = VisionPrefix([(k.clone(), v.clone()) for k, v in computed[i].kv],
                                                    computed[i].length)
            else:
                self._items.move_to_end(key)
                out.append(self._items[key])
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return out


@torch.no_grad()
def generate(model: FusionVLM, images: list, questions: list[list[str]], max_new_tokens: int = 64,
             n_queries: int | None = None, use_question: bool | None = None, n_queries_later: int | None = None,
             do_sample: bool = False, use_cache: bool = True, conversation: bool = True,
             reuse_vision_prefix: bool = True, **gen_kwargs) -> list[list[str]]:
    """Answer ``questions[b]`` (a list of G_b strings) about ``images[b]``; returns answers[b][g] (strings).

    ``images[b]`` is anything ``model.processor.pixel_values`` reads (a PIL image, a path, or views
    float [V, 3, S, S]). ``conversation=True``: :func:`answer_conversations`; ``conversation=False``:
    :func:`answer_independently`, with the vision prefix shared (and cached) when ``reuse_vision_prefix``.
    ``n_queries`` / ``n_queries_later`` / ``use_question`` default to the model config's;
    ``gen_kwargs`` go to the LLM's ``generate``.
    """
    model.require_llm("generate()")
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} question lists")
    if any(len(q) == 0 for q in questions):
        raise ValueError("every image needs at least one question")
    n, later, use_q = model.processor.resolve(n_queries, n_queries_later, use_question)
    decode = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=use_cache, **gen_kwargs)
    if not conversation:
        return answer_independently(model, images, questions, n, use_q, reuse_vision_prefix, **decode)
    return answer_conversations(model, images, questions, n, later, use_q, **decode)


def answer_conversations(model: FusionVLM, images: list, questions: list[list[str]], n: int, later: int,
                         use_q: bool, **decode) -> list[list[str]]:
    """Each image's questions as one conversation; returns answers[b][g].

    The fusion runs once over all images: sample b's sequence is ``[vision][q1][n slots][q2][later slots]...``
    (fused tokens float [n + later * (G_b - 1), H]). Turn t is then decoded for every image with a t-th
    question in one LLM batch; its prompt holds the earlier turns with their answers and the first
    ``n + later * t`` fused tokens. ``decode``: see :func:`decode_with_fused`.
    """
    pixels = [model.processor.pixel_values(img) for img in images]
    vision = model.encode_images(torch.cat(pixels), [p.shape[0] for p in pixels])
    ids = [[model.processor.question_tokenizer(q) for q in qs] for qs in questions]
    out = model.reduce(vision, ids, n, later, use_q, pixel_values=pixels)  # the fusion, or a baseline reducer
    fused = out.per_sample()
    answers: list[list[str]] = [[] for _ in images]
    for turn in range(max(len(q) for q in questions)):
        rows = [b for b, qs in enumerate(questions) if len(qs) > turn]
        prompts, tokens = [], []
        for b in rows:
            turns = list(zip(questions[b][:turn], answers[b])) + [(questions[b][turn], None)]
            sizes = [g.shape[0] for g in out.groups[b][: turn + 1]]  # [N, N', ...] with the fusion
            prompts.append(build_prompt(model.tokenizer, turns, sizes, model.config.llm.system_prompt))
            tokens.append(fused[b][: sum(sizes)])
        for b, text in zip(rows, decode_with_fused(model, prompts, tokens, **decode)):
            answers[b].append(text)
    return answers


def answer_independently(model: FusionVLM, images: list, questions: list[list[str]], n: int, use_q: bool,
                         reuse: bool = True, **decode) -> list[list[str]]:
    """Each question alone, as ``[vision][q][n slots]`` (fused tokens float [n, H] each); returns answers[b][g].

    With ``reuse`` the vision part comes from the images' :func:`vision_prefixes` (computed once per image,
    the images together) and every question of every image is fused in one call; else every question gets
    its own full fusion pass. All questions are then decoded in one LLM batch.
    ``decode``: see :func:`decode_with_fused`.
    """
    pixels = [model.processor.pixel_values(image) for image in images]
    ids = [[model.processor.question_tokenizer(q) for q in qs] for qs in questions]
    if model.fusion is None:  # a baseline reducer: the merged tokens reduced without the question
        vision = model.encode_images(torch.cat(pixels), [p.shape[0] for p in pixels])
        groups = model.reduce(vision, ids, n, n, use_q, independent=True, pixel_values=pixels).groups
    elif reuse:
        groups = model.fusion.fuse_with_prefixes(vision_prefixes(model, pixels), ids, n, use_q)
    else:  # the reference path: a full [vision][q][n slots] pass per question
        groups = []
        for views, image_ids in zip(pixels, ids):
            vision = model.encode_images(views, [views.shape[0]])
            groups.append([model.fusion(vision, [[q]], n, n, use_q).groups[0][0] for q in image_ids])
    prompts, fused = [], []
    for qs, image_groups in zip(questions, groups):
        for q, g in zip(qs, image_groups):
            prompts.append(build_prompt(model.tokenizer, [(q, None)], [g.shape[0]], model.config.llm.system_prompt))
            fused.append(g)
    texts = iter(decode_with_fused(model, prompts, fused, **decode))
    return [[next(texts) for _ in qs] for qs in questions]


def vision_prefixes(model: FusionVLM, pixel_values: list[torch.Tensor]) -> list[VisionPrefix]:
    """Fusion keys/values of B images' merged vision tokens (views float [V_b, 3, S, S] -> T_b tokens each):
    those in ``model.prefix_cache`` (the same views among its last ``model.prefix_cache.size`` images), the
    others from one vision-tower call and one fusion call (:meth:`~fusion_vlm.fusion.FusionModule.encode_prefixes`)."""
    def compute(views: list[torch.Tensor]) -> list[VisionPrefix]:
        return model.fusion.encode_prefixes(model.encode_images(torch.cat(views), [v.shape[0] for v in views]))

    return model.prefix_cache.get(pixel_values, compute)


def decode_with_fused(model: FusionVLM, prompts: list[Prompt], fused_tokens: list[torch.Tensor],
                      max_new_tokens: int = 64, do_sample: bool = False, use_cache: bool = True,
                      **gen_kwargs) -> list[str]:
    """Decode R prompts in one batch; returns R answer strings (special tokens dropped, stripped).

    The prompts are left-padded to one length L (ids long [R, L]); ``fused_tokens[r]`` (float [k_r, H],
    k_r = the prompt's fused positions) are projected into the LLM's width and put at those positions of
    the input embeddings [R, L, D], which go to the LLM's ``generate`` with ``gen_kwargs``.
    """
    pad = model.tokenizer.pad_token_id
    length = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    fused_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[i, length - n:] = torch.tensor(p.input_ids)
        mask[i, length - n:] = 1
        fused_mask[i, length - n:] = torch.tensor(p.fused_mask)
    ids, mask, fused_mask = ids.to(model.device), mask.to(model.device), fused_mask.to(model.device)
    embeds = model.llm.get_input_embeddings()(ids).clone()
    embeds[fused_mask] = model.projector(torch.cat(fused_tokens)).to(embeds.dtype)
    out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=do_sample, use_cache=use_cache, pad_token_id=pad,
                             eos_token_id=model.tokenizer.eos_token_id, **gen_kwargs)
    return [t.strip() for t in model.tokenizer.batch_decode(out, skip_special_tokens=True)]
