"""Prompt building (fused-token positions, label masking) and each loss against a hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from fusion_vlm.language import IGNORE_INDEX, Projector, build_prompt, byte_tokenizer
from fusion_vlm.config import ProjectorConfig
from fusion_vlm.losses import contrastive_loss, generation_loss, identity_loss, shift_targets


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_fused_tokens_open_each_user_turn_and_labels_cover_answers(tok):
    p = build_prompt(tok, [("What colour?", "red"), ("How many?", "3")], [4, 2], system_prompt="Be brief.")
    text = tok.decode([t if not m else tok.unk_token_id for t, m in zip(p.input_ids, p.fused_mask)])
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<unk><unk><unk><unk>What colour? [/INST] red </s>"
                    "<s>[INST] <unk><unk>How many? [/INST] 3 </s>")
    assert sum(p.fused_mask) == 6
    labelled = [t for t, l in zip(p.input_ids, p.labels) if l != IGNORE_INDEX]
    assert tok.decode(labelled) == " red </s> 3 </s>"  # what the model generates after each " [/INST]"
    assert all(l == t for t, l in zip(p.input_ids, p.labels) if l != IGNORE_INDEX)
    assert p.input_ids[-1] == tok.eos_token_id and p.labels[-1] == tok.eos_token_id
    assert all(l == IGNORE_INDEX for l, m in zip(p.labels, p.fused_mask) if m)


def test_generation_prompt_has_no_labels(tok):
    p = build_prompt(tok, [("Q1", "a1"), ("Q2", None)], [3, 1])
    assert tok.decode(p.input_ids).endswith("Q2 [/INST]")
    assert tok.decode([t for t, l in zip(p.input_ids, p.labels) if l != IGNORE_INDEX]) == " a1 </s>"
    with pytest.raises(ValueError, match="turn 0"):
        build_prompt(tok, [("Q1", None), ("Q2", None)], [3, 1])


def test_labels_continue_the_generation_prompt(tok):
    gen = build_prompt(tok, [("Q1", None)], [2])
    train = build_prompt(tok, [("Q1", "a1")], [2])
    n = len(gen.input_ids)
    assert train.input_ids[:n] == gen.input_ids  # the training prompt extends the generation prompt
    assert all(l == IGNORE_INDEX for l in train.labels[:n]) and all(l != IGNORE_INDEX for l in train.labels[n:])


def test_eos_appended_when_template_has_none():
    t = byte_tokenizer()
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n"
                       "{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}A:{% endif %}")
    p = build_prompt(t, [("q", "yes"), ("r", None)], [1, 1])
    labelled = [i for i, l in zip(p.input_ids, p.labels) if l != IGNORE_INDEX]
    assert t.decode(labelled) == " yes</s>"


def test_projector_init():
    torch.manual_seed(0)
    proj = Projector(256, 512, ProjectorConfig())
    assert proj.proj.bias is None
    assert abs(proj.proj.weight.std().item() - 1e-3) < 1e-4


def test_contrastive_loss_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    s = torch.tensor(math.log(10.0))
    an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = 10.0 * an @ bn.T
    row = -torch.log_softmax(logits, 1).diag().mean()
    col = -torch.log_softmax(logits, 0).diag().mean()
    torch.testing.assert_close(contrastive_loss(a, b, s), 0.5 * (row + col))


def test_contrastive_loss_with_same_answer_positives_hand_computed():
    """Groups 0 and 2 share an answer: each row's loss is -log(softmax mass on all its positives)."""
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    s = torch.tensor(math.log(5.0))
    logits = 5.0 * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    pos = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    p_row, p_col = logits.softmax(1), logits.softmax(0)
    row = -torch.stack([torch.log(p_row[i][pos[i]].sum()) for i in range(3)]).mean()
    col = -torch.stack([torch.log(p_col[:, j][pos[:, j]].sum()) for j in range(3)]).mean()
    same = pos & ~torch.eye(3, dtype=torch.bool)  # the diagonal is always positive
    torch.testing.assert_close(contrastive_loss(a, b, s, same), 0.5 * (row + col))
    # no duplicates: the same as plain CLIP; a duplicate lowers the loss (a false negative removed)
    torch.testing.assert_close(contrastive_loss(a, b, s, torch.zeros(3, 3, dtype=torch.bool)), contrastive_loss(a, b, s))
    assert contrastive_loss(a, b, s, pos) < contrastive_loss(a, b, s)


def test_identity_loss_zero_for_orthonormal_and_hand_value():
    q, _ = torch.linalg.qr(torch.randn(8, 5))
    assert identity_loss([q.T * 3.0]).item() < 1e-10  # rows orthogonal (any length)
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # identical rows: gram = ones
    assert identity_loss([z]).item() == pytest.approx(0.5)  # (0,1,1,0)^2 / 4
    assert identity_loss([torch.zeros(0, 4)]).item() == 0.0
    assert identity_loss([z, q.T], scope="group").item() == pytest.approx(0.25)  # per-group mean


def test_generation_loss_and_shift():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])
    b, t, y = shift_targets(labels)
    assert b.tolist() == [0, 0, 1] and t.tolist() == [1, 2, 0] and y.tolist() == [5, 6, 7]
    logits = torch.randn(3, 10)
    expected = -torch.log_softmax(logits, -1)[torch.arange(3), y].mean()
    torch.testing.assert_close(generation_loss(logits, y), expected)
