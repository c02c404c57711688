"""Analytic cost model: prefill/decode FLOPs and KV-cache bytes of decoder transformers.

Conventions (all FLOPs count a multiply-add as 2; norms, RoPE, softmax, activations
and biases are ignored as lower-order):

* matmul weights per layer  W = h*(n_q*d) + 2*h*(n_kv*d) + (n_q*d)*h + m*h*I
  (q, k, v, o projections; m = 3 for a gated SwiGLU MLP, 2 for a plain MLP)
* prefill of T new tokens after P cached ones
      2*T*L*W                                     (weight matmuls)
    + 4*L*n_q*d * sum_{i=1..T} (P + i)            (QK^T and AV, causal: token i sees P+i keys)
      = 4*L*n_q*d * (T*P + T*(T+1)/2)             (non-causal: 4*L*n_q*d * T*(P+T))
    + 2*h*V * lm_head_tokens                      (logits; generation needs only the last one)
* decode of one token at context C = prefill with T=1, P=C
* KV cache = 2 * L * n_kv * d * tokens * bytes_per_element

:func:`prefill_speedup` compares the fusion path of this model (fusion module over
[vision][question][N slots], then the LLM over N fused tokens + text) with a
LLaVA-style baseline that feeds every merged vision token (1450 at HD-9) to the LLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fusion_vlm.config import FusionConfig, ModelConfig

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "float8": 1, "fp8": 1, "int8": 1, "int4": 0.5}


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a transformer stack: widths in features, ``vocab`` in tokens (0 = no LM head)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None  # None = hidden // heads
    gated_mlp: bool = True  # SwiGLU (gate, up, down) as in Llama; False = fc1/fc2 (CLIP ViT)

    @property
    def d_head(self) -> int:
        """Per-head width in features."""
        return self.head_dim or self.hidden // self.heads

    @property
    def weights_per_layer(self) -> int:
        """Matmul weights of one block (attention projections + MLP), a count of parameters."""
        q = self.heads * self.d_head
        kv = self.kv_heads * self.d_head
        return 2 * self.hidden * q + 2 * self.hidden * kv + (3 if self.gated_mlp else 2) * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        """Parameters of blocks + input embedding + LM head (untied), norms ignored."""
        return self.layers * self.weights_per_layer + 2 * self.hidden * self.vocab

    @classmethod
    def from_hf(cls, config, name: str | None = None) -> "TransformerConfig":
        """Build from a Hugging Face config: a config.json dict or a ``PretrainedConfig``.

        Reads hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads
        (default: heads), intermediate_size, vocab_size, head_dim (optional); a VLM
        config's ``text_config`` is used when the top level has no hidden_size.
        Raises ValueError naming a missing key.
        """
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = cfg["text_config"]
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
                   if cfg.get(k) is None]
        if missing:
            raise ValueError(f"LLM config lacks {', '.join(missing)}")
        heads = int(cfg["num_attention_heads"])
        return cls(name=name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "custom"),
                   hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]), heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   intermediate=int(cfg["intermediate_size"]), vocab=int(cfg.get("vocab_size") or 0),
                   head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None)


LLAMA2_7B = TransformerConfig("llama-2-7b", hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
                              vocab=32000)


def fusion_transformer(cfg: FusionConfig, name: str = "fusion-module") -> TransformerConfig:
    """Shape of the fusion decoder of ``cfg`` (no LM head: its CLIP-BPE table is only an embedding)."""
    return TransformerConfig(name, hidden=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_heads,
                             kv_heads=cfg.num_kv_heads, intermediate=cfg.intermediate_size, vocab=0)


# The fusion module of the paper (DESIGN.md section 2): FusionConfig's defaults, 1024 wide, 20 layers.
FUSION_MODULE = fusion_transformer(FusionConfig())
CLIP_VIT_H14 = TransformerConfig("clip-vit-h-14", hidden=1280, layers=32, heads=16, kv_heads=16, intermediate=5120,
                                 vocab=0, gated_mlp=False)
CLIP_VIT_L14 = TransformerConfig("clip-vit-l-14", hidden=1024, layers=24, heads=16, kv_heads=16, intermediate=4096,
                                 vocab=0, gated_mlp=False)
PRESETS = {c.name: c for c in (LLAMA2_7B, FUSION_MODULE, CLIP_VIT_H14, CLIP_VIT_L14)}
VIT_PRESETS = {"vit-h-14": CLIP_VIT_H14, "vit-l-14": CLIP_VIT_L14}  # open_clip model_name -> shape


def vision_transformer(cfg: ModelConfig) -> TransformerConfig:
    """Shape of the ViT of ``cfg``: ``vision.custom``'s vision_cfg (open_clip fields width, layers, head_width,
    mlp_ratio) or the preset of ``vision.model_name``. Raises ValueError for an unknown architecture."""
    if cfg.vision.custom:
        v = cfg.vision.custom.get("vision_cfg", {})
        width, layers = int(v.get("width", 768)), int(v.get("layers", 12))
        heads = width // int(v.get("head_width", 64))
        return TransformerConfig("custom-vit", hidden=width, layers=layers, heads=heads, kv_heads=heads,
                                 intermediate=int(width * float(v.get("mlp_ratio", 4.0))), vocab=0, gated_mlp=False)
    key = cfg.vision.model_name.strip().lower()
    if key not in VIT_PRESETS:
        raise ValueError(f"vision.model_name={cfg.vision.model_name!r} has no shape here; known: "
                         f"{', '.join(VIT_PRESETS)} (or set vision.custom)")
    return VIT_PRESETS[key]


def llm_transformer(cfg: ModelConfig) -> TransformerConfig:
    """Shape of the LLM of ``cfg``: ``llm.tiny`` (LlamaConfig fields), a local ``llm.path`` with a config.json,
    or Llama-2-7B for a Llama-2-7b hub id. Raises ValueError when none applies (pass a TransformerConfig)."""
    if cfg.llm.tiny:
        t = {"num_key_value_heads": None, "vocab_size": 32000, **cfg.llm.tiny}
        return TransformerConfig.from_hf(t, name="llm.tiny")
    path = Path(str(cfg.llm.path))
    if (path / "config.json").is_file():
        return load_llm_config(path)
    if "llama-2-7b" in str(cfg.llm.path).lower():
        return LLAMA2_7B
    raise ValueError(f"llm.path={cfg.llm.path!r}: no local config.json; pass the LLM shape (a preset or config.json)")


def vision_tokens_per_view(cfg: ModelConfig) -> int:
    """ViT tokens of one view of ``cfg``: (view_size / patch_size)^2 patches + CLS (577 at 336 px, patch 14)."""
    return (cfg.views.view_size // cfg.vision.patch_size) ** 2 + 1


def load_llm_config(spec) -> TransformerConfig:
    """Resolve ``spec``: a preset name (see ``PRESETS``), a path to a HF config.json, a dict,
    a ``PretrainedConfig`` or a :class:`TransformerConfig`. Raises ValueError / FileNotFoundError."""
    if isinstance(spec, TransformerConfig):
        return spec
    if isinstance(spec, (str, Path)):
        key = str(spec).strip().lower()
        if key in PRESETS:
            return PRESETS[key]
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return TransformerConfig.from_hf(data, name=path.parent.name or path.stem)
    return TransformerConfig.from_hf(spec)


def _check(**values: int) -> None:
    for key, val in values.items():
        if val < 0:
            raise ValueError(f"{key} must be >= 0, got {val}")


def prefill_flops(cfg: TransformerConfig, tokens: int, prefix: int = 0, causal: bool = True,
                  lm_head_tokens: int = 1) -> float:
    """FLOPs to run ``tokens`` new tokens through ``cfg`` after ``prefix`` cached tokens (module docstring)."""
    _check(tokens=tokens, prefix=prefix, lm_head_tokens=lm_head_tokens)
    keys = tokens * prefix + (tokens * (tokens + 1) / 2 if causal else tokens * tokens)
    attn = 4 * cfg.layers * cfg.heads * cfg.d_head * keys
    head = 2 * cfg.hidden * cfg.vocab * min(lm_head_tokens, tokens)
    return 2.0 * tokens * cfg.layers * cfg.weights_per_layer + attn + head


def decode_flops(cfg: TransformerConfig, context: int) -> float:
    """FLOPs to generate one token with ``context`` tokens already in the KV cache (logits included)."""
    return prefill_flops(cfg, 1, prefix=context, lm_head_tokens=1)


def kv_cache_bytes(cfg: TransformerConfig, tokens: int, dtype: str = "bfloat16") -> float:
    """KV-cache size in bytes: 2 (K and V) * layers * kv_heads * head_dim * tokens * bytes(dtype)."""
    _check(tokens=tokens)
    if dtype.lower() not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from: {', '.join(DTYPE_BYTES)}")
    return 2.0 * cfg.layers * cfg.kv_heads * cfg.d_head * tokens * DTYPE_BYTES[dtype.lower()]


def vision_encoder_flops(cfg: TransformerConfig = CLIP_VIT_H14, views: int = 10, tokens_per_view: int = 577) -> float:
    """FLOPs of a bidirectional ViT over ``views`` crops of ``tokens_per_view`` tokens (576 patches + CLS).
    Patch embedding and the 3x3 merge convolution are not included."""
    return views * prefill_flops(cfg, tokens_per_view, causal=False, lm_head_tokens=0)


def fusion_flops(vision_tokens: int = 1450, question_tokens: int = 32, n_slots: int = 256, prefix: int = 0,
                 cfg: TransformerConfig = FUSION_MODULE, llm_hidden: int = 4096, vision_width: int = 1280) -> float:
    """FLOPs of the fusion module for one question group, projector to ``llm_hidden`` included.

    First question: ``vision_tokens`` + question + N slots, ``prefix=0`` (the vision tokens
    are adapted from ``vision_width`` to the fusion width when they differ). A later
    question: ``vision_tokens=0``, N' slots, ``prefix`` = every token before it, whose
    keys/values are cached (vision-prefix KV reuse), so it costs only its own tokens.
    """
    _check(vision_tokens=vision_tokens, question_tokens=question_tokens, n_slots=n_slots)
    new = vision_tokens + question_tokens + n_slots
    adapter = 2.0 * vision_tokens * vision_width * cfg.hidden if vision_width != cfg.hidden else 0.0
    return adapter + prefill_flops(cfg, new, prefix=prefix, lm_head_tokens=0) + 2.0 * n_slots * cfg.hidden * llm_hidden


@dataclass(frozen=True)
class SpeedupReport:
    """Prefill FLOPs of both paths over all questions, the ratio, and final LLM contexts (tokens)."""

    baseline_flops: float  # LLM over prompt + all vision tokens + questions
    fusion_module_flops: float  # fusion module (+ adapter, projector) over all question groups
    fusion_llm_flops: float  # LLM over prompt + N / N' fused tokens + questions
    shared_flops: float  # added to both paths (e.g. the vision encoder)
    speedup: float  # (baseline + shared) / (fusion module + fusion LLM + shared)
    baseline_context: int  # LLM tokens in the KV cache after the last question, baseline
    fusion_context: int  # same, fusion path


def prefill_speedup(n_queries: int = 256, n_later: int | None = None, n_questions: int = 1,
                    question_tokens: int = 32, prompt_tokens: int = 32, answer_tokens: int = 0,
                    vision_tokens: int = 1450, llm: TransformerConfig = LLAMA2_7B,
                    fusion: TransformerConfig = FUSION_MODULE, vision_width: int = 1280,
                    shared_flops: float = 0.0) -> SpeedupReport:
    """Predicted prefill speed-up of the fusion path over the LLaVA-style baseline.

    Inputs are token counts: N / N' (default: ``FusionConfig.later_for``, min(N, 8)) fused tokens per question,
    ``question_tokens`` per question (same count assumed in the CLIP and LLM
    tokenizers), ``prompt_tokens`` of chat template/system text in the LLM only,
    ``answer_tokens`` of each earlier answer kept in context (prefill of later turns
    attends to them; generating them is decode and not counted). Turn k > 1 reuses
    the KV cache of everything before it, in both paths and in the fusion module.
    """
    later = FusionConfig().later_for(n_queries, n_later)
    _check(n_queries=n_queries, n_later=later, question_tokens=question_tokens, prompt_tokens=prompt_tokens,
           answer_tokens=answer_tokens, vision_tokens=vision_tokens)
    if n_questions < 1:
        raise ValueError(f"n_questions must be >= 1, got {n_questions}")
    base_ctx = prompt_tokens + vision_tokens + question_tokens
    base = prefill_flops(llm, base_ctx)
    fus_ctx = vision_tokens + question_tokens + n_queries
    fmod = fusion_flops(vision_tokens, question_tokens, n_queries, 0, fusion, llm.hidden, vision_width)
    llm_ctx = prompt_tokens + n_queries + question_tokens
    fllm = prefill_flops(llm, llm_ctx)
    for _ in range(n_questions - 1):
        base += prefill_flops(llm, answer_tokens + question_tokens, prefix=base_ctx)
        base_ctx += answer_tokens + question_tokens
        fmod += fusion_flops(0, question_tokens, later, fus_ctx, fusion, llm.hidden, vision_width)
        fus_ctx += question_tokens + later
        fllm += prefill_flops(llm, answer_tokens + later + question_tokens, prefix=llm_ctx)
        llm_ctx += answer_tokens + later + question_tokens
    speedup = (base + shared_flops) / (fmod + fllm + shared_flops)
    return SpeedupReport(base, fmod, fllm, shared_flops, speedup, base_ctx, llm_ctx)


def model_speedup(cfg: ModelConfig, width: int, height: int, n_queries: int | None = None,
                  n_later: int | None = None, n_questions: int = 1, question_tokens: int = 32,
                  prompt_tokens: int = 32, answer_tokens: int = 0, llm: TransformerConfig | None = None,
                  with_vision_encoder: bool = False) -> SpeedupReport:
    """:func:`prefill_speedup` for model config ``cfg`` and a ``width`` x ``height`` image (pixels).

    Vision tokens, N and N' come from the token calculator's ``fusion-vlm`` rule (the same numbers as
    ``fusion_vlm.info.token_accounting``), the fusion shape from ``cfg.fusion``, the adapter width from
    ``cfg.vision.width``, the LLM from ``llm`` or :func:`llm_transformer`. ``with_vision_encoder`` adds the
    ViT over every view to both paths.
    """
    from fusion_vlm.tokens.models import count_fusion_vlm

    count = count_fusion_vlm(width, height, n_queries=n_queries, n_later=n_later, n_questions=n_questions,
                             config=cfg)
    d = count.details
    llm = llm_transformer(cfg) if llm is None else llm
    shared = vision_encoder_flops(vision_transformer(cfg), d["local_views"] + 1, vision_tokens_per_view(cfg)) \
        if with_vision_encoder else 0.0
    return prefill_speedup(d["n_queries"], d["n_later"], n_questions, question_tokens, prompt_tokens, answer_tokens,
                           d["fusion_vision_tokens"], llm, fusion_transformer(cfg.fusion), cfg.vision.width, shared)
