"""Evaluation: VLMEvalKit integration, N-sweeps over the three input modes, plain inference.

Pure modules (no VLMEvalKit import): :mod:`.prompts` (prompt per benchmark kind),
:mod:`.messages` (VLMEvalKit message -> image + question), :mod:`.results`
(VLMEvalKit scores -> paper metric names), :mod:`.settings` (answer length per
benchmark, the recorded set-up), :mod:`.sweep` (cells, resume, tidy CSV),
:mod:`.runner` (checkpoint inference). VLMEvalKit is imported lazily by
:mod:`.vlmeval_import` (used by :mod:`.registry` and :mod:`.vlmeval_model`) only.
"""
