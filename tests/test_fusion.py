"""Fusion layout, causality, use_question=False, and equality with a plain transformers LlamaModel."""

import pytest
import torch
from transformers import LlamaModel

from fusion_vlm.config import load_model_config
from fusion_vlm.fusion import FusionModule, QuestionTokenizer, plan_layout


@pytest.fixture(scope="module")
def fusion():
    torch.manual_seed(0)
    return FusionModule(load_model_config("tiny").fusion).eval()


@pytest.mark.parametrize("q_lens, expected_slots", [
    ([3], [(13, 21)]),
    ([3, 2], [(13, 21), (23, 27)]),
    ([3, 2, 5], [(13, 21), (23, 27), (32, 36)]),
])
def test_layout_positions(q_lens, expected_slots):
    layout = plan_layout(10, q_lens, n_queries=8, n_later=4)
    assert list(layout.slot_spans) == expected_slots
    q_starts = [10] + [end for _, end in expected_slots[:-1]]
    assert [s for s, _ in layout.question_spans] == q_starts
    assert [e - s for s, e in layout.question_spans] == q_lens
    assert layout.eos_positions == [e - 1 for _, e in expected_slots]
    assert layout.length == expected_slots[-1][1]


def test_layout_without_question():
    layout = plan_layout(10, [3, 2], n_queries=8, n_later=4, use_question=False)
    assert list(layout.slot_spans) == [(10, 18), (18, 22)]
    assert all(s == e for s, e in layout.question_spans)


def test_slots_end_with_eos(fusion):
    s = fusion.slots(5)
    torch.testing.assert_close(s[-1], fusion.eos_slot)
    torch.testing.assert_close(s[:-1], fusion.queries[:4])
    assert fusion.slots(1).shape == (1, 48)
    with pytest.raises(ValueError, match="max_queries"):
        fusion.slots(65)


def test_group_sizes_and_question1_cannot_see_question2(fusion):
    tok = QuestionTokenizer(64)
    vision = [torch.randn(34, 48)]
    q1, q2, q2b = tok("what colour is the square"), tok("how many circles"), tok("is there a red triangle here")
    with torch.no_grad():
        a = fusion(vision, [[q1, q2]], n_queries=8, n_later=4)
        b = fusion(vision, [[q1, q2b]], n_queries=8, n_later=4)
    assert [g.shape[0] for g in a.groups[0]] == [8, 4]
    torch.testing.assert_close(a.groups[0][0], b.groups[0][0])  # causal: group 1 ignores question 2
    assert not torch.allclose(a.groups[0][1], b.groups[0][1])


def test_matches_plain_llama_on_same_embeddings(fusion):
    tok = QuestionTokenizer(64)
    vision = torch.randn(17, 48)
    q = [tok("where is the dog"), tok("what is written")]
    embeds, layout = fusion.build_sequence(vision, q, 3, 2, True)
    plain = LlamaModel(fusion.decoder.config).eval()
    plain.load_state_dict(fusion.decoder.state_dict())
    with torch.no_grad():
        ref = plain(inputs_embeds=embeds[None]).last_hidden_state[0]
        out = fusion([vision], [q], 3, 2)
    for (s0, s1), got in zip(layout.slot_spans, out.groups[0]):
        torch.testing.assert_close(got, ref[s0:s1])
    torch.testing.assert_close(embeds[17:17 + len(q[0])], fusion.embed_tokens.weight[q[0]])


def test_questions_embedded_in_one_lookup(fusion):
    """embed_questions splits one table lookup back into the questions; its backward touches only their rows."""
    tok = QuestionTokenizer(64)
    q = [tok("what colour is the shape"), tok("is there a red circle"), tok("b")]
    parts = fusion.embed_questions(q)
    assert [p.shape for p in parts] == [(len(x), 48) for x in q]
    for p, ids in zip(parts, q):
        torch.testing.assert_close(p, fusion.embed_tokens.weight[ids])
    fusion.zero_grad()
    torch.cat(parts).sum().backward()
    touched = fusion.embed_tokens.weight.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert touched == sorted({t for x in q for t in x})
    fusion.zero_grad()


def test_batch_with_padding_equals_single(fusion):
    tok = QuestionTokenizer(64)
    v1, v2 = torch.randn(17, 48), torch.randn(51, 48)
    q1, q2 = [tok("a")], [tok("what is in the top left corner"), tok("b")]
    with torch.no_grad():
        both = fusion([v1, v2], [q1, q2], 4, 2)
        alone = fusion([v1], [q1], 4, 2)
    torch.testing.assert_close(both.groups[0][0], alone.groups[0][0], atol=1e-5, rtol=1e-4)


def test_no_question_mode_ignores_question_text(fusion):
    tok = QuestionTokenizer(64)
    v = [torch.randn(17, 48)]
    with torch.no_grad():
        a = fusion(v, [[tok("left")]], 4, 4, use_question=False)
        b = fusion(v, [[tok("completely different words")]], 4, 4, use_question=False)
        c = fusion(v, [[tok("left")]], 4, 4, use_question=True)
    torch.testing.assert_close(a.groups[0][0], b.groups[0][0])
    assert not torch.allclose(a.groups[0][0], c.groups[0][0])


def test_question_tokenizer_truncates_with_warning():
    tok = QuestionTokenizer(context_length=5)
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok("one two three four five six seven eight")
    assert len(ids) == 5
    assert QuestionTokenizer(512)("hello world") == tok.bpe.encode("hello world")
