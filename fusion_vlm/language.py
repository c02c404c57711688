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


def load_tokenizer(cfg: LLMConfig, offline_fallback: bool = False):
    """The LLM's tokenizer (Hugging Face path, or the byte tokenizer for a tiny LLM), with a chat template.

    With ``offline_fallback`` (used on the meta device) a tokenizer that cannot
    be loaded is replaced by the byte tokenizer, so shapes can still be computed.
    """
    if cfg.tokenizer is None and cfg.path is None:
        tok = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:  # on the meta device only local files are tried: nothing is downloaded for a shape count
            tok = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.path, trust_remote_code=cfg.trust_remote_code,
                                                local_files_only=offline_fallback)
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
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = DTYPES[cfg.dtype]
    meta = torch.device(device).type == "meta"
    if cfg.path is None:
        llama = LlamaConfig(**{"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                               **cfg.tiny})
        with torch.device(device):
            model = LlamaForCausalLM(llama).to(dtype)
    elif meta:
        hf_cfg = _architecture(cfg, AutoConfig)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code).to(device)
    model.requires_grad_(False)
    model.eval()
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # noqa: E501
    return model


def _architecture(cfg: LLMConfig, auto_config):
    """The LLM's config.json; offline, a copy kept in ``configs/llm/<name>.json`` stands in."""
    try:
        return auto_config.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
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
    template has none). The text between fused-token positions is tokenised
    in pieces (as LLaVA does) with offsets, so labels follow characters.
    Needs a fast tokenizer.
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
    ids, labels, mask = [], [], []
    pending = [sp for sp in spans if not sp[2]]  # answers whose eos we append ourselves
    offset = 0
    for k, piece in enumerate(text.split(IMAGE_MARK)):
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        for tid, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
            pos = offset + start
            while pending and pos >= pending[0][1]:
                ids.append(tokenizer.eos_token_id), labels.append(tokenizer.eos_token_id), mask.append(False)
                pending.pop(0)
            ids.append(tid)
            labels.append(tid if any(s0 <= pos < s1 for s0, s1, _ in spans) else IGNORE_INDEX)
            mask.append(False)
        offset += len(piece) + len(IMAGE_MARK)
        if k < len(n_fused):
            ids.extend([tokenizer.pad_token_id] * n_fused[k])
            labels.extend([IGNORE_INDEX] * n_fused[k])
            mask.extend([True] * n_fused[k])
    for _ in pending:
        ids.append(tokenizer.eos_token_id), labels.append(tokenizer.eos_token_id), mask.append(False)
    return Prompt(ids, labels, mask)


def _answer_span(text: str, start: int, answer: str, eos: str) -> tuple[int, int, bool]:
    """(start, end, has_eos): from the end of the generation prompt through the answer and the template's eos."""
    a_text = answer.strip()
    end = (text.index(a_text, start) + len(a_text)) if a_text else start
    rest = text[end:]
    if eos and rest.lstrip().startswith(eos):
        return start, end + len(rest) - len(rest.lstrip()) + len(eos), True
    return start, end, False
