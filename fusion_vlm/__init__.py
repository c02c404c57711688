"""fusion_vlm: question-fused visual-token reduction for vision-language models.

The data path, one module per step:
image -> :mod:`~fusion_vlm.views` -> :mod:`~fusion_vlm.vision` -> :mod:`~fusion_vlm.merge`
-> :mod:`~fusion_vlm.fusion` -> :mod:`~fusion_vlm.language` (projector + frozen LLM)
-> :mod:`~fusion_vlm.losses`; :mod:`~fusion_vlm.model` wires them into ``FusionVLM``.
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package must not import torch-heavy modules
    if name == "FusionVLM":
        from fusion_vlm.model import FusionVLM

        return FusionVLM
    if name in ("ModelConfig", "load_model_config"):
        from fusion_vlm import config

        return getattr(config, name)
    raise AttributeError(name)
