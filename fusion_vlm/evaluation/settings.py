"""How an evaluation is run, and the record of it (pure: no VLMEvalKit or torch import).

* :func:`reference_max_new_tokens` -- the answer-length rule of the authors'
  VLMEvalKit wrapper, by VLMEvalKit dataset ``TYPE`` and name;
* :func:`resolve_max_new_tokens` -- an explicit user value, else that rule;
* :func:`eval_setup` -- the set-up written next to every score (prompt set,
  max_new_tokens, judge, batch size, seed, N, mode, package versions).

The rule (``max_new_tokens`` per benchmark; the first matching line wins):

* TYPE ``MCQ`` or ``Y/N``: 32;
* TYPE ``Caption`` and ``COCO`` in the name: 32;
* TYPE ``VQA``: 100 with ``OCRVQA``, ``ChartQA`` or ``DocVQA`` in the name,
  10 with ``TextVQA``, else 512;
* ``seedbench`` (lower case) in the name: 3;
* anything else (other TYPEs, no dataset): 512.

Name tests are case-sensitive substring tests, as in the reference, so the
``seedbench`` line never fires for ``SEEDBench_IMG`` (an ``MCQ`` set: 32).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from fusion_vlm.errors import UsageError

# input modes of the paper's comparisons: vision + question + queries; fine-tuned without the question;
# the question dropped from the fusion input of a model trained with it (no fine-tune)
MODES = ("vqq", "vq_ft", "vq")
DEFAULT_MAX_NEW_TOKENS = 512  # the reference's generation default when no rule applies
PACKAGES = ("torch", "transformers", "fusion_vlm", "vlmeval", "open_clip")  # import names recorded
_SECRET = re.compile(r"key|token|secret|password", re.IGNORECASE)


def reference_max_new_tokens(dataset_name: str | None, dataset_type: str | None) -> int:
    """Answer length for one benchmark: the rule of the table in the module doc.

    ``dataset_type`` is VLMEvalKit's ``TYPE`` (``'MCQ'``, ``'Y/N'``, ``'VQA'``,
    ``'Caption'``, ...; compared case-insensitively); ``None`` with no name gives 512.
    """
    name = str(dataset_name or "")
    kind = str(dataset_type or "").upper()
    if kind in ("MCQ", "Y/N"):
        return 32
    if kind == "CAPTION" and "COCO" in name:
        return 32
    if kind == "VQA":
        if any(s in name for s in ("OCRVQA", "ChartQA", "DocVQA")):
            return 100
        if "TextVQA" in name:
            return 10
        return DEFAULT_MAX_NEW_TOKENS
    if "seedbench" in name:
        return 3
    return DEFAULT_MAX_NEW_TOKENS


def resolve_max_new_tokens(explicit: int | None, dataset_name: str | None = None,
                           dataset_type: str | None = None) -> int:
    """``explicit`` when given (the user's value wins), else :func:`reference_max_new_tokens`."""
    if explicit is not None:
        if int(explicit) < 1:
            raise UsageError(f"max_new_tokens={explicit}: must be >= 1")
        return int(explicit)
    return reference_max_new_tokens(dataset_name, dataset_type)


@functools.lru_cache(maxsize=1)
def _distributions() -> dict:
    return importlib.metadata.packages_distributions()


def package_version(module: str) -> str | None:
    """Installed version of the distribution that provides import name ``module``; None when absent.

    Read from the package metadata, so nothing is imported here (``import
    vlmeval`` has side effects); a distribution whose name differs from
    ``module`` is named (``0.0.20 (ms-vlmeval)``). When the module is already
    imported and its ``__version__`` extends that version with a build tag
    (``2.14.1+cu130``), the longer one is given.
    """
    loaded = getattr(sys.modules.get(module), "__version__", None)
    loaded = loaded if isinstance(loaded, str) else None
    if importlib.util.find_spec(module) is None:
        return None
    for dist in _distributions().get(module, []):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if loaded and loaded.startswith(version):
            version = loaded
        same = dist.replace("-", "_").lower() == module.lower()
        return version if same else f"{version} ({dist})"
    if loaded:
        return loaded
    if module == "fusion_vlm":  # run from a checkout without an install
        from fusion_vlm import __version__

        return __version__
    return "unknown"


def package_versions(modules=PACKAGES) -> dict[str, str | None]:
    """``{import name: version or None}`` for the packages that decide an evaluation's numbers."""
    return {m: package_version(m) for m in modules}


def redact(kwargs: Mapping | None) -> dict:
    """A copy of judge kwargs with the values of key/token/secret/password entries hidden."""
    return {k: ("<redacted>" if _SECRET.search(str(k)) else v) for k, v in (kwargs or {}).items()}


def eval_setup(*, mode: str, n_queries: int | None, dataset: str | None, dataset_type: str | None,
               prompt_set: str, max_new_tokens: int | None, judge: str | None, judge_kwargs: Mapping | None = None,
               batch_size: int, seed: int | None, do_sample: bool = False, checkpoint: str | None = None,
               **extra) -> dict:
    """The set-up record of one evaluation (a plain JSON-able dict).

    ``max_new_tokens`` is the user's explicit value or None; the record holds the
    value used for ``dataset`` and where it came from (``"user"`` or ``"reference rule"``).
    """
    used = resolve_max_new_tokens(max_new_tokens, dataset, dataset_type)
    return {
        "mode": mode, "n_queries": n_queries, "checkpoint": checkpoint,
        "dataset": dataset, "dataset_type": dataset_type,
        "prompt_set": prompt_set,
        "max_new_tokens": used, "max_new_tokens_source": "user" if max_new_tokens is not None else "reference rule",
        "judge": judge, "judge_kwargs": redact(judge_kwargs),
        "batch_size": batch_size, "seed": seed, "do_sample": bool(do_sample),
        **extra,
        "packages": package_versions(),
    }


@dataclass
class EvalResult:
    """Scores of one evaluation (``{"<metric>@<benchmark>": score}``), its :func:`eval_setup` record and its
    per-item records (:mod:`fusion_vlm.evaluation.items`; empty when not kept)."""

    metrics: dict[str, float]
    setup: dict = field(default_factory=dict)
    items: list = field(default_factory=list)
