"""Typed model configuration: one dataclass per pipeline stage.

``configs/model/paper.yaml`` and ``configs/model/tiny.yaml`` are instances of
:class:`ModelConfig`; :func:`load_model_config` reads one and applies
``section.field=value`` overrides, failing at load time with a message that
names the offending field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from fusion_vlm.errors import MissingFileError
from fusion_vlm.schema import ConfigError, load_config
from fusion_vlm.schema import require as _require

REDUCERS = ("fusion", "all", "avgpool", "random")  # ModelConfig.reducer (fusion_vlm.reducers); fusion = the paper
STAGES = ("contrastive", "generation")  # the training stages: stage 1 contrastive, stages 2-3 generation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # links to the repository's configs/; shipped in the wheel


@dataclass
class ViewsConfig:
    """HD-N global+local views (see :mod:`fusion_vlm.views`)."""

    view_size: int = 336  # side of every view in pixels; must be divisible by vision.patch_size
    max_local_views: int = 9  # HD-N: at most this many local crops (9 = the paper's HD-9)
    max_image_pixels: int = 100_000_000  # decoded images with more pixels are rejected
    mean: tuple[float, ...] = CLIP_MEAN  # per-channel normalisation mean (CLIP's)
    std: tuple[float, ...] = CLIP_STD  # per-channel normalisation std (CLIP's)
    interpolation: str = "bicubic"  # resize kernel of the no_upsize rule: bicubic | bilinear
    hd_rule: str = "reference"  # reference: the paper's HD transform (small images upsized to fill the grid, white
    #                             local / black global padding); no_upsize: never upsize, mean-colour padding


@dataclass
class VisionConfig:
    """The open_clip vision tower (and the CLIP text tower used by the contrastive loss)."""

    model_name: str = "ViT-H-14"  # open_clip architecture name; ignored when `custom` is set
    pretrained: str | None = None  # open_clip pretrained tag (e.g. laion2b_s32b_b79k) or a local weights file; null = random init
    custom: dict | None = None  # open_clip CLIP config {embed_dim, vision_cfg, text_cfg} for a custom (e.g. tiny) model
    patch_size: int = 14  # must equal the tower's patch size (checked when built)
    width: int = 1280  # must equal the tower's width (checked when built); 1280 for ViT-H/14
    layer: int = -1  # transformer block whose output is used (-1 = last, with the final LayerNorm; -2 = penultimate)
    text_context_length: int = 512  # CLIP text tower context, extended from 77 as in the paper
    freeze: bool = False  # freeze the vision tower (it is trained in every paper stage)
    grad_checkpointing: bool = False  # activation checkpointing inside the vision tower and the CLIP text tower


@dataclass
class MergeConfig:
    """Stride-2 convolutional token merge with a nearest-neighbour residual (see :mod:`fusion_vlm.merge`)."""

    kernel_size: int = 3  # convolution kernel (odd)
    stride: int = 2  # spatial reduction per side: 24x24 -> 12x12
    residual: bool = True  # add the nearest-neighbour downsampled input grid
    newline: bool = True  # append one learned <newline> token per view
    init_std: float = 0.02  # convolution weights drawn from N(0, init_std) (0.02 as in the authors' code)


@dataclass
class FusionConfig:
    """The Llama-style fusion transformer (see :mod:`fusion_vlm.fusion`)."""

    hidden_size: int = 1024  # width of the fusion module (vision tokens are adapted to it)
    num_layers: int = 20  # decoder blocks
    num_heads: int = 16  # attention heads
    num_kv_heads: int = 16  # key/value heads (== num_heads: plain multi-head attention)
    intermediate_size: int = 4096  # MLP width
    rope_theta: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon (1e-6 as in the authors' code)
    max_positions: int = 16384  # longest fusion sequence (vision + questions + slots)
    text_context_length: int = 512  # question tokens kept per question (longer ones are truncated with a warning)
    max_queries: int = 768  # size of the learnable query codebook = largest usable N
    n_queries: int = 256  # N: slots after the first question (the last one is <eos>)
    n_queries_later: int | None = None  # N': slots after each later question; null = min(N, 8) as in the paper
    use_question: bool = True  # False drops the question tokens: [vision][N slots][N' slots]...
    grad_checkpointing: bool = False  # activation checkpointing in the fusion blocks
    attn_implementation: str = "sdpa"  # transformers attention backend: sdpa | eager | flash_attention_2 |
    #                                    sdpa_blocked (sdpa, but CPU bf16 causal prefill blockwise: fusion_vlm.attention)

    @property
    def later(self) -> int:
        """N' actually used: ``n_queries_later`` or min(N, 8) (the paper's rule; the one home of it)."""
        return self.n_queries_later if self.n_queries_later is not None else min(self.n_queries, 8)

    def later_for(self, n_queries: int, n_queries_later: int | None = None) -> int:
        """N' for a run at N = ``n_queries``: an explicit ``n_queries_later``, else min(N, :attr:`later`)."""
        return min(n_queries, self.later) if n_queries_later is None else n_queries_later


@dataclass
class ProjectorConfig:
    """Linear map from fused tokens to the LLM width."""

    bias: bool = False  # the paper's projector has no bias
    init_std: float = 1e-3  # normal init std of the weight


@dataclass
class LLMConfig:
    """The frozen causal LM (see :mod:`fusion_vlm.language`)."""

    path: str | None = None  # Hugging Face model id or local directory (AutoModelForCausalLM)
    tiny: dict | None = None  # LlamaConfig fields for a random-init LLM, used when `path` is null
    tokenizer: str | None = None  # tokenizer path when it differs from `path`; null with `tiny` = built-in byte tokenizer
    dtype: str = "bfloat16"  # weight dtype of the frozen LLM: float32 | bfloat16 | float16
    attn_implementation: str | None = None  # LLM attention: null = transformers' default (sdpa) | sdpa | eager |
    #                                         sdpa_blocked (replaces sdpa only, see fusion_vlm.attention)
    chat_template: str | None = None  # Jinja chat template override; null = the tokenizer's own (Llama-2 chat)
    system_prompt: str | None = None  # system message put in every prompt, if any
    max_length: int = 2048  # longest LLM sequence; longer training samples are skipped
    grad_checkpointing: bool = False  # activation checkpointing in the (frozen) LLM during training
    load: bool = True  # false: build the model without the LLM (stage 1 never runs it); its width comes from its config
    trust_remote_code: bool = False  # only if you trust the model repository's code
    save_weights: bool = False  # save_pretrained also writes the LLM weights (always for a `tiny` LLM)


@dataclass
class LossConfig:
    """Stage-1 contrastive + identity losses (see :mod:`fusion_vlm.losses`)."""

    contrastive_weight: float = 1.0  # weight of the symmetric contrastive loss
    identity_weight: float = 1.0  # weight of mean((Z Z^T - I)^2) over non-<eos> slots
    identity_scope: str = "batch"  # batch: one Z of all non-<eos> slots of the batch (paper eq. 19, reference);
    #                                group: one Z per question group, the losses averaged over groups
    logit_scale_init: float = math.log(100.0)  # s in exp(s), learnable, initialised to ln(100)
    embed_dim: int | None = None  # contrastive embedding size; null = the CLIP model's embed_dim
    same_answer_positive: bool = False  # true: identical answers in a batch are positives, not negatives (DESIGN: false)
    freeze_text_encoder: bool = False  # true: stage 1 keeps the CLIP text tower frozen (DESIGN trains it)


@dataclass
class ModelConfig:
    """Everything needed to build a :class:`fusion_vlm.model.FusionVLM`."""

    views: ViewsConfig = field(default_factory=ViewsConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reducer: str = "fusion"  # fusion (the paper) | all | avgpool | random: baselines without the fusion module
    #                          (fusion_vlm.reducers: every merged token, pooled to N, or N drawn at random)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        v, f = self.views, self.fusion
        _require(v.view_size >= 1, "views.view_size", v.view_size, "must be >= 1")
        _require(v.max_local_views >= 1, "views.max_local_views", v.max_local_views, "must be >= 1")
        _require(v.max_image_pixels >= 1, "views.max_image_pixels", v.max_image_pixels, "must be >= 1")
        _require(len(v.mean) == 3 and len(v.std) == 3, "views.mean/std", (v.mean, v.std), "need 3 values each")
        _require(all(s > 0 for s in v.std), "views.std", v.std, "must be positive")
        _require(v.interpolation in ("bicubic", "bilinear"), "views.interpolation", v.interpolation,
                 "must be bicubic or bilinear")
        _require(v.hd_rule in ("reference", "no_upsize"), "views.hd_rule", v.hd_rule,
                 "must be reference or no_upsize")
        _require(self.vision.patch_size >= 1, "vision.patch_size", self.vision.patch_size, "must be >= 1")
        _require(v.view_size % self.vision.patch_size == 0, "views.view_size", v.view_size,
                 f"must be divisible by vision.patch_size={self.vision.patch_size}")
        _require(self.vision.text_context_length >= 2, "vision.text_context_length",
                 self.vision.text_context_length, "must be >= 2")
        _require(self.reducer in REDUCERS, "reducer", self.reducer, f"must be one of {', '.join(REDUCERS)}")
        _require(self.merge.kernel_size % 2 == 1, "merge.kernel_size", self.merge.kernel_size, "must be odd")
        _require(self.merge.stride >= 1, "merge.stride", self.merge.stride, "must be >= 1")
        _require(self.loss.identity_scope in ("batch", "group"), "loss.identity_scope", self.loss.identity_scope,
                 "must be batch or group")
        _require(f.n_queries >= 1, "fusion.n_queries", f.n_queries, "must be >= 1")
        _require(f.later >= 1, "fusion.n_queries_later", f.n_queries_later, "must be >= 1")
        _require(f.later <= f.n_queries, "fusion.n_queries_later", f.n_queries_later,
                 f"must be <= fusion.n_queries={f.n_queries}")
        _require(f.n_queries <= f.max_queries, "fusion.n_queries", f.n_queries,
                 f"must be <= fusion.max_queries={f.max_queries}")
        _require(f.hidden_size % f.num_heads == 0, "fusion.hidden_size", f.hidden_size,
                 f"must be divisible by fusion.num_heads={f.num_heads}")
        _require(f.num_heads % f.num_kv_heads == 0, "fusion.num_kv_heads", f.num_kv_heads,
                 "must divide fusion.num_heads")
        _require(f.text_context_length >= 1, "fusion.text_context_length", f.text_context_length, "must be >= 1")
        _require(self.llm.path is not None or self.llm.tiny is not None, "llm.path", None,
                 "set llm.path (a Hugging Face model) or llm.tiny (a random-init Llama config)")
        _require(self.llm.dtype in ("float32", "bfloat16", "float16"), "llm.dtype", self.llm.dtype,
                 "must be float32, bfloat16 or float16")
        _require(self.llm.max_length >= 8, "llm.max_length", self.llm.max_length, "must be >= 8")



def resolve_preset(kind: str, name_or_path: str | Path) -> Path:
    """Map a preset name of ``configs/<kind>/`` (``paper``, ``tiny_stage1``...) or a path to an existing YAML file."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    preset = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = ", ".join(sorted(q.stem for q in (CONFIG_DIR / kind).glob("*.yaml")))
    raise MissingFileError(f"{kind} config '{name_or_path}' is neither a file nor a preset ({names})")


def resolve_config_path(name_or_path: str | Path) -> Path:
    """Map a model preset name (``tiny``, ``paper``) or a path to an existing YAML file."""
    return resolve_preset("model", name_or_path)


def load_model_config(name_or_path: str | Path = "tiny", overrides: list[str] | None = None) -> ModelConfig:
    """Load a :class:`ModelConfig` from a preset name or YAML path plus ``key=value`` overrides."""
    return load_config(ModelConfig, resolve_config_path(name_or_path), overrides)


__all__ = [
    "ConfigError", "ViewsConfig", "VisionConfig", "MergeConfig", "FusionConfig", "ProjectorConfig",
    "LLMConfig", "LossConfig", "ModelConfig", "load_model_config", "resolve_config_path", "resolve_preset",
]
