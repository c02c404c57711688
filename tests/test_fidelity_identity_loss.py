"""Identity loss of paper eq. 19: one Z of all non-<eos> slots of the batch, mse(Z Z^T, I); per-group as an option."""

import numpy as np
import pytest
import torch

from fusion_vlm.config import load_model_config
from fusion_vlm.losses import identity_loss
from fusion_vlm.processor import collate


def _numpy_identity(rows: np.ndarray) -> float:
    z = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    gram = z @ z.T
    return float(((gram - np.eye(len(z))) ** 2).mean())


def test_batch_scope_is_one_gram_over_all_slots_hand_computed():
    # group 1: two orthogonal slots; group 2: one slot equal to group 1's first slot (up to scale)
    g1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g2 = torch.tensor([[3.0, 0.0]])
    # Z rows (normalised): e1, e2, e1 -> Z Z^T = [[1,0,1],[0,1,0],[1,0,1]]; minus I leaves two 1s: 2 / 9
    assert identity_loss([g1, g2]).item() == pytest.approx(2 / 9)
    assert identity_loss([g1, g2], scope="batch").item() == pytest.approx(2 / 9)
    # per group: group 1 is orthonormal (0), group 2 alone is a 1x1 Gram [[1]] (0): the cross-group clash is missed
    assert identity_loss([g1, g2], scope="group").item() == pytest.approx(0.0)


def test_batch_scope_weighs_every_slot_equally_matches_numpy():
    rng = np.random.default_rng(0)
    big, small = rng.normal(size=(12, 5)), rng.normal(size=(3, 5))
    ours = identity_loss([torch.tensor(big, dtype=torch.float32), torch.tensor(small, dtype=torch.float32)])
    assert ours.item() == pytest.approx(_numpy_identity(np.concatenate([big, small])), rel=1e-5)
    grouped = identity_loss([torch.tensor(big, dtype=torch.float32), torch.tensor(small, dtype=torch.float32)],
                            scope="group")
    assert grouped.item() == pytest.approx((_numpy_identity(big) + _numpy_identity(small)) / 2, rel=1e-5)


def test_more_slots_than_width_uses_the_small_gram_and_agrees():
    # n = 40 slots of width 6 > 6: computed through ||Z^T Z||_F, must equal the n x n Gram form
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(25, 6)), rng.normal(size=(15, 6))]
    parts[1][0] = 0.0  # a zero row: normalised to zero, its diagonal term counts (0 - 1)^2 as in the Gram form
    z = torch.tensor(np.concatenate(parts), dtype=torch.float64)
    zn = torch.nn.functional.normalize(z, dim=-1)
    expected = ((zn @ zn.T - torch.eye(40, dtype=torch.float64)) ** 2).mean()
    ours = identity_loss([torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in parts])
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    ours.backward()  # differentiable


def test_empty_and_bad_scope():
    assert identity_loss([torch.zeros(0, 4), torch.zeros(0, 4)]).item() == 0.0
    with pytest.raises(ValueError, match="identity_scope"):
        identity_loss([torch.ones(2, 3)], scope="sample")
    with pytest.raises(Exception, match="loss.identity_scope"):
        load_model_config("tiny", ["loss.identity_scope=sample"])


def test_contrastive_stage_uses_one_z_of_all_slots_of_the_batch(tiny_model, image_factory):
    p = tiny_model.processor
    s1 = p.build(image_factory(300, 200, 1), [("What colour is the square?", "red"), ("How many?", "three")],
                 n_queries=6, n_queries_later=3, with_answers_for_contrastive=True)
    s2 = p.build(image_factory(120, 500, 2), [("Describe the image.", "a blue circle")], n_queries=6,
                 n_queries_later=3, with_answers_for_contrastive=True)
    batch = collate([s1, s2], tiny_model.tokenizer.pad_token_id)
    with torch.no_grad():
        out = tiny_model(batch, "contrastive")
        groups = tiny_model.fuse(batch).per_group()
    assert [g.shape[0] for g in groups] == [6, 3, 6]
    z = np.concatenate([g[:-1].double().numpy() for g in groups])  # non-<eos> slots: 5 + 2 + 5 rows
    assert z.shape[0] == 12
    assert out["identity"].item() == pytest.approx(_numpy_identity(z), rel=1e-4)
    per_group = np.mean([_numpy_identity(g[:-1].double().numpy()) for g in groups])
    assert abs(out["identity"].item() - per_group) > 1e-3  # not the per-group average
    assert tiny_model.config.loss.identity_scope == "batch"
