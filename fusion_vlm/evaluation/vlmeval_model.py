"""FusionVLM as a VLMEvalKit model (a ``vlmeval.vlm.base.BaseModel`` subclass).

VLMEvalKit is imported only when :func:`model_class` is first called (through
:func:`fusion_vlm.evaluation.vlmeval_import.import_vlmeval`, which undoes its
process-wide SSL change), so ``import fusion_vlm.evaluation`` never needs it.
The prompt and message logic is the pure code of :mod:`.prompts` and
:mod:`.messages`; this class only plugs it into VLMEvalKit's hooks:

* ``use_custom_prompt`` / ``build_prompt``: with ``prompt_set='vlmeval'`` (the
  default) never custom, so VLMEvalKit's own ``dataset.build_prompt`` is used;
  with ``'llava'`` every image benchmark of kind yorn, mcq, vqa or caption gets
  the LLaVA-style prompt (:func:`prompts.build_prompt`);
* ``generate_inner``: one message -> one answer;
* ``generate_batch``: several messages -> answers in one batched ``FusionVLM.generate``
  call (used by :func:`registry.run_eval` to prefill VLMEvalKit's resume file).

Answers are ``max_new_tokens`` long when it is given, else as long as the
reference rule says for the dataset (:func:`settings.reference_max_new_tokens`).
"""

from __future__ import annotations

from fusion_vlm.evaluation import prompts
from fusion_vlm.evaluation.messages import messages_to_batch
from fusion_vlm.evaluation.runner import GenerationSettings, Runner

_CLASS = None


class FusionVLMEvalMixin:
    """Everything of the VLMEvalKit model except the base class (testable without vlmeval)."""

    INTERLEAVE = False
    allowed_types = ["text", "image"]

    def _setup(self, checkpoint, n_queries=None, n_queries_later=None, use_question=True, max_new_tokens=None,
               do_sample=False, batch_size=8, device="cpu", multi_image="concat", model=None,
               prompt_set=prompts.DEFAULT_PROMPT_SET, seed=0, trust_remote_code=False):
        self.prompt_set = prompts.check_prompt_set(prompt_set)
        settings = GenerationSettings(n_queries=n_queries, n_queries_later=n_queries_later,
                                      use_question=use_question, max_new_tokens=max_new_tokens,
                                      do_sample=do_sample, batch_size=batch_size, seed=seed)
        self.runner = Runner(checkpoint, settings, device=device, model=model, trust_remote_code=trust_remote_code)
        self.multi_image = multi_image
        self.dataset_types: dict[str, str] = {}  # dataset name -> VLMEvalKit TYPE, filled by run_eval

    # -------------------------------------------------------------- prompts
    def _dataset_type(self, dataset):
        if dataset in self.dataset_types:
            return self.dataset_types[dataset]
        from vlmeval.dataset import DATASET_MODALITY, DATASET_TYPE

        if DATASET_MODALITY(dataset) != "IMAGE":
            return None
        return DATASET_TYPE(dataset)

    def use_custom_prompt(self, dataset):
        if dataset is None or self.prompt_set == "vlmeval":
            return False
        t = self._dataset_type(dataset)
        return t is not None and (t in ("Y/N", "VQA", "Caption") or str(t).startswith("MCQ"))

    def build_prompt(self, line, dataset=None):
        kind = prompts.record_kind(prompts.dataset_kind(self._dataset_type(dataset), dataset), line)
        paths = self.dump_image(line, dataset)
        if isinstance(paths, str):
            paths = [paths]
        text = prompts.build_prompt(kind, line)
        return [dict(type="image", value=p) for p in paths] + [dict(type="text", value=text)]

    # -------------------------------------------------------------- generation
    def generate_inner(self, message, dataset=None):
        return self.generate_batch([message], dataset)[0]

    def max_new_tokens_for(self, dataset=None) -> int:
        """Tokens per answer on ``dataset``: the explicit setting, else the reference rule for its TYPE."""
        dtype = self._dataset_type(dataset) if dataset is not None else None
        return self.runner.max_new_tokens_for(dataset, dtype)

    def generate_batch(self, messages, dataset=None):
        """Answers to several VLMEvalKit messages, generated in batches of ``batch_size`` images."""
        images, questions = messages_to_batch(messages, self.multi_image)
        dtype = self._dataset_type(dataset) if dataset is not None else None
        return [answers[0] for answers in self.runner.answer(images, questions, dataset, dtype)]


def model_class():
    """The ``BaseModel`` subclass ``FusionVLMEval`` (imports VLMEvalKit on first use)."""
    global _CLASS
    if _CLASS is None:
        from fusion_vlm.evaluation.vlmeval_import import import_vlmeval

        import_vlmeval()
        from vlmeval.vlm.base import BaseModel

        class FusionVLMEval(FusionVLMEvalMixin, BaseModel):
            """FusionVLM checkpoint run with N queries, question fused or not (see module doc)."""

            def __init__(self, checkpoint, **kwargs):
                BaseModel.__init__(self)
                self._setup(checkpoint, **kwargs)

        _CLASS = FusionVLMEval
    return _CLASS
