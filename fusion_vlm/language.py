"""Step 5 of the data path: projector and the frozen LLM with its chat prompt.

Fused tokens are mapped to the LLM width by a bias-free linear layer and put at
the start of their question's user turn. :func:`build_prompt` renders the
conversation with the tokenizer's chat template (Llama-2 chat by default) and
returns token ids with a mask of the fused-token positions and labels that are
``-100`` everywhere except on answer tokens and the answer-closing eos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from fusion_vlm.config import CONFIG_DIR, LLMConfig, ProjectorConfig

IGNORE_INDEX = -100
IMAGE_MARK = "<|fusion_vlm_image|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Llama-2 chat format: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] ...
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = none %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and sys %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n{% endif %}"
    "{{ m['content'] | trim }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)


class Projector(nn.Module):
    """Linear(fusion width -> LLM width, no bias): float [..., H] -> [..., D]."""

    def __init__(self, in_width: int, out_width: int, cfg: ProjectorConfig):
        super().__init__()
        self.proj = nn.Linear(in_width, out_width, bias=cfg.bias)
        nn.init.normal_(self.proj.weight, std=cfg.init_std)
        if cfg.bias:
            nn.init.zeros_(self.proj.bias)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        """Project fused tokens: float [..., H] -> [..., D]."""
        return self.proj(fused)


def byte_tokenizer():
    """A 256-symbol byte-level BPE tokenizer (no merges) with Llama-2 specials and chat template.

    Needs no download; used by the tiny random-init LLM. Vocabulary: 4 specials
    (``<unk>``, ``<s>``, ``</s>``, ``<pad>``) then the 256 byte symbols.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = LLAMA2_CHAT_TEMPLATE
    return fast


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to 1 / true / yes / on *now*.

    Read at call time (huggingface_hub reads it once, at import): every Hugging
    Face load of the package passes ``local_files_only=hub_offline()`` (or True).
    """
    import os

    return any(os.environ.get(k, "").strip().upper() in ("1", "TRUE", "YES", "ON")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_tokenizer(cfg: LLMConfig, offline_fallback: bool = False):
    """The LLM's tokenizer (Hugging Face path, or the byte tokenizer for a tiny LLM), with a chat template.

    With ``offline_fallback`` (used on the meta device) a tokenizer that cannot
    be loaded is replaced by the byte tokenizer, so shapes can still be computed.
    Only local files are read under ``HF_HUB_OFFLINE=1`` (:func:`hub_offline`);
    the tokenizer's own code runs only with ``cfg.trust_remote_code``.
    """
    if cfg.tokenizer is None and cfg.path is None:
        tok = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:  # on the meta device only local files are tried: nothing is downloaded for a shape count
            tok = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.path,
                                                trust_remote_code=bool(cfg.trust_remote_code),
                                                local_files_only=offline_fallback or hub_offline())
        except OSError:
            if not offline_fallback:
                raise
            tok = byte_tokenizer()
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    elif tok.chat_template is None:
        tok.chat_template = LLAMA2_CHAT_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def build_llm(cfg: LLMConfig, tokenizer, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen causal LM: ``AutoModelForCausalLM`` from ``cfg.path``, or a random Llama from ``cfg.tiny``.

    Returned in eval mode with ``requires_grad=False`` everywhere. On the
    ``meta`` device the weights are not loaded (architecture from config.json only).
    With ``cfg.grad_checkpointing`` the decoder layers are set up for non-reentrant
    activation checkpointing; it runs only while :func:`set_llm_mode` has put the
    LLM in training mode (see there).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    dtype = DTYPES[cfg.dtype]
    meta = torch.device(device).type == "meta"
    if cfg.path is None:
        with torch.device(device):
            model = LlamaForCausalLM(llm_architecture(cfg, tokenizer)).to(dtype)
    elif meta:
        hf_cfg = _architecture(cfg, AutoConfig)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, local_files_only=hub_offline(),
                                                     trust_remote_code=bool(cfg.trust_remote_code)).to(device)
    model.requires_grad_(False)
    model.eval()
    if cfg.grad_checkpointing:
        active = {k: v for k, v in model.config.get_text_config().to_dict().items()
                  if ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and v > 0}
        if active:  # set_llm_mode turns on the decoder layers' own training flag, which a layer may read for dropout
            raise ValueError(f"llm.grad_checkpointing: the LLM config has dropout {active}; checkpointing the "
                             f"frozen LLM needs every dropout probability at 0")
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.disable_input_require_grads()  # the fused tokens already carry the gradient path into the LLM
    return model


def llm_architecture(cfg: LLMConfig, tokenizer, local_only: bool = False):
    """The LLM's Hugging Face config (widths, layers, vocabulary), without building or loading any weight.

    A ``tiny`` LLM: its ``LlamaConfig`` (vocabulary and special ids from ``tokenizer``); a
    ``path``: its config.json (only local files with ``local_only``; offline, the copy in
    ``configs/llm/<name>.json`` stands in).
    """
    from transformers import AutoConfig, LlamaConfig

    if cfg.path is None:
        return LlamaConfig(**{"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                              **cfg.tiny})
    return _architecture(cfg, AutoConfig, local_only)


def set_llm_mode(llm: nn.Module, training: bool) -> nn.Module:
    """Put the frozen ``llm`` in eval mode, except the switch of activation checkpointing while ``training``.

    transformers checkpoints a decoder layer only when the layer itself is in
    training mode (``gradient_checkpointing and training`` on the layer). So when
    checkpointing was enabled (:func:`build_llm`) and ``training`` is true, exactly
    the ``training`` flag of each checkpointed layer is set; every module below it
    (attention, MLP, norms, any dropout) stays in eval mode, so outputs do not change.
    Under ``torch.no_grad`` (``generate``) nothing is checkpointed and the cache works.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    llm.eval()
    if training:
        for module in llm.modules():
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                module.training = True
    return llm


def _architecture(cfg: LLMConfig, auto_config, local_only: bool = True):
    """The LLM's config.json; offline, a copy kept in ``configs/llm/<name>.json`` stands in."""
    try:
        return auto_config.from_pretrained(cfg.path, trust_remote_code=bool(cfg.trust_remote_code),
                                           local_files_only=local_only or hub_offline())
    except OSError:
        local = CONFIG_DIR / "llm" / f"{cfg.path.rstrip('/').split('/')[-1]}.json"
        if not local.is_file():
            raise
        data = {k: v for k, v in json.loads(local.read_text()).items() if not k.startswith("_")}
        return auto_config.for_model(**data)


@dataclass
class Prompt:
    """One conversation as LLM input: ids, labels and fused-token positions, all of length L."""

    input_ids: list[int]  # token ids; fused positions hold the pad id
    labels: list[int]  # IGNORE_INDEX except answer tokens and the answer-closing eos
    fused_mask: list[bool]  # True where a fused (projected) vision token goes


def build_prompt(tokenizer, turns: list[tuple[str, str | None]], n_fused: list[int],
                 system_prompt: str | None = None) -> Prompt:
    """Render ``turns`` [(question, answer or None)] with ``n_fused[i]`` vision tokens opening user turn i.

    A final turn whose answer is None ends with the generation prompt. The
    labelled part of turn i is exactly what the model must generate after the
    generation prompt of turn i: the rendered text from the end of that prompt
    through the answer and its closing eos (the eos is appended when the
    template has none). The rendered text is tokenised once, without the
    image markers, and the fused positions are put at the token boundary where
    each marker was: the ids without the fused positions are exactly the
    tokenizer's own ids of the prompt text. (Tokenising the text in pieces
    between markers, as LLaVA does, leaves a lone SentencePiece "▁" before the
    fused tokens with Llama-2's tokenizer: "[INST] " ends a piece with a space.)
    Labels follow characters through the offsets. Needs a fast tokenizer.
    """
    if len(turns) != len(n_fused):
        raise ValueError(f"{len(turns)} turns but {len(n_fused)} fused-token groups")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("build_prompt needs a fast (Rust) tokenizer for character offsets")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    spans = []  # (start, end, template_has_eos) of each labelled answer, in characters of `text`
    for i, (question, answer) in enumerate(turns):
        if IMAGE_MARK in question:
            raise ValueError(f"question {i} contains the reserved marker {IMAGE_MARK!r}")
        messages.append({"role": "user", "content": IMAGE_MARK + question})
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError(f"turn {i} has no answer but is not the last turn")
            continue
        spans.append(len(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)))
        messages.append({"role": "assistant", "content": answer})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=turns[-1][1] is None)
    spans = [_answer_span(text, start, answer, tokenizer.eos_token)
             for start, (_, answer) in zip(spans, [t for t in turns if t[1] is not None])]
    pieces = text.split(IMAGE_MARK)
    if len(pieces) - 1 != len(n_fused):
        raise ValueError(f"the chat template rendered {len(pieces) - 1} of the {len(n_fused)} user turns' image "
                         f"markers; it must render every user message")
    marks = [sum(len(p) for p in pieces[: k + 1]) for k in range(len(n_fused))]  # marker k, in clean characters

    def clean(pos: int) -> int:
        return pos - len(IMAGE_MARK) * text.count(IMAGE_MARK, 0, pos)

    spans = [(clean(s0), clean(s1), has_eos) for s0, s1, has_eos in spans]
    pending = [sp[1] for sp in spans if not sp[2]]  # ends of the answers whose eos we append ourselves
    ids, labels, mask = [], [], []
    k = 0

    def flush(start: int, end: int) -> None:
        """Emit, in text order, the appended eos ending before ``start`` and the fused tokens before ``end``."""
        nonlocal k
        while True:
            eos = pending[0] if pending and start >= pending[0] else None
            fused = marks[k] if k < len(marks) and end > marks[k] else None
            if eos is None and fused is None:
                return
            if fused is None or (eos is not None and eos <= fused):
                ids.append(tokenizer.eos_token_id), labels.append(tokenizer.eos_token_id), mask.append(False)
                pending.pop(0)
            else:
                ids.extend([tokenizer.pad_token_id] * n_fused[k])
                labels.extend([IGNORE_INDEX] * n_fused[k])
                mask.extend([True] * n_fused[k])
                k += 1

    enc = tokenizer("".join(pieces), add_special_tokens=False, return_offsets_mapping=True)
    for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        flush(start, end)  # fused tokens go before the first token that ends after their marker
        ids.append(tid)
        labels.append(tid if any(s0 <= start < s1 for s0, s1, _ in spans) else IGNORE_INDEX)
        mask.append(False)
    flush(len(text) + 1, len(text) + 1)
    return Prompt(ids, labels, mask)


def _answer_span(text: str, start: int, answer: str, eos: str) -> tuple[int, int, bool]:
    """(start, end, has_eos): from the end of the generation prompt through the answer and the template's eos."""
    a_text = answer.strip()
    end = (text.index(a_text, start) + len(a_text)) if a_text else start
    rest = text[end:]
    if eos and rest.lstrip().startswith(eos):
        return start, end + len(rest) - len(rest.lstrip()) + len(eos), True
    return start, end, False
