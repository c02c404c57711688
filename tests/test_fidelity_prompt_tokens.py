"""No stray SentencePiece "▁" around the fused tokens with a Llama-2-style tokenizer.

The real Llama-2 tokenizer cannot be downloaded here, so a small one is trained in the test with Llama-2's rules:
a BPE over "▁"-marked words with byte fallback (<0x00>..<0xFF>), <unk>/<s>/</s> as ids 0-2, and either the
normaliser of Llama-2's tokenizer.json (Prepend "▁" + Replace " " -> "▁", no pre-tokeniser) or transformers'
own LlamaTokenizer (Metaspace, legacy or not). The reference is the tokenizer's own ids of the prompt text.
"""

import json

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from fusion_vlm.language import IGNORE_INDEX, IMAGE_MARK, LLAMA2_CHAT_TEMPLATE, build_prompt

CORPUS = ["[INST] What colour is the square? [/INST] red", "<<SYS>> Be brief. <</SYS>>", "How many circles?",
          "Describe the image in detail.", "a blue circle and a red square", "three", "yes no"] * 10
TURNS = [("What colour is the square?", "red"), ("How many?", "three")]


@pytest.fixture(scope="module")
def vocab_merges():
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(t.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(t.to_str())["model"]["merges"]]
    assert "▁" in vocab
    return vocab, merges


def _llama2_json_style(vocab, merges):
    """Llama-2's tokenizer.json pipeline (as transformers 4.x loaded it)."""
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = None
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["tokenizer.json", "LlamaTokenizer legacy=False", "LlamaTokenizer legacy=True"])
def llama_tok(request, vocab_merges):
    vocab, merges = vocab_merges
    if request.param == "tokenizer.json":
        tok = _llama2_json_style(vocab, merges)
    else:
        tok = LlamaTokenizer(vocab=dict(vocab), merges=list(merges), legacy=request.param.endswith("True"))
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    tok.pad_token = "<unk>"
    return tok


def _rendered(tok, turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a is not None else [])
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=turns[-1][1] is None)


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_ids_without_fused_positions_are_the_tokenizers_own(llama_tok, system):
    tok = llama_tok
    p = build_prompt(tok, TURNS, [3, 2], system_prompt=system)
    own = tok(_rendered(tok, TURNS, system), add_special_tokens=False)["input_ids"]
    assert [t for t, m in zip(p.input_ids, p.fused_mask) if not m] == own
    assert sum(p.fused_mask) == 5


def test_no_lone_space_piece_before_or_after_the_fused_tokens(llama_tok):
    tok = llama_tok
    p = build_prompt(tok, TURNS + [("Describe the image.", None)], [3, 2, 2])
    pieces = ["<F>" if m else tok.convert_ids_to_tokens(t) for t, m in zip(p.input_ids, p.fused_mask)]
    runs = [i for i in range(len(pieces)) if pieces[i] == "<F>" and (i == 0 or pieces[i - 1] != "<F>")]
    assert len(runs) == 3
    for i in runs:
        assert pieces[i - 1] != "▁" and pieces[i - 1].endswith("]")  # "[INST]" closes right before
    after = [pieces[i] for i in range(1, len(pieces)) if pieces[i - 1] == "<F>" and pieces[i] != "<F>"]
    assert [a.lstrip("▁") for a in after] == ["What", "How", "Describe"]
    labelled = [t for t, lab in zip(p.input_ids, p.labels) if lab != IGNORE_INDEX]
    assert tok.decode(labelled).split() == ["red", "</s>", "three", "</s>"]


def test_byte_tokenizer_and_template_without_eos_keep_their_behaviour():
    from fusion_vlm.language import byte_tokenizer

    t = byte_tokenizer()
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n"
                       "{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}A:{% endif %}")
    p = build_prompt(t, [("q", "yes"), ("r", None)], [2, 1])
    shown = t.decode([t.unk_token_id if m else i for i, m in zip(p.input_ids, p.fused_mask)])
    assert shown == "U: <unk><unk>q\nA: yes</s>\nU: <unk>r\nA:"  # eos appended right after the answer
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}"
                       "{% endfor %}")  # drops the user turns, so their markers
    with pytest.raises(ValueError, match="image markers"):
        build_prompt(t, [("q", "yes")], [2])
    assert IMAGE_MARK not in shown
