"""Training: LLaVA-format data, the three paper stages on DeepSpeed, checkpoints, metrics, memory plan.

Entry points: :func:`fusion_vlm.training.loop.train` (a :class:`~fusion_vlm.training.config.TrainConfig`
in, a :class:`~fusion_vlm.training.loop.TrainResult` out), ``fusion-vlm train`` and ``train/train.py``.
Importing this package is cheap: DeepSpeed and the model are imported when training starts.
"""
