"""``sdpa_blocked``: transformers' SDPA attention, with a faster bfloat16 path for causal prefill on the CPU.

On a CPU, PyTorch's fused (flash) attention kernel runs far below the speed of its bfloat16 matrix
products (oneDNN, AVX512-BF16): in a long causal prefill the attention then costs several times its share
of the FLOPs. :func:`blocked_causal_attention` computes the same causal attention as a loop over blocks of
query rows (and groups of heads, so that one block's scores stay in cache): per block one bfloat16 matrix
product for the scores of the keys up to the block's end (the lower triangle, blocks above the diagonal
are never computed), the diagonal block's upper triangle masked, a softmax (float32 inside, bfloat16 out)
and one matrix product with the values. The scores are rounded to bfloat16, as in transformers' ``eager``
attention in bfloat16; SDPA keeps them in float32, so the outputs differ from SDPA's within bfloat16
precision.

Importing this module registers the name :data:`ATTN_IMPLEMENTATION` with transformers'
``AttentionInterface`` (and SDPA's mask builder with ``AttentionMaskInterface``, so padding masks are built
as for ``sdpa``). :func:`sdpa_blocked_forward` takes the blocked path only where it is exact and faster:
CPU tensors in bfloat16, no mask (plain causal, as many keys as queries), no gradient, no dropout, no
sliding window / soft-cap / attention sinks; everything else (GPU, float32, padding, decoding with a
cache, training) goes to transformers' own ``sdpa`` function unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "sdpa_blocked"  # the name to pass as attn_implementation
BLOCK_ROWS = 256  # query rows per block
SCORE_BUDGET = 1 << 21  # score elements per block (batch x heads x rows x keys): ~4 MiB in bfloat16
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias")  # kwargs that must be None for the fast path


def blocked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             scaling: float | None = None, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """Causal attention over as many keys as queries, blockwise: float [B, H, L, D] x3 -> float [B, L, H, D].

    Equal to ``F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)``
    transposed to [B, L, H, D], with scores rounded to the input precision. ``scaling`` defaults to
    ``D ** -0.5``. Raises ValueError for mismatched shapes.
    """
    if query.dim() != 4 or key.shape != query.shape or value.shape[:3] != query.shape[:3]:
        raise ValueError(f"blocked_causal_attention: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}: expected [B, H, L, D] with equal B, H, L (and D for the key)")
    b, h, length, d = query.shape
    out = query.new_empty(b, length, h, value.shape[-1])
    q = query * (d ** -0.5 if scaling is None else scaling)
    kt = key.transpose(-1, -2)
    rows = min(block_rows, length)
    heads = max(1, min(h, SCORE_BUDGET // (b * rows * length)))
    # one buffer each for scores, probabilities and block outputs, reused by every block: fewer large allocations
    scores_buf, probs_buf = query.new_empty(2, b * heads * rows * length)
    pv_buf = query.new_empty(b * heads * rows * value.shape[-1])
    upper = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu_(1)  # above the diagonal
    for i0 in range(0, length, rows):
        i1 = min(length, i0 + rows)
        for h0 in range(0, h, heads):
            h1 = min(h, h0 + heads)
            shape = (b, h1 - h0, i1 - i0, i1)
            size = shape[0] * shape[1] * shape[2] * shape[3]
            scores = torch.matmul(q[:, h0:h1, i0:i1], kt[:, h0:h1, :, :i1], out=scores_buf[:size].view(shape))
            scores[..., i0:i1].masked_fill_(upper[: i1 - i0, : i1 - i0], float("-inf"))
            probs = torch._softmax(scores, -1, False, out=probs_buf[:size].view(shape))  # float32 inside
            pv = pv_buf[: shape[0] * shape[1] * shape[2] * value.shape[-1]].view(*shape[:3], value.shape[-1])
            out[:, i0:i1, h0:h1] = torch.matmul(probs, value[:, h0:h1, :i1], out=pv).transpose(1, 2)
    return out


def blocked_path_applies(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float, is_causal: bool | None,
                         kwargs: dict) -> bool:
    """Whether :func:`sdpa_blocked_forward` computes this call blockwise (see the module doc) or hands it to SDPA."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and key.dtype == torch.bfloat16
            and attention_mask is None and bool(causal) and query.shape[2] == key.shape[2] > 1
            and not grad and not dropout and not kwargs.get("output_attentions", False)
            and all(kwargs.get(k) is None for k in _UNSUPPORTED))


def sdpa_blocked_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query float [B, H, L, D], key/value [B, H_kv, S, D] -> ([B, L, H, D], None).

    :func:`blocked_causal_attention` where :func:`blocked_path_applies`, else transformers' ``sdpa``.
    """
    if blocked_path_applies(module, query, key, attention_mask, dropout, is_causal, kwargs):
        groups = query.shape[1] // key.shape[1]
        return blocked_causal_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def set_llm_attention(model: torch.nn.Module, name: str | None) -> str:
    """Set a transformers model's attention implementation to ``name`` (in place); returns the one in use.

    ``None`` keeps the model's own. :data:`ATTN_IMPLEMENTATION` replaces only ``sdpa`` (a model that runs
    another implementation, e.g. ``eager`` because it has no SDPA support, keeps it); any other name goes to
    transformers' ``set_attn_implementation``, which rejects names it does not know.
    """
    current = model.config._attn_implementation
    if name is None or name == current or (name == ATTN_IMPLEMENTATION and current != "sdpa"):
        return current
    model.set_attn_implementation(name)
    return model.config._attn_implementation


AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_blocked_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
