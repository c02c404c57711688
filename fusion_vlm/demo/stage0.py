"""Stage 0 of the CPU demo: small stand-ins for the pretrained parts, made the way the real ones were.

* :func:`train_clip` -- the tiny open_clip CLIP of ``configs/model/tiny.yaml`` trained contrastively
  (``open_clip.loss.ClipLoss``, open_clip's tokenizer) on (global view, canonical description) pairs;
  saved as a safetensors state dict that ``open_clip.load_checkpoint`` (hence ``vision.pretrained``) loads.
* :func:`train_tokenizer` -- a byte-level BPE (``tokenizers``) on the world's text, wrapped as a
  ``PreTrainedTokenizerFast`` with Llama-2 specials and chat template.
* :func:`train_text_llm` -- a tiny ``LlamaForCausalLM`` trained on TEXT ONLY: each image's questions and
  answers as one Llama-2 chat (:func:`fusion_vlm.language.build_prompt` with no fused tokens), plain LM
  loss on every token (``loss_on="all"``, the default) or on the answer tokens and their closing ``</s>``
  only (``loss_on="answers"``). "all" is the default because a generation prompt ends at ``[/INST]``
  while build_prompt's training prompts end at ``[/INST] `` (the space before the answer is an unlabelled
  prompt token): with answer-only loss the token right after ``[/INST]`` is never trained and greedy
  decoding goes off-format. The LLM can only learn answer formats and priors; image content must come
  through the fused tokens later.

Every trainer is deterministic for its seed, shows a tqdm bar, and skips its work when its output already
exists (outputs are completed atomically, so an interrupted run is redone, a finished one is not).
:func:`demo_model_config` turns the outputs into a :class:`~fusion_vlm.config.ModelConfig`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fusion_vlm.config import ModelConfig, load_model_config
from fusion_vlm.demo.world import Example
from fusion_vlm.language import LLAMA2_CHAT_TEMPLATE, build_prompt
from fusion_vlm.vision import build_clip
from fusion_vlm.views import ViewProcessor

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
LOSSES_FILE = "stage0_losses.json"  # written last into the LLM directory: marks it complete
# step counts / batch sizes of the two demo sizes (see run_stage0)
PRESETS = {
    "quick": {"clip_steps": 30, "clip_batch": 32, "llm_steps": 80, "llm_batch": 8},
    "full": {"clip_steps": 200, "clip_batch": 64, "llm_steps": 200, "llm_batch": 16},
}


def _lr_at(step: int, steps: int, lr: float, warmup: float = 0.1) -> float:
    """Linear warmup over ``warmup * steps`` then cosine decay to 0."""
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Yield ``steps`` index tensors [min(batch_size, n)]: epochs of a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    bs = min(batch_size, n)
    for _ in range(steps):
        if order.numel() < bs:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:bs], order[bs:]
        yield idx


def _optimise(model, opt, batches, steps: int, lr: float, loss_of, desc: str, progress: bool,
              after_step=None) -> list[float]:
    """The shared stage-0 loop: for each batch, schedule the lr (:func:`_lr_at`), backprop ``loss_of(batch)``
    (a scalar tensor), clip the gradient norm to 1, step, then call ``after_step()``; returns the losses."""
    losses = []
    model.train()
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress)
    for step, batch in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".losses.json")


def clip_config() -> ModelConfig:
    """The tiny preset (its ``vision.custom`` dict and ``text_context_length`` define the CLIP)."""
    return load_model_config("tiny")


def clip_inputs(examples: list[Example], view_size: int = 112, context_length: int = 64):
    """(images float [n, 3, S, S]: the global view of each image, texts long [n, C]: its description tokens)."""
    views = ViewProcessor(view_size=view_size, max_local_views=1)
    images = torch.stack([views(ex.image)[0][0] for ex in examples])
    texts = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)([ex.description for ex in examples])
    return images, texts


def train_clip(examples: list[Example], out_path: str | Path, steps: int = 200, batch_size: int = 64,
               lr: float = 1e-3, seed: int = 0, progress: bool = True) -> dict:
    """Train the tiny CLIP on (global view, description) pairs; save its state dict to ``out_path``.

    Returns {"losses": list of per-step ClipLoss values, "seconds", "skipped": True when ``out_path``
    already existed (then nothing is trained and the stored losses are returned)}.
    """
    out_path = Path(out_path)
    if out_path.is_file():
        stored = json.loads(_sidecar(out_path).read_text()) if _sidecar(out_path).is_file() else {}
        return {"losses": stored.get("losses", []), "seconds": 0.0, "skipped": True}
    start = time.time()
    cfg = clip_config()
    torch.manual_seed(seed)
    model = build_clip(cfg.vision, cfg.views.view_size)
    images, texts = clip_inputs(examples, cfg.views.view_size, cfg.vision.text_context_length)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.98), eps=1e-6)  # CLIP's betas; with clipping, avoids the ln(B) plateau
    loss_fn = open_clip.loss.ClipLoss()

    def loss_of(idx):
        img = model.encode_image(images[idx], normalize=True)
        txt = model.encode_text(texts[idx], normalize=True)
        return loss_fn(img, txt, model.logit_scale.exp())

    def clamp_scale():
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    losses = _optimise(model, opt, _batches(len(examples), batch_size, steps, seed), steps, lr, loss_of,
                       "stage 0: CLIP", progress, after_step=clamp_scale)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    seconds = time.time() - start
    _sidecar(out_path).write_text(json.dumps({"losses": losses, "seconds": seconds}))
    os.replace(tmp, out_path)
    return {"losses": losses, "seconds": seconds, "skipped": False}


def _corpus(examples: list[Example]):
    for ex in examples:
        for qa in ex.qas:
            yield qa.question
            yield qa.answer
            yield f"[INST] {qa.question} [/INST] {qa.answer}"
    yield "<<SYS>>\n\n<</SYS>>\n\n"


def train_tokenizer(examples: list[Example], out_dir: str | Path, vocab_size: int = 512):
    """Byte-level BPE on the world's questions/answers; saved to ``out_dir`` (or loaded if already there).

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


def _llm_batch(prompts, idx, pad_id: int, loss_on: str):
    """Right-padded (input_ids, attention_mask, labels), each long [B, L]."""
    rows = [prompts[i] for i in idx.tolist()]
    length = max(len(p.input_ids) for p in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, p in enumerate(rows):
        n = len(p.input_ids)
        ids[b, :n] = torch.tensor(p.input_ids)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(p.input_ids if loss_on == "all" else p.labels)
    return ids, mask, labels


def train_text_llm(examples: list[Example], out_dir: str | Path, steps: int = 200, batch_size: int = 16,
                   lr: float = 2e-3, seed: int = 0, vocab_size: int = 512, hidden_size: int = 128,
                   num_layers: int = 4, num_heads: int = 4, intermediate_size: int = 256,
                   loss_on: str = "all", progress: bool = True) -> dict:
    """Train the tokenizer then a tiny Llama on the world's text only; ``save_pretrained`` both into ``out_dir``.

    One training sequence per image: all its (question, answer) turns as a Llama-2 chat.
    Returns {"losses": per-step cross-entropy, "seconds", "skipped"} (skipped: ``out_dir`` was complete).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if loss_on not in ("answers", "all"):
        raise ValueError(f"loss_on={loss_on!r}: expected 'answers' or 'all'")
    out_dir = Path(out_dir)
    if (out_dir / LOSSES_FILE).is_file():
        stored = json.loads((out_dir / LOSSES_FILE).read_text())
        return {"losses": stored["losses"], "seconds": 0.0, "skipped": True}
    start = time.time()
    tok = train_tokenizer(examples, out_dir, vocab_size)
    prompts = [build_prompt(tok, [(qa.question, qa.answer) for qa in ex.qas], [0] * len(ex.qas))
               for ex in examples]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def loss_of(idx):
        ids, mask, labels = _llm_batch(prompts, idx, tok.pad_token_id, loss_on)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    losses = _optimise(model, opt, _batches(len(prompts), batch_size, steps, seed), steps, lr, loss_of,
                       "stage 0: text LLM", progress)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    seconds = time.time() - start
    (out_dir / LOSSES_FILE).write_text(json.dumps({"losses": losses, "seconds": seconds, "loss_on": loss_on}))
    return {"losses": losses, "seconds": seconds, "skipped": False}


def demo_model_config(clip_path: str | Path, llm_dir: str | Path, n_queries: int = 8,
                      overrides: list[str] | None = None) -> ModelConfig:
    """The tiny preset with ``vision.pretrained=clip_path``, ``llm.path=llm_dir``, ``llm.tiny=None``, N=n_queries.

    ``overrides`` (``section.field=value``) are applied after; the result is validated.
    """
    cfg = load_model_config("tiny", overrides)
    cfg.vision.pretrained = str(clip_path)
    cfg.llm.path = str(llm_dir)
    cfg.llm.tiny = None
    cfg.llm.dtype = "float32"
    cfg.fusion.n_queries = n_queries
    cfg.validate()
    return cfg


def run_stage0(examples: list[Example], out_dir: str | Path, size: str = "full", seed: int = 0,
               progress: bool = True) -> dict:
    """Both stand-ins with the step counts of ``PRESETS[size]``: ``out_dir/clip.safetensors``, ``out_dir/llm/``.

    Returns {"clip_path", "llm_dir", "clip": train_clip's dict, "llm": train_text_llm's dict, "seconds"}.
    """
    if size not in PRESETS:
        raise ValueError(f"size={size!r}: expected one of {sorted(PRESETS)}")
    p, out_dir, start = PRESETS[size], Path(out_dir), time.time()
    clip = train_clip(examples, out_dir / "clip.safetensors", p["clip_steps"], p["clip_batch"], seed=seed,
                      progress=progress)
    llm = train_text_llm(examples, out_dir / "llm", p["llm_steps"], p["llm_batch"], seed=seed, progress=progress)
    return {"clip_path": out_dir / "clip.safetensors", "llm_dir": out_dir / "llm", "clip": clip, "llm": llm,
            "seconds": time.time() - start}
