"""Step 6 of the data path: the training losses (DESIGN.md §3).

- contrastive: symmetric cross-entropy between the ``<eos>`` slot embeddings
  and the CLIP text embeddings of the answers, logits scaled by exp(s);
- identity: mean((Z Z^T - I)^2) with Z the L2-normalised non-``<eos>`` slots of
  the whole batch (paper eq. 19; ``scope="group"``: one Z per question group,
  averaged), pushing slots apart;
- generation: next-token cross-entropy on answer tokens and the closing eos.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion_vlm.language import IGNORE_INDEX


def contrastive_loss(group_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor,
                     same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over G pairs.

    ``group_embed`` float [G, E] (``<eos>`` slots after the head), ``text_embed``
    float [G, E] (CLIP text tower), ``logit_scale`` s of shape [] or [1] (logits use exp(s)).
    Both embeddings are L2-normalised here. ``same`` bool [G, G] (optional) marks pairs
    whose answers are identical: those count as positives too (each row's loss is
    -log of the softmax mass on its positives), so that two "yes" answers in a batch
    are not pushed apart. Without it only the diagonal is positive (plain CLIP). Returns a scalar.
    """
    if group_embed.shape != text_embed.shape:
        raise ValueError(f"contrastive pairs differ in shape: {tuple(group_embed.shape)} vs {tuple(text_embed.shape)}")
    a = F.normalize(group_embed.float(), dim=-1)
    b = F.normalize(text_embed.float(), dim=-1)
    logits = logit_scale.float().exp() * a @ b.T  # [G, G]
    if same is None:
        target = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    if same.shape != logits.shape:
        raise ValueError(f"same has shape {tuple(same.shape)}, expected {tuple(logits.shape)}")
    pos = same.to(logits.device) | torch.eye(a.shape[0], dtype=torch.bool, device=logits.device)
    masked = logits.masked_fill(~pos, float("-inf"))
    rows = torch.logsumexp(logits, 1) - torch.logsumexp(masked, 1)
    cols = torch.logsumexp(logits, 0) - torch.logsumexp(masked, 0)
    return 0.5 * (rows.mean() + cols.mean())


IDENTITY_SCOPES = ("batch", "group")


def identity_loss(slots: list[torch.Tensor], scope: str = "batch") -> torch.Tensor:
    """mean((Z Z^T - I)^2) over L2-normalised slot outputs (paper eq. 19).

    ``slots`` is a list of float [n_g, H] (the non-``<eos>`` slot outputs of each
    question group of the batch). ``scope="batch"`` (the paper and the authors'
    code): Z float [sum n_g, H] stacks every slot of the batch, so slots of
    different groups are pushed apart too and every slot weighs the same.
    ``scope="group"``: one Z per group, the losses averaged over the groups with at
    least one slot. Returns a scalar; 0 (with a graph) if there is no slot (N = 1).
    """
    if scope not in IDENTITY_SCOPES:
        raise ValueError(f"loss.identity_scope={scope!r}: expected one of {', '.join(IDENTITY_SCOPES)}")
    zs = [z for z in slots if z.shape[0] > 0]
    if not zs:
        ref = slots[0] if slots else torch.zeros(())
        return ref.float().sum() * 0.0
    if scope == "batch":
        return _gram_identity_mse(F.normalize(torch.cat(zs).float(), dim=-1))
    return torch.stack([_gram_identity_mse(F.normalize(z.float(), dim=-1)) for z in zs]).mean()


def _gram_identity_mse(z: torch.Tensor) -> torch.Tensor:
    """mean((Z Z^T - I)^2) for float [n, H] with unit (or zero) rows.

    For n > H it uses ||Z Z^T||_F^2 = ||Z^T Z||_F^2, so the [n, n] Gram matrix of
    a whole batch (thousands of slots) is never built: sum((G - I)^2) =
    ||Z^T Z||_F^2 - 2 tr(G) + n with tr(G) = sum of the squared row norms.
    """
    n, h = z.shape
    if n <= h:
        gram = z @ z.T
        return ((gram - torch.eye(n, device=z.device, dtype=z.dtype)) ** 2).mean()
    total = (z.T @ z).pow(2).sum() - 2 * z.pow(2).sum() + n
    return total / (n * n)


def generation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions.

    ``logits`` float [K, V] are the predictions for the K target tokens
    ``labels`` long [K] (already shifted; entries equal to -100 are ignored).
    """
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def shift_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions predicting a labelled token: labels long [B, L] -> (batch idx [K], pos idx [K], targets [K]).

    Position t predicts token t+1, so the hidden state at t is paired with ``labels[:, t+1]``.
    """
    nxt = labels[:, 1:]
    b, t = torch.nonzero(nxt != IGNORE_INDEX, as_tuple=True)
    return b, t, nxt[b, t]
