"""``sdpa_blocked`` (fusion_vlm.attention): blockwise causal attention against SDPA, its fallbacks, and the
inference precision switch of FusionVLM (``cast_for_inference``). Nothing here is timed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

from fusion_vlm import attention
from fusion_vlm.attention import ATTN_IMPLEMENTATION, blocked_causal_attention, sdpa_blocked_forward


def _qkv(b, h, length, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g) for _ in range(3)]


def _reference(q, k, v, scale=None):
    """float64 SDPA, transposed to [B, L, H, D]."""
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                          scale=scale).transpose(1, 2)


class _Module(torch.nn.Module):
    """What transformers' attention functions read from the attention layer."""

    is_causal = True
    num_key_value_groups = 1


@pytest.mark.parametrize("shape,rows,budget", [((1, 4, 300, 32), 64, 1 << 21),  # several row blocks, one head group
                                               ((2, 6, 70, 16), 32, 2 * 32 * 70 * 2),  # head groups of 2, B = 2
                                               ((1, 2, 5, 8), 256, 1 << 21)])  # shorter than one block
def test_blocked_matches_sdpa_in_float32(monkeypatch, shape, rows, budget):
    monkeypatch.setattr(attention, "SCORE_BUDGET", budget)
    q, k, v = _qkv(*shape)
    out = blocked_causal_attention(q, k, v, block_rows=rows)
    assert out.shape == (shape[0], shape[2], shape[1], shape[3])
    torch.testing.assert_close(out.double(), _reference(q, k, v), atol=2e-6, rtol=1e-5)
    out = blocked_causal_attention(q, k, v, scaling=0.3, block_rows=rows)
    torch.testing.assert_close(out.double(), _reference(q, k, v, 0.3), atol=2e-6, rtol=1e-5)


def test_blocked_bfloat16_error_as_eager_attention():
    """In bfloat16 the scores are rounded as in transformers' eager attention: error of the same size."""
    q, k, v = _qkv(1, 4, 600, 64, seed=1)
    ref = _reference(q, k, v)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    mask = torch.full((600, 600), float("-inf")).triu(1).to(torch.bfloat16)[None, None]
    eager, _ = eager_attention_forward(_Module(), qb, kb, vb, mask, scaling=64 ** -0.5)
    errors = {name: (o.double() - ref).abs() for name, o in
              (("blocked", blocked_causal_attention(qb, kb, vb, block_rows=128)), ("eager", eager))}
    assert errors["blocked"].max() <= 1.25 * errors["eager"].max()
    assert errors["blocked"].mean() <= 1.25 * errors["eager"].mean()
    assert errors["blocked"].max() < 0.03  # a few bfloat16 steps of outputs of size ~1


def test_blocked_rejects_mismatched_shapes():
    q, k, v = _qkv(1, 2, 8, 4)
    with pytest.raises(ValueError, match="key"):
        blocked_causal_attention(q, k[:, :, :5], v)


def _calls(monkeypatch):
    seen = []
    original = attention.blocked_causal_attention

    def spy(*args, **kwargs):
        seen.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "blocked_causal_attention", spy)
    return seen


def test_dispatch_fast_path_and_fallbacks(monkeypatch):
    seen = _calls(monkeypatch)
    mod = _Module()
    q, k, v = (t.bfloat16() for t in _qkv(1, 2, 40, 8))
    with torch.no_grad():
        out, _ = sdpa_blocked_forward(mod, q, k, v, None, scaling=0.25)
        assert len(seen) == 1
        torch.testing.assert_close(out.double(), _reference(q, k, v, 0.25), atol=2e-2, rtol=0)
        pad = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
        pad[..., :3] = False
        pad[..., :3, :3] = torch.eye(3, dtype=torch.bool)
        cases = [("padding mask", (q, k, v, pad), {}), ("float32", tuple(t.float() for t in (q, k, v)) + (None,), {}),
                 ("fewer queries than keys (cache)", (q[:, :, -4:], k, v, None), {}),
                 ("sliding window", (q, k, v, None), {"sliding_window": 8}),
                 ("one query (decoding)", (q[:, :, :1], k[:, :, :1], v[:, :, :1], None), {})]
        for name, args, kw in cases:
            got, _ = sdpa_blocked_forward(mod, *args, scaling=0.25, **kw)
            want, _ = sdpa_attention_forward(mod, *args, scaling=0.25, **kw)
            assert torch.equal(got, want), name
        assert len(seen) == 1, "a fallback case took the blocked path"
    qg = q.clone().requires_grad_(True)
    sdpa_blocked_forward(mod, qg, k, v, None)[0].float().sum().backward()  # training: SDPA, gradients flow
    assert len(seen) == 1 and qg.grad is not None


def _llama(impl):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=impl).to(torch.bfloat16).eval()


def test_llama_with_sdpa_blocked_matches_sdpa(monkeypatch):
    """Registered with transformers: a whole (GQA) Llama gives SDPA's logits; with padding, the same mask."""
    seen = _calls(monkeypatch)
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, :7] = 0
    sdpa, blocked = _llama("sdpa"), _llama(ATTN_IMPLEMENTATION)
    with torch.no_grad():
        a, b = sdpa(ids).logits.float(), blocked(ids).logits.float()
        assert len(seen) == 2  # both layers blocked
        assert (a - b).abs().max() < 0.05 * a.abs().max()
        assert torch.equal(sdpa(ids, attention_mask=mask).logits, blocked(ids, attention_mask=mask).logits)
    assert len(seen) == 2


def test_set_llm_attention_replaces_only_sdpa():
    model = _llama("sdpa")
    assert attention.set_llm_attention(model, ATTN_IMPLEMENTATION) == ATTN_IMPLEMENTATION
    assert attention.set_llm_attention(model, None) == ATTN_IMPLEMENTATION
    eager = _llama("eager")
    assert attention.set_llm_attention(eager, ATTN_IMPLEMENTATION) == "eager"
    with pytest.raises(ValueError, match="bogus"):
        attention.set_llm_attention(eager, "bogus")


def test_cast_for_inference():
    from fusion_vlm.model import FusionVLM

    torch.manual_seed(0)
    model = FusionVLM.from_config("tiny", overrides=[f"fusion.attn_implementation={ATTN_IMPLEMENTATION}",
                                                     f"llm.attn_implementation={ATTN_IMPLEMENTATION}"]).eval()
    assert model.fusion.decoder.config._attn_implementation == ATTN_IMPLEMENTATION  # the option reaches both
    assert model.llm.config._attn_implementation == ATTN_IMPLEMENTATION
    assert FusionVLM.from_config("tiny").fusion.decoder.config._attn_implementation == "sdpa"  # the default
    llm_dtype = next(model.llm.parameters()).dtype
    assert next(model.fusion.parameters()).dtype == torch.float32
    model.cast_for_inference("bfloat16")
    for part in (model.vision, model.merge, model.fusion, model.projector):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    assert next(model.llm.parameters()).dtype == llm_dtype
    pixels = torch.rand(1, 3, model.config.views.view_size, model.config.views.view_size)
    answers = model.generate([pixels], [["what is it?"]], max_new_tokens=2)
    assert len(answers) == 1 and isinstance(answers[0][0], str)
    with pytest.raises(ValueError, match="dtype='int8'"):
        model.cast_for_inference("int8")


def test_runner_casts_for_inference(tmp_path):
    """``GenerationSettings.dtype`` (``fusion-vlm generate --dtype``) puts the trained parts in the LLM's precision."""
    from fusion_vlm.evaluation.runner import GenerationSettings, Runner
    from fusion_vlm.model import FusionVLM

    torch.manual_seed(0)
    model = FusionVLM.from_config("tiny", ["llm.dtype=bfloat16"])
    llm_dtype = next(model.llm.parameters()).dtype
    assert llm_dtype == torch.bfloat16 and next(model.fusion.parameters()).dtype == torch.float32
    Runner(tmp_path, GenerationSettings(dtype="llm"), model=model)
    assert {p.dtype for p in model.fusion.parameters()} == {llm_dtype}
    assert next(model.projector.parameters()).dtype == llm_dtype
