"""The one place that imports VLMEvalKit (package ``vlmeval``), on demand.

:mod:`.registry` and :mod:`.vlmeval_model` both call :func:`import_vlmeval`;
keeping it here lets each of them depend on it without depending on the other.
"""

from __future__ import annotations

import ssl

INSTALL_HINT = "install the eval extra: bash scripts/install_eval.sh (see docs/evaluation.md)"


def import_vlmeval():
    """Import ``vlmeval`` and put back the default SSL context it replaces process-wide; returns the module.

    Raises ``ImportError`` (one line, with :data:`INSTALL_HINT`) when VLMEvalKit is not installed.
    """
    saved = ssl._create_default_https_context
    try:
        import vlmeval
        import vlmeval.config  # noqa: F401
        import vlmeval.dataset  # noqa: F401
        import vlmeval.inference  # noqa: F401
    except ImportError as err:
        raise ImportError(f"VLMEvalKit (package vlmeval) is not importable ({err}); {INSTALL_HINT}") from err
    finally:
        ssl._create_default_https_context = saved
    return vlmeval
