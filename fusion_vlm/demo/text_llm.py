"""Stage 0, language side: the world tokenizer and a tiny Llama trained on text only.

The real system starts from a Llama-2 that has read a great deal of text, including text in which a
passage comes first and a question about it follows; that is what lets it answer from the fused
tokens placed before the question. A tiny Llama trained only on (question, answer) chats does not
learn to look back before the question, so the stand-in is trained on questions whose user turn
opens with a *text context* standing where the fused tokens will go (:func:`context_text`):

* ``answer``: the answer itself, e.g. " red" before "What colour is the shape in the top left?" (what a
  fused token that has worked the answer out would carry);
* ``evidence``: the phrases of the objects the question is about (:attr:`~fusion_vlm.demo.world.QA.evidence`),
  e.g. " purple triangle right, purple triangle top right" before "How many purple shapes are there?";
* ``scene``: every object of the scene in reading order (what an image caption would say);
* ``none``: no context (the question alone).

:func:`train_text_llm` trains on fresh text-only scenes (:func:`~fusion_vlm.demo.world.make_text_example`)
so that the LLM learns to read its context instead of memorising the train images' answers: one question
per sequence, or (``pack``) all the questions of a scene as one multi-turn chat (:func:`scene_prompt`), each
sequence opened by a context drawn from ``context_mix``. The loss (:func:`text_llm_loss`) is the answers'
loss, each question counted once, plus (``text_weight``) the next-token loss on all of the text, answers
included, as a real LLM is pretrained on all of its text. Still no images: image content must reach the LLM
through the fused tokens later, and it stays frozen from here on.

:func:`context_accuracy` (the report's context probe) measures how well the trained LLM answers from each
kind of context, and from one more, ``soft``: k fused positions that hold no token but the mean input
embedding of a chunk of the scene's object phrases (:func:`soft_texts`, :func:`soft_embeds`), a
vector-valued context, the form the fused tokens will have.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from fusion_vlm.demo.loop import optimise
from fusion_vlm.demo.scoring import GRADED, description_f1, score
from fusion_vlm.demo.world import FAMILIES, QA, Example, WorldConfig, make_text_example, phrases
from fusion_vlm.language import LLAMA2_CHAT_TEMPLATE, build_prompt

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
LOSSES_FILE = "stage0_losses.json"  # written last into the LLM directory: marks it complete
CONTEXTS = ("answer", "evidence", "scene", "soft", "none")  # the kinds the context probe reads
TRAIN_CONTEXTS = ("answer", "evidence", "scene", "none")  # the kinds train_text_llm can mix (text only)


def context_text(example: Example, qa: QA, kind: str) -> str:
    """The text that stands where the fused tokens go: "" for ``none``, else " text\\n" (the answer, the
    evidence phrases or the whole scene).

    The leading space makes a context word the same BPE token as the answer word (" red", not "red");
    the closing newline leaves the question's first token as it is after fused tokens. A context with
    no phrase says " nothing".
    """
    if kind in ("none", "soft"):  # a soft context is vectors at fused positions, not text
        return ""
    if kind == "answer":
        text = qa.answer
    elif kind == "evidence":
        text = ", ".join(qa.evidence)
    elif kind == "scene":
        text = example.description
    else:
        raise ValueError(f"context kind {kind!r}: expected one of {CONTEXTS}")
    return " " + (text or "nothing") + "\n"


def _corpus(examples: list[Example]):
    for ex in examples:
        yield ex.description
        for qa in ex.qas:
            yield qa.question
            yield qa.answer
            yield f"[INST] {qa.question} [/INST] {qa.answer}"
    yield "<<SYS>>\n\n<</SYS>>\n\n"


def train_tokenizer(examples: list[Example], out_dir: str | Path, vocab_size: int = 512):
    """Byte-level BPE on the world's questions, answers and descriptions; saved to ``out_dir`` (or loaded).

    Returns a ``PreTrainedTokenizerFast`` with specials <unk> <s> </s> <pad> (ids 0-3), bos/eos/unk/pad set
    and ``chat_template = LLAMA2_CHAT_TEMPLATE``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(out_dir)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(examples), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = LLAMA2_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def question_prompt(tokenizer, example: Example, qa: QA, kind: str, with_answer: bool = True, n_soft: int = 0):
    """One question opened by its ``kind`` context as a one-turn Llama-2 chat (a Prompt): with its answer
    (for training) or ending in the generation prompt. A ``soft`` context opens the turn with ``n_soft``
    fused positions (fill them with :func:`soft_embeds`)."""
    if (kind == "soft") != (n_soft > 0):
        raise ValueError(f"n_soft={n_soft} with context kind {kind!r}: a soft context needs n_soft > 0, others 0")
    return build_prompt(tokenizer, [(context_text(example, qa, kind) + qa.question,
                                     qa.answer if with_answer else None)], [n_soft])


def scene_prompt(tokenizer, example: Example, kind: str):
    """All the questions of ``example``, answered, as one multi-turn Llama-2 chat (a Prompt): a ``scene``
    context opens the first turn only (later questions read it further back, as later questions read the
    first turn's fused tokens), an ``answer`` or ``evidence`` context opens every turn with its own, ``none``
    opens none."""
    turns = [(context_text(example, qa, kind) if kind != "scene" or i == 0 else "") + qa.question
             for i, qa in enumerate(example.qas)]
    return build_prompt(tokenizer, [(q, qa.answer) for q, qa in zip(turns, example.qas)], [0] * len(turns))


def soft_texts(example: Example, k: int) -> list[str]:
    """The k texts of a ``soft`` context, one per fused position: the scene's object phrases in reading
    order dealt round-robin into min(k, n_objects) chunks (each ", "-joined), then the whole scene for
    the positions left over; a scene without objects gives "nothing" at every position."""
    items = phrases(example.objects)
    if not items:
        return ["nothing"] * k
    chunks = [", ".join(items[i::min(k, len(items))]) for i in range(min(k, len(items)))]
    return chunks + [", ".join(items)] * (k - len(chunks))


def soft_embeds(model, tokenizer, input_ids: torch.Tensor, prompts, soft: list[list[str] | None]) -> torch.Tensor:
    """``model``'s input embeddings of ``input_ids`` (long [B, L]), float [B, L, D], with prompt b's fused
    positions (``prompts[b].fused_mask``) holding the mean input embedding of the tokens of " " + text
    for each text of ``soft[b]`` (None or [] for a prompt without a soft context)."""
    embedding = model.get_input_embeddings()
    x = embedding(input_ids).clone()
    for b, (prompt, texts) in enumerate(zip(prompts, soft)):
        if not texts:
            continue
        pos = [i for i, fused in enumerate(prompt.fused_mask) if fused]
        if len(pos) != len(texts):
            raise ValueError(f"prompt {b} has {len(pos)} fused positions but {len(texts)} soft texts")
        vecs = [embedding(torch.tensor(tokenizer(" " + t, add_special_tokens=False)["input_ids"])).mean(0)
                for t in texts]
        x[b, pos] = torch.stack(vecs).to(x.dtype)
    return x


def _llm_batch(prompts, pad_id: int):
    """Right-padded (input_ids, attention_mask, labels), each long [B, L]; labels on the answers only."""
    length = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[b, :n] = torch.tensor(p.input_ids)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(p.labels)
    return ids, mask, labels


def answer_weights(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-token weights float [B, L] that count each answer once: 1/len on every token of each maximal run
    of labelled positions (``labels`` long [B, L], -100 elsewhere; a run is one answer and its eos), 0
    elsewhere; and the number of runs (answers)."""
    on = labels != -100
    starts = on & ~F.pad(on, (1, 0))[:, :-1]  # first token of each run
    run = torch.cumsum(starts.flatten(), 0).view_as(on) * on  # run index (1-based) of each labelled token
    n = int(starts.sum())
    sizes = torch.bincount(run.flatten(), minlength=n + 1).float()
    weights = torch.where(on, 1.0 / sizes[run].clamp(min=1), torch.zeros((), dtype=torch.float))
    return weights, n


def text_llm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor, text_weight: float = 0.0) -> torch.Tensor:
    """Scalar loss of a causal LM's ``logits`` float [B, L, V] on ``input_ids`` long [B, L]: the mean over
    answers (runs of ``labels`` != -100, long [B, L]) of each answer's mean next-token cross-entropy, plus
    ``text_weight`` times the mean next-token cross-entropy on every real token (``attention_mask`` [B, L]
    = 1) after the first, answers included (so a long answer, such as a description copied from the
    context, is also learnt token by token)."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:], reduction="none")  # [B, L-1]
    weights, n = answer_weights(labels)
    loss = (ce * weights[:, 1:]).sum() / max(n, 1)
    if text_weight:
        loss = loss + text_weight * ce[attention_mask[:, 1:].bool()].mean()
    return loss


def _draw_kinds(rng: random.Random, n: int, mix: dict[str, float]) -> list[str]:
    names = list(mix)
    return rng.choices(names, weights=[mix[k] for k in names], k=n)


def _scene_stream(world: WorldConfig, first: int = 0):
    """Endless fresh text-only scenes ``first``, ``first`` + 1, ... of ``world``
    (:func:`~fusion_vlm.demo.world.make_text_example`)."""
    i = first
    while True:
        yield make_text_example(i, world)
        i += 1


def _question_stream(world: WorldConfig, first: int = 0):
    """Endless (scene, qa) pairs: the questions of fresh text-only scenes ``first``, ``first`` + 1, ... of
    ``world``, in order."""
    for ex in _scene_stream(world, first):
        yield from ((ex, qa) for qa in ex.qas)


def train_text_llm(examples: list[Example], out_dir: str | Path, steps: int = 200, batch_size: int = 16,
                   lr: float = 2e-3, seed: int = 0, vocab_size: int = 512, hidden_size: int = 128,
                   num_layers: int = 4, num_heads: int = 4, intermediate_size: int = 256,
                   context_mix: dict[str, float] | None = None, world: WorldConfig | None = None,
                   pack: bool = False, text_weight: float = 0.0, describe: float | None = None,
                   families: tuple[str, ...] | None = None, init: str | Path | None = None, first_scene: int = 0,
                   progress: bool = True) -> dict:
    """Train the tokenizer (on ``examples``) then a tiny Llama on text only; ``save_pretrained`` both into
    ``out_dir``.

    Each step reads ``batch_size`` sequences made from fresh text-only scenes of ``world`` (default: the
    default world of ``seed``; ``describe``, when given, replaces its ``description_prob``: the chance that a
    scene's questions include the description, which copies the scene), each opened by a context drawn from
    ``context_mix`` ({kind: weight} over :data:`TRAIN_CONTEXTS`; None = no contexts): one question per
    sequence (a one-turn Llama-2 chat; questions taken in order from the scenes' question lists), or with
    ``pack`` one scene per sequence, all its questions as one multi-turn chat (:func:`scene_prompt`). The
    loss is :func:`text_llm_loss`: the answers' (each with its closing ``</s>``; every training prefix up to
    the first token of an answer equals the generation prompt, so greedy answers stay in format), each
    answer counted once, plus ``text_weight`` times the next-token loss on all of the text.

    A later phase of a curriculum: ``init`` (an LLM directory) is the start instead of a fresh model (its
    tokenizer is kept and ``examples`` and the size arguments are unused; the weights are rounded to float16,
    the precision the stand-ins ship in, so that continuing from a shipped LLM equals running the whole
    curriculum), ``families`` replaces the world's question families for the text scenes, and the scenes
    start at index ``first_scene`` (so that a phase reads scenes the earlier ones did not).
    Returns {"losses": list of ``steps`` floats, "seconds", "skipped": True when ``out_dir`` already held a
    finished run (then nothing is trained and the stored losses are returned)}.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    mix = dict(context_mix or {"none": 1.0})
    if set(mix) - set(TRAIN_CONTEXTS) or not sum(mix.values()) > 0:
        raise ValueError(f"context_mix={context_mix!r}: expected weights > 0 over {TRAIN_CONTEXTS} (the text "
                         f"contexts; 'soft' is read by the context probe only)")
    world = world or WorldConfig(seed=seed)
    if describe is not None:
        if not 0.0 <= describe <= 1.0:
            raise ValueError(f"describe={describe!r}: expected a probability in [0, 1]")
        world = dataclasses.replace(world, description_prob=describe)
    if families is not None:
        if not families or set(families) - set(FAMILIES):
            raise ValueError(f"families={families!r}: expected a non-empty subset of {FAMILIES}")
        world = dataclasses.replace(world, families=tuple(families))
    if init is not None and not (Path(init) / "config.json").is_file():
        raise ValueError(f"init={str(init)!r}: not an LLM directory (no config.json); expected a trained stand-in LLM")
    if first_scene < 0:
        raise ValueError(f"first_scene={first_scene!r}: expected an index >= 0")
    out_dir = Path(out_dir)
    if (out_dir / LOSSES_FILE).is_file():
        stored = json.loads((out_dir / LOSSES_FILE).read_text())
        return {"losses": stored["losses"], "seconds": 0.0, "skipped": True}
    start = time.time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if init is not None:
        tok = AutoTokenizer.from_pretrained(init)
        model = LlamaForCausalLM.from_pretrained(init, dtype=torch.float16).float()
    else:
        tok = train_tokenizer(examples, out_dir, vocab_size)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             num_key_value_heads=num_heads, max_position_embeddings=2048,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    stream = _scene_stream(world, first_scene) if pack else _question_stream(world, first_scene)
    batches = ([next(stream) for _ in range(batch_size)] for _ in range(steps))

    def loss_of(batch):  # batch: [scene] (pack) or [(scene, qa)]
        kinds = _draw_kinds(rng, len(batch), mix)
        prompts = [scene_prompt(tok, item, kind) if pack else question_prompt(tok, *item, kind)
                   for item, kind in zip(batch, kinds)]
        ids, mask, labels = _llm_batch(prompts, tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        return text_llm_loss(logits, ids, mask, labels, text_weight)

    losses = optimise(model, opt, batches, steps, lr, loss_of, "stage 0: text LLM", progress)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    seconds = time.time() - start
    (out_dir / LOSSES_FILE).write_text(json.dumps({"losses": losses, "seconds": seconds, "context_mix": mix,
                                                   "pack": pack, "text_weight": text_weight,
                                                   "description_prob": world.description_prob,
                                                   "families": list(world.families), "lr": lr, "init": init is not None,
                                                   "first_scene": first_scene}))
    return {"losses": losses, "seconds": seconds, "skipped": False}


@torch.no_grad()
def context_accuracy(llm_dir: str | Path, examples: list[Example], kinds=CONTEXTS, n_soft: int = 4,
                     max_new_tokens: int = 24) -> dict[str, dict[str, float]]:
    """Greedy accuracy (%) per context kind and family, {kind: {family: %}}, of the text LLM in ``llm_dir``
    when each question (asked alone) is opened by its context of that kind (``soft``: at ``n_soft``
    positions): how well the frozen stand-in reads what stands before a question. Descriptions are
    scored by item F1 (%), as in the demo's report."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(llm_dir)
    model = LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()  # fp16 files are upcast
    out = {}
    for kind in kinds:
        right = defaultdict(list)
        for ex in examples:
            for qa in ex.qas:
                k = n_soft if kind == "soft" else 0
                prompt = question_prompt(tok, ex, qa, kind, with_answer=False, n_soft=k)
                ids = torch.tensor([prompt.input_ids])
                embeds = soft_embeds(model, tok, ids, [prompt], [soft_texts(ex, k) if k else None])
                gen = model.generate(ids, inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
                pred = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
                right[qa.family].append(description_f1(pred, qa.answer) if qa.family in GRADED
                                        else float(score(pred, qa.answer, qa.family)))
        out[kind] = {f: 100.0 * sum(v) / len(v)
                     for f, v in sorted(right.items(), key=lambda kv: FAMILIES.index(kv[0]))}
    return out
