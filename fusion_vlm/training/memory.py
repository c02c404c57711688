"""Per-GPU memory plan for a training stage (DeepSpeed ZeRO, bf16), from parameter counts and a formula.

Parameter counts come from building the model on the ``meta`` device (no
memory, no download). Bytes per GPU, for P parameters of which T are trained,
on n GPUs (mixed-precision ZeRO accounting of Rajbhandari et al., 2020):

* weights: 2 P (bf16; DeepSpeed casts the whole module, the frozen LLM included), / n under ZeRO-3;
* gradients: 2 T (bf16), / n under ZeRO-2/3;
* optimizer states: 16 T (fp32 master copy, fp32 gradient partition, AdamW m and v), / n under ZeRO-1/2/3;
* activations (bf16, attention through SDPA/flash so no s x s score matrices are kept): the tensors
  autograd keeps for backward, per transformer layer and token of width h and MLP width i
  (:data:`LAYER_BYTES`): a trained CLIP block (LayerNorm, attention, GELU MLP) ``18 h + 4 i`` bytes;
  a trained Llama-style block (fusion module; fp32 RMSNorm inputs, SwiGLU) ``20 h + 8 i``; a frozen
  Llama block (the LLM) ``16 h + 6 i``, because a linear layer whose weight needs no gradient keeps
  no input. With gradient checkpointing only each layer's input (``2 h``) is kept, plus, during
  backward, one layer's full activations while it is recomputed -- one layer at a time over the
  whole model, so the largest such layer counts once (``recompute``). Tokens per sample: vision
  ``views x (patches + 1)``; fusion
  ``vision tokens + questions x (question_tokens + slots)``; LLM ``llm_tokens`` (plus fp32 logits over
  the vocabulary at ``answer_fraction`` of them); CLIP text tower (stage 1) ``questions x context``.
  The frozen LLM still keeps activations in stages 2-3: the loss is backpropagated through it to the
  fused tokens.
* overhead: CUDA context, NCCL and DeepSpeed communication buckets, allocator fragmentation (a flat
  ``overhead_gib``; ZeRO-3 adds its live-parameter prefetch buffer).

It is an estimate: against a measured bf16 step at the paper's widths (``scripts/bench_memory.py``,
docs/training.md) the activations + gradients come out 5-15% above the measurement (conservative).
Measure with ``torch.cuda.max_memory_allocated`` for sure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1024 ** 3


@dataclass
class MemoryEstimate:
    """GiB per GPU for one stage (see the module docstring for the formulas)."""

    stage: str
    micro_batch: int
    zero_stage: int
    n_gpus: int
    grad_checkpointing: bool
    params_total: int  # parameters held by the model (LLM included)
    params_trainable: int  # parameters the optimizer updates in this stage
    weights: float
    gradients: float
    optimizer_states: float
    activations_no_checkpointing: float
    activations_checkpointing: float
    activations: float  # the one that applies (grad_checkpointing)
    overhead: float
    total: float
    activation_parts: dict  # GiB per component for the chosen checkpointing setting

    def fits(self, gpu_gib: float) -> bool:
        """True when the total is below ``gpu_gib``."""
        return self.total <= gpu_gib

    def as_dict(self) -> dict:
        return asdict(self)


# bytes kept for backward per token of one layer, as (x hidden, x intermediate), bf16 tensors + fp32 norm inputs
LAYER_BYTES = {
    # LN in 2h, qkv-projection in 2h, q/k/v 6h, attention out 2h, out-projection in 2h, LN in 2h, fc in 2h;
    # GELU in 2i, projection in 2i
    "clip": (18, 4),
    # RMSNorm fp32 in 4h + normed 2h (x2), q/k/v 6h, attention out 2h; SiLU in, SiLU out, up, down in 2i each
    "llama": (20, 8),
    # frozen weights: RMSNorm fp32 in 4h (x2), q/k/v 6h, attention out 2h; SiLU in, SiLU out, up 2i each
    "llama_frozen": (16, 6),
}


def layer_bytes(tokens: int, hidden: int, inter: int, kind: str) -> float:
    """Bytes one transformer layer of ``kind`` (:data:`LAYER_BYTES`) keeps for backward over ``tokens`` tokens."""
    kh, ki = LAYER_BYTES[kind]
    return float(tokens) * (kh * hidden + ki * inter)


def stack_bytes(tokens: int, layers: int, hidden: int, inter: int, kind: str,
                checkpointing: bool) -> tuple[float, float]:
    """(kept, recompute) bytes of a stack of ``layers`` layers over ``tokens`` tokens (whole micro-batch).

    Without checkpointing every layer's activations are kept and ``recompute`` is 0; with it each
    layer's bf16 input is kept and ``recompute`` is one layer's activations (live while it is recomputed).
    """
    if checkpointing:
        return tokens * 2.0 * hidden * layers, layer_bytes(tokens, hidden, inter, kind)
    return layers * layer_bytes(tokens, hidden, inter, kind), 0.0


def _towers(model) -> dict:
    """Layer counts and widths of the parts, read off a (meta) model."""
    vis = model.vision.visual.transformer
    txt = model.text_encoder.transformer
    llm = model.llm_config.get_text_config()  # the architecture, also when the LLM is not loaded (llm.load=false)
    return {
        "vision": (len(vis.resblocks), vis.width, vis.resblocks[0].mlp.c_fc.out_features),
        "text": (len(txt.resblocks), txt.width, txt.resblocks[0].mlp.c_fc.out_features),
        "llm": (llm.num_hidden_layers, llm.hidden_size, llm.intermediate_size, llm.vocab_size),
    }


def estimate_memory(model_cfg, train_cfg, micro_batch: int | None = None, zero_stage: int = 2, n_gpus: int = 8,
                    grad_checkpointing: bool = True, *, n_questions: int = 4, question_tokens: int = 64,
                    llm_tokens: int = 2048, answer_fraction: float = 0.5, views: int | None = None,
                    overhead_gib: float = 2.0, model=None) -> MemoryEstimate:
    """Estimate per-GPU memory (GiB) of ``train_cfg.stage`` for ``model_cfg``.

    ``micro_batch`` defaults to ``train_cfg.micro_batch_size``; ``views`` to the
    HD-N maximum (``max_local_views + 1``); ``n_questions``/``question_tokens``/
    ``llm_tokens`` describe a typical sample (LLaVA mixes: a few turns, ~1-2k LLM tokens).
    ``model`` reuses an already built (meta) FusionVLM of ``model_cfg``.
    """
    from fusion_vlm.model import FusionVLM

    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage}: must be 0, 1, 2 or 3")
    if n_gpus < 1:
        raise ValueError(f"n_gpus={n_gpus}: must be >= 1")
    b = micro_batch or train_cfg.micro_batch_size
    stage = train_cfg.stage
    model = model if model is not None else FusionVLM(model_cfg, device="meta")
    trainable = model.set_stage(stage)
    p_total = sum(p.numel() for p in model.parameters())
    p_train = sum(p.numel() for p in trainable)

    weights = 2.0 * p_total / (n_gpus if zero_stage == 3 else 1)
    grads = 2.0 * p_train / (n_gpus if zero_stage >= 2 else 1)
    optim = 16.0 * p_train / (n_gpus if zero_stage >= 1 else 1)

    t = _towers(model)
    f = model_cfg.fusion
    grid = model_cfg.views.view_size // model_cfg.vision.patch_size
    n_views = views or model_cfg.views.max_local_views + 1
    from fusion_vlm.model import vision_token_count

    vision_tokens = vision_token_count(model_cfg, n_views)
    slots = f.n_queries + (n_questions - 1) * f.later
    fusion_tokens = vision_tokens + slots + (n_questions * question_tokens if f.use_question else 0)

    def parts(ckpt: bool) -> dict[str, float]:
        vl, vh, vi = t["vision"]
        stacks = {"vision": stack_bytes(b * n_views * (grid * grid + 1), vl, vh, vi, "clip", ckpt),
                  "fusion": stack_bytes(b * fusion_tokens, f.num_layers, f.hidden_size, f.intermediate_size,
                                        "llama", ckpt)}
        out = {"merge": b * n_views * grid * grid * vh * 2.0 * 2}
        if stage == "contrastive":
            tl, th, ti = t["text"]
            stacks["clip_text"] = stack_bytes(b * n_questions * model_cfg.vision.text_context_length, tl, th, ti,
                                              "clip", ckpt)
        else:
            ll, lh, li, vocab = t["llm"]
            stacks["llm"] = stack_bytes(b * llm_tokens, ll, lh, li, "llama_frozen", ckpt)
            out["logits"] = b * llm_tokens * answer_fraction * vocab * 4.0 * 2  # fp32 log-probs + their gradient
        out.update({name: kept for name, (kept, _) in stacks.items()})
        if ckpt:  # one layer is recomputed at a time, in whichever stack
            out["recompute"] = max(rec for _, rec in stacks.values())
        return out

    with_ckpt, without = parts(True), parts(False)
    chosen = with_ckpt if grad_checkpointing else without
    overhead = overhead_gib * GIB + (2.0 * 1e9 if zero_stage == 3 else 0.0)  # ZeRO-3 live-parameter buffer
    acts = sum(chosen.values())
    total = weights + grads + optim + acts + overhead
    return MemoryEstimate(
        stage=stage, micro_batch=b, zero_stage=zero_stage, n_gpus=n_gpus, grad_checkpointing=grad_checkpointing,
        params_total=p_total, params_trainable=p_train, weights=weights / GIB, gradients=grads / GIB,
        optimizer_states=optim / GIB, activations_no_checkpointing=sum(without.values()) / GIB,
        activations_checkpointing=sum(with_ckpt.values()) / GIB, activations=acts / GIB, overhead=overhead / GIB,
        total=total / GIB, activation_parts={k: v / GIB for k, v in chosen.items()})


def format_estimate(est: MemoryEstimate, gpu_gib: float | None = None) -> str:
    """A small human-readable table."""
    rows = [("weights (bf16)", est.weights), ("gradients (bf16)", est.gradients),
            ("optimizer states (fp32)", est.optimizer_states),
            (f"activations ({'with' if est.grad_checkpointing else 'without'} checkpointing)", est.activations),
            ("overhead", est.overhead), ("total", est.total)]
    lines = [f"stage {est.stage}: micro-batch {est.micro_batch}, ZeRO-{est.zero_stage}, {est.n_gpus} GPU(s), "
             f"parameters {est.params_total / 1e9:.2f} B (trainable {est.params_trainable / 1e9:.3f} B)"]
    lines += [f"  {name:<42}{gib:>8.1f} GiB" for name, gib in rows]
    lines.append("  activations by part: " + ", ".join(f"{k} {v:.1f}" for k, v in est.activation_parts.items()))
    lines.append(f"  activations with / without checkpointing: {est.activations_checkpointing:.1f} / "
                 f"{est.activations_no_checkpointing:.1f} GiB")
    if gpu_gib is not None:
        verdict = "fits" if est.fits(gpu_gib) else "does NOT fit"
        lines.append(f"  => {verdict} a {gpu_gib:g} GiB GPU ({est.total:.1f} GiB estimated)")
    return "\n".join(lines)
