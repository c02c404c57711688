"""FusionVLM: the whole data path in one module.

image -> views -> vision tower -> merge -> fusion -> projector -> frozen LLM -> loss.

``model(batch, "contrastive")`` gives the stage-1 losses, ``model(batch,
"generation")`` the stage-2/3 loss; :meth:`FusionVLM.generate` answers
questions about images (through :mod:`fusion_vlm.generation`);
:meth:`save_pretrained` / :meth:`from_pretrained` store the trained parts as
safetensors next to ``config.yaml`` and a reference to the LLM (its weights
only when asked, or when it is a random tiny LLM).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fusion_vlm.config import STAGES, ConfigError, ModelConfig, load_model_config
from fusion_vlm.errors import CheckpointError, MissingFileError, one_line
from fusion_vlm.attention import set_llm_attention
from fusion_vlm import generation, reducers
from fusion_vlm.fusion import FusionModule, FusionOutput
from fusion_vlm.language import Projector, build_llm, llm_architecture, load_tokenizer, set_llm_mode
from fusion_vlm.losses import contrastive_loss, generation_loss, identity_loss, shift_targets
from fusion_vlm.merge import TokenMerge
from fusion_vlm.processor import Batch, FusionProcessor
from fusion_vlm.schema import apply_overrides, from_dict, save_config, to_dict
from fusion_vlm.vision import VisionTower, build_clip

TRAINED_FILE = "model.safetensors"
LLM_FILE = "llm.safetensors"
log = logging.getLogger(__name__)


class FusionVLM(nn.Module):
    """Question-fused visual-token reduction in front of a frozen causal LM."""

    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu"):
        super().__init__()
        cfg.validate()
        self.config = cfg
        clip = build_clip(cfg.vision, cfg.views.view_size, device)
        self.vision = VisionTower(clip.visual, cfg.vision, cfg.fusion.hidden_size)
        clip.visual = None  # the text tower stays in `text_encoder`; the ViT lives in `vision`
        clip.logit_scale = None  # unused: the contrastive loss has its own learnable scale below
        if cfg.vision.grad_checkpointing:  # the CLIP text tower too (stage 1 runs it on G x 512 tokens)
            text = getattr(clip, "text", None)  # open_clip's CustomTextCLIP keeps its text tower there
            if hasattr(text, "set_grad_checkpointing"):
                text.set_grad_checkpointing(True)
            elif hasattr(clip, "transformer"):
                clip.transformer.grad_checkpointing = True
        self.text_encoder = clip
        meta = torch.device(device).type == "meta"
        self.tokenizer = load_tokenizer(cfg.llm, offline_fallback=meta)
        # llm.load=false (stage 1): no LLM module at all; the projector's width comes from the LLM's config
        self.llm = build_llm(cfg.llm, self.tokenizer, device) if cfg.llm.load else None
        if self.llm is not None:
            set_llm_attention(self.llm, cfg.llm.attn_implementation)
        self.llm_config = self.llm.config if self.llm is not None else llm_architecture(cfg.llm, self.tokenizer, meta)
        with torch.device(device):
            self.merge = TokenMerge(cfg.fusion.hidden_size, cfg.merge)
            # a baseline reducer (fusion_vlm.reducers) takes the merged tokens without the fusion module
            self.fusion = FusionModule(cfg.fusion) if cfg.reducer == "fusion" else None
            self.projector = Projector(cfg.fusion.hidden_size, self.llm_config.get_text_config().hidden_size,
                                       cfg.projector)
            embed_dim = cfg.loss.embed_dim or clip.text_projection.shape[-1]
            self.contrastive_head = nn.Linear(cfg.fusion.hidden_size, embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.loss.logit_scale_init)))  # [1]: DeepSpeed-safe
        self.vision.adapter.to(device)
        if cfg.vision.freeze:
            self.vision.requires_grad_(False)
        self.processor = FusionProcessor(cfg, self.tokenizer)
        self.prefix_cache = generation.VisionPrefixCache(8)  # vision prefixes of the last images generate() saw
        self._set_llm_mode()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg: ModelConfig | str = "tiny", overrides: list[str] | None = None,
                    device: str | torch.device = "cpu") -> "FusionVLM":
        """Build from a :class:`ModelConfig`, a preset name or a YAML path (plus overrides)."""
        if not isinstance(cfg, ModelConfig):
            cfg = load_model_config(cfg, overrides)
        elif overrides:
            cfg = from_dict(ModelConfig, apply_overrides(to_dict(cfg), overrides))
        return cls(cfg, device)

    @property
    def device(self) -> torch.device:
        """Device of the trainable parts."""
        return self.projector.proj.weight.device

    def trainable_modules(self, stage: str) -> dict[str, nn.Module]:
        """Modules trained in ``stage`` (DESIGN.md §4); the LLM never is."""
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
        if self.fusion is None:  # a baseline: only its projector is trained, in the generation stage
            if stage == "contrastive":
                raise ConfigError(f"reducer={self.config.reducer}: the contrastive stage trains the fusion module; "
                                  f"a baseline reducer is trained in the generation stage only")
            return {"projector": self.projector}
        mods = {"merge": self.merge, "fusion": self.fusion}
        if not self.config.vision.freeze:
            mods["vision"] = self.vision
        if stage == "contrastive":
            mods["contrastive_head"] = self.contrastive_head
            if not self.config.loss.freeze_text_encoder:
                mods["text_encoder"] = self.text_encoder
        else:
            mods["projector"] = self.projector
        return mods

    def set_stage(self, stage: str) -> list[nn.Parameter]:
        """Freeze everything but ``stage``'s modules; return their parameters (for the optimizer)."""
        self.requires_grad_(False)
        params = []
        for module in self.trainable_modules(stage).values():
            module.requires_grad_(True)
            params.extend(module.parameters())
        if stage == "contrastive":
            self.logit_scale.requires_grad_(True)
            params.append(self.logit_scale)
        self._set_llm_mode()
        return params

    def train(self, mode: bool = True) -> "FusionVLM":
        """Like ``nn.Module.train`` but the frozen LLM stays in eval mode (clears the prefix cache).

        With ``llm.grad_checkpointing`` only the flag that makes transformers
        checkpoint each decoder layer follows ``mode`` (:func:`fusion_vlm.language.set_llm_mode`).
        """
        super().train(mode)
        self.prefix_cache.clear()
        self._set_llm_mode()
        return self

    def _set_llm_mode(self) -> None:
        if self.llm is not None:
            set_llm_mode(self.llm, self.training)

    def require_llm(self, what: str) -> nn.Module:
        """The LLM, or a one-line error naming ``what`` needs it when the model was built without it
        (``llm.load=false``)."""
        if self.llm is None:
            raise RuntimeError(f"{what} needs the LLM, but this FusionVLM was built without it (llm.load=false, as "
                               f"for stage 1); build or load it with llm.load=true, e.g. "
                               f"FusionVLM.from_pretrained(path, overrides=['llm.load=true'])")
        return self.llm

    def cast_for_inference(self, dtype: str = "llm") -> "FusionVLM":
        """Put every part but the LLM (vision tower, merge, fusion, projector, heads, text tower) in ``dtype``.

        ``dtype``: ``llm`` (the LLM's ``llm.dtype``) | float32 | bfloat16 | float16. The trained parts are
        built and saved in float32; next to a bfloat16 LLM on a CPU they then run at float32 speed, several
        times slower per FLOP than the LLM, which can make the fused path slower than feeding every vision
        token to the LLM. For inference only (training keeps float32 weights). Returns ``self``.
        """
        from fusion_vlm.language import DTYPES

        name = self.config.llm.dtype if dtype == "llm" else dtype
        if name not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected llm, {', '.join(DTYPES)}")
        for child, module in self.named_children():
            if child != "llm":
                module.to(DTYPES[name])
        self.prefix_cache.clear()
        return self

    # ------------------------------------------------------------------ forward
    def encode_images(self, pixel_values: torch.Tensor, views_per_sample: list[int]) -> list[torch.Tensor]:
        """Views float [sum V_b, 3, S, S] -> merged vision tokens per sample: list of [V_b * t, H]."""
        if sum(views_per_sample) != pixel_values.shape[0]:
            raise ValueError(f"views_per_sample sums to {sum(views_per_sample)} but pixel_values holds "
                             f"{pixel_values.shape[0]} views")
        merged = self.merge(self.vision(pixel_values.to(self.device)))  # [sum V, t, H]
        return [m.flatten(0, 1) for m in torch.split(merged, views_per_sample)]

    def fuse(self, batch: Batch) -> FusionOutput:
        """Vision + questions + slots -> fused tokens of every group (or a baseline's tokens, see :meth:`reduce`)."""
        vision = self.encode_images(batch.pixel_values, batch.views_per_sample)
        views = torch.split(batch.pixel_values, batch.views_per_sample) if self.config.reducer == "random" else None
        return self.reduce(vision, batch.questions, batch.n_queries, batch.n_queries_later, batch.use_question,
                           batch.independent, views)

    def reduce(self, vision: list[torch.Tensor], questions: list[list[list[int]]], n_queries: int,
               n_queries_later: int, use_question: bool, independent: bool = False,
               pixel_values: list[torch.Tensor] | None = None) -> FusionOutput:
        """Merged tokens ``vision[b]`` float [T_b, H] -> the LLM's visual tokens of every question group.

        ``reducer=fusion``: the fusion module (``groups[b][g]`` float [N or N', H]); a baseline
        (:mod:`fusion_vlm.reducers`) ignores the questions: float [T_b or min(N, T_b), H]. ``pixel_values[b]``
        (views float [V_b, 3, S, S]) seed ``random`` per image outside training (None: a fresh draw).
        """
        if self.fusion is not None:
            return self.fusion(vision, questions, n_queries, n_queries_later, use_question, independent=independent)
        seeds = None
        if pixel_values is not None and not self.training:
            seeds = [reducers.image_seed(p) for p in pixel_values]
        later = self.config.fusion.later_for(n_queries, n_queries_later)
        return reducers.reduce_batch(self.config.reducer, vision, [len(q) for q in questions], n_queries, later,
                                     independent, seeds)

    def llm_embeddings(self, batch: Batch, fused: FusionOutput) -> torch.Tensor:
        """LLM input embeddings [R, L, D] with projected fused tokens at ``batch.fused_mask``.

        Row r holds sample r's groups (a conversation) or, when ``batch.independent``, group r of the
        flattened (sample, group) order.
        """
        embeds = self.require_llm("the generation stage").get_input_embeddings()(
            batch.input_ids.to(self.device)).clone()
        per_row = fused.per_group() if batch.independent else fused.per_sample()
        counts = batch.fused_mask.sum(dim=1).tolist()
        if len(per_row) != len(counts):
            raise ValueError(f"the fusion module produced tokens for {len(per_row)} LLM rows but the batch has "
                             f"{len(counts)}")
        for r, (tokens, n) in enumerate(zip(per_row, counts)):
            if tokens.shape[0] != n:
                raise ValueError(f"LLM row {r}: the fusion module produced {tokens.shape[0]} tokens but the prompt "
                                 f"has {n} fused-token positions")
        projected = self.projector(torch.cat(per_row)).to(embeds.dtype)
        embeds[batch.fused_mask.to(embeds.device)] = projected
        return embeds

    def forward(self, batch: Batch, stage: str = "generation") -> dict[str, torch.Tensor]:
        """Named losses for ``stage``: {"loss", "contrastive", "identity"} or {"loss", "generation"}."""
        batch = batch.to(self.device)
        fused = self.fuse(batch)
        if stage == "contrastive":
            if self.fusion is None:
                raise ConfigError(f"reducer={self.config.reducer}: the contrastive stage needs the fusion module")
            if batch.answer_tokens is None:
                raise ValueError("the contrastive stage needs answer_tokens (build samples with "
                                 "with_answers_for_contrastive=True)")
            text = self.text_encoder.encode_text(batch.answer_tokens)
            same = None
            if self.config.loss.same_answer_positive:  # identical token rows = identical answers
                same = (batch.answer_tokens[:, None, :] == batch.answer_tokens[None, :, :]).all(-1)
            con = contrastive_loss(self.contrastive_head(fused.eos()), text, self.logit_scale, same)
            ident = identity_loss(fused.non_eos(), self.config.loss.identity_scope)
            loss = self.config.loss.contrastive_weight * con + self.config.loss.identity_weight * ident
            return {"loss": loss, "contrastive": con.detach(), "identity": ident.detach()}
        if stage != "generation":
            raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
        embeds = self.llm_embeddings(batch, fused)
        decoder = self.llm.get_decoder()
        hidden = decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        b, t, targets = shift_targets(batch.labels)
        if targets.numel() == 0:
            raise ValueError("batch has no labelled answer token")
        logits = self.llm.get_output_embeddings()(hidden[b, t])
        gen = generation_loss(logits, targets)
        return {"loss": gen, "generation": gen.detach()}

    # ------------------------------------------------------------------ inference
    def generate(self, images: list, questions: list[list[str]], max_new_tokens: int = 64,
                 n_queries: int | None = None, use_question: bool | None = None,
                 n_queries_later: int | None = None, do_sample: bool = False, use_cache: bool = True,
                 conversation: bool = True, reuse_vision_prefix: bool = True, **gen_kwargs) -> list[list[str]]:
        """Answer ``questions[b]`` (G_b strings) about ``images[b]``; returns answers[b][g] (strings).

        ``conversation=True``: the questions of an image form one multi-turn conversation (N slots for the
        first, N' for later ones); ``conversation=False``: every question is asked on its own with N slots,
        as a benchmark does, the vision prefix shared by an image's questions (``reuse_vision_prefix``) and
        kept in ``self.prefix_cache``. Greedy by default. See :func:`fusion_vlm.generation.generate`.
        """
        return generation.generate(self, images, questions, max_new_tokens=max_new_tokens, n_queries=n_queries,
                                   use_question=use_question, n_queries_later=n_queries_later, do_sample=do_sample,
                                   use_cache=use_cache, conversation=conversation,
                                   reuse_vision_prefix=reuse_vision_prefix, **gen_kwargs)

    # ------------------------------------------------------------------ saving
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of every part except the LLM (vision, merge, fusion, projector, text tower, heads)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    def save_pretrained(self, directory: str | Path, save_llm: bool | None = None) -> Path:
        """Write ``config.yaml``, ``model.safetensors`` and, when needed, ``llm.safetensors`` + tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_config(self.config, directory / "config.yaml")
        state = {k: v.detach().contiguous().cpu() for k, v in self.trained_state_dict().items()}
        save_file(state, str(directory / TRAINED_FILE), metadata={"format": "pt"})
        with_llm = self.llm is not None and (self.config.llm.path is None or
                                             (self.config.llm.save_weights if save_llm is None else save_llm))
        if with_llm:
            llm_state = {k: v.detach().contiguous().cpu() for k, v in self.llm.state_dict().items()}
            save_file(_untie(llm_state), str(directory / LLM_FILE), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(directory / "tokenizer")
        (directory / "llm_reference.json").write_text(json.dumps(
            {"path": self.config.llm.path, "weights_saved": with_llm}, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, overrides: list[str] | None = None,
                        device: str | torch.device = "cpu", trust_remote_code: bool = False,
                        dtype: str | None = None) -> "FusionVLM":
        """Load a directory written by :meth:`save_pretrained` (overrides such as ``fusion.n_queries=64``).

        ``dtype`` (inference): cast the parts other than the LLM with :meth:`cast_for_inference` (``llm``:
        the LLM's precision, the fast choice on a CPU); None keeps them as saved (float32).

        ``trust_remote_code`` is the only switch that lets the LLM or its
        tokenizer run Python code shipped with them: a checkpoint's
        ``config.yaml`` asking for it (``llm.trust_remote_code: true``) is
        ignored with a one-line warning, and an LLM that needs its own code
        is then refused with a :class:`CheckpointError` saying how to allow it.
        Weights are loaded strictly: a missing, unexpected or mis-shaped
        tensor, or a damaged safetensors file, is a one-line
        :class:`CheckpointError` naming the file. Under ``HF_HUB_OFFLINE=1``
        the referenced LLM is read from local files only.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise MissingFileError(f"checkpoint '{directory}': no such folder")
        if not (directory / "config.yaml").is_file() or not (directory / TRAINED_FILE).is_file():
            raise MissingFileError(f"checkpoint '{directory}': no config.yaml / {TRAINED_FILE} (not a FusionVLM "
                                   f"checkpoint)")
        cfg = load_model_config(directory / "config.yaml", overrides)
        if cfg.llm.trust_remote_code and not trust_remote_code:
            log.warning("checkpoint '%s' asks for llm.trust_remote_code; ignored (pass trust_remote_code=True / "
                        "--trust-remote-code to run the LLM's own code)", directory)
        cfg.llm.trust_remote_code = bool(trust_remote_code)
        if (directory / "tokenizer").is_dir():
            cfg.llm.tokenizer = str(directory / "tokenizer")
        cfg.vision.pretrained = None  # the trained vision weights come from model.safetensors
        has_llm_file = (directory / LLM_FILE).is_file()
        if not has_llm_file and _llm_reference(directory).get("weights_saved"):
            raise CheckpointError(f"checkpoint '{directory}': {LLM_FILE} is missing (llm_reference.json says the "
                                  f"LLM weights were saved)")
        if not has_llm_file and cfg.llm.path is None and cfg.llm.load:
            log.warning("checkpoint '%s' has no %s: its tiny LLM starts from random weights", directory, LLM_FILE)
        try:
            model = cls(cfg, device)
        except ValueError as err:  # transformers refuses an LLM / tokenizer that needs its own code
            if "trust_remote_code" not in str(err):
                raise
            raise CheckpointError(f"checkpoint '{directory}': the LLM '{cfg.llm.tokenizer or cfg.llm.path}' needs "
                                  f"to run its own Python code; pass trust_remote_code=True / --trust-remote-code "
                                  f"if you trust it") from None
        except OSError as err:
            raise CheckpointError(f"checkpoint '{directory}': cannot load its LLM '{cfg.llm.path}' "
                                  f"({one_line(err)})") from None
        _load_strict(model, directory / TRAINED_FILE, skip_prefix="llm.")
        if has_llm_file and model.llm is not None:  # llm.load=false builds no LLM
            _load_strict(model.llm, directory / LLM_FILE)
            model.llm.tie_weights()
        return model if dtype is None else model.cast_for_inference(dtype)


def _llm_reference(directory: Path) -> dict:
    """``llm_reference.json`` of a checkpoint ({} when absent); unreadable JSON is a :class:`CheckpointError`."""
    path = directory / "llm_reference.json"
    if not path.is_file():
        return {}
    try:
        ref = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{path}': not JSON ({one_line(err)})") from None
    return ref if isinstance(ref, dict) else {}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``path``; a damaged file is a one-line :class:`CheckpointError` naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"'{path}': not a readable safetensors file ({one_line(err)})") from None


def _load_strict(module: nn.Module, path: Path, skip_prefix: str | None = None) -> None:
    """Load ``path`` into ``module``; every key must match in name and shape (keys under ``skip_prefix`` excepted).

    Raises :class:`CheckpointError` naming the file and the first missing / unexpected / mis-shaped keys.
    """
    state = _read_safetensors(path)
    expected = {k: v.shape for k, v in module.state_dict().items()
                if skip_prefix is None or not k.startswith(skip_prefix)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in expected
              if k in state and state[k].shape != expected[k]]
    problems = [f"{what} {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape of", shapes)) if keys]
    if problems:
        raise CheckpointError(f"'{path}' does not match the model: {'; '.join(problems)}")
    module.load_state_dict(state, strict=False)  # strict by the check above; skipped keys keep their values


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: clone tensors that alias an earlier one."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def vision_token_count(cfg: ModelConfig, n_views: int) -> int:
    """Merged vision tokens entering the fusion module for ``n_views`` views (1450 for 10 paper views)."""
    return reducers.vision_tokens(cfg, n_views)
