"""Evaluation prompts: the prompt sets and the LLaVA-style templates (pure: no VLMEvalKit import).

Two prompt sets (:data:`PROMPT_SETS`):

* ``vlmeval`` (the default, as in the authors' evaluation): VLMEvalKit's own
  ``dataset.build_prompt`` for every benchmark, no suffix added by us -- e.g.
  ``[Hint: ..\n]Question: ..\nOptions:\nA. ..\nPlease select the correct
  answer from the options above.`` for multiple choice, the bare question for
  yes/no, the question plus VLMEvalKit's short-answer line for its VQA sets;
* ``llava``: the LLaVA-1.5 evaluation suffixes below (one template per
  benchmark kind), which ask for a bare ``Yes``/``No``, option letter or
  short phrase.

The paper (Appendix F) shows two free-form prompts verbatim, kept here as
:data:`DESCRIBE_PROMPT` and :data:`READ_TEXT_PROMPT`. The ``llava`` templates:

    yorn:    "<question>\nPlease answer yes or no."
    mcq:     "[Hint: <hint>\n]<question>\nA. <opt>\nB. <opt>...\n"
             "Answer with the option's letter from the given choices directly."
    vqa:     "<question>\nAnswer the question using a single word or phrase."
    caption: the benchmark's own question, else DESCRIBE_PROMPT.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping

from fusion_vlm.errors import DataError, UsageError

DESCRIBE_PROMPT = "Please describe the image in full detail."  # Appendix F, demonstration 1
READ_TEXT_PROMPT = "Please read all text from the image."  # Appendix F, demonstration 2
YORN_SUFFIX = "Please answer yes or no."
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
VQA_SUFFIX = "Answer the question using a single word or phrase."

KINDS = ("yorn", "mcq", "vqa", "caption")
PROMPT_SETS = ("vlmeval", "llava")  # VLMEvalKit's dataset prompts | LLaVA-1.5 suffixes
DEFAULT_PROMPT_SET = "vlmeval"


def check_prompt_set(name: str) -> str:
    """``name`` if it is one of :data:`PROMPT_SETS`, else a one-line ``UsageError`` (a ``ValueError``)."""
    if name not in PROMPT_SETS:
        raise UsageError(f"prompt set {name!r}: expected one of {', '.join(PROMPT_SETS)}")
    return name


# The 15 benchmarks of the paper (DESIGN.md section 5) by kind, for use when no
# VLMEvalKit dataset object (and so no TYPE) is at hand.
PAPER_BENCHMARKS: dict[str, str] = {
    "MME": "yorn", "HallusionBench": "yorn", "POPE": "yorn",
    "OCRBench": "vqa", "OCRVQA_TESTCORE": "vqa", "ChartQA_TEST": "vqa", "TextVQA_VAL": "vqa",
    "COCO_VAL": "caption",
    "RealWorldQA": "mcq", "MMStar": "mcq", "SEEDBench_IMG": "mcq", "SEEDBench2": "mcq",
    "SEEDBench2_Plus": "mcq", "ScienceQA_TEST": "mcq", "AI2D_TEST": "mcq",
}

_TYPE_TO_KIND = {"Y/N": "yorn", "MCQ": "mcq", "VQA": "vqa", "CAPTION": "caption"}


def dataset_kind(dataset_type: str | None = None, dataset_name: str | None = None) -> str:
    """Map a VLMEvalKit dataset ``TYPE`` (or, failing that, a benchmark name) to a prompt kind.

    ``Y/N`` -> yorn, ``MCQ*`` -> mcq, ``Caption`` -> caption, ``VQA`` and anything
    else -> vqa (free-form short answer).
    """
    if dataset_type:
        t = str(dataset_type).upper()
        if t in _TYPE_TO_KIND:
            return _TYPE_TO_KIND[t]
        if t.startswith("MCQ"):
            return "mcq"
        return "vqa"
    if dataset_name in PAPER_BENCHMARKS:
        return PAPER_BENCHMARKS[dataset_name]
    return "vqa"


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip() != "" and str(value).strip().lower() != "nan"


def options_of(record: Mapping) -> dict[str, str]:
    """The lettered options of a multiple-choice record, in letter order, skipping empty ones."""
    out = {}
    for letter in string.ascii_uppercase:
        if letter in record and _present(record[letter]):
            out[letter] = str(record[letter]).strip()
    return out


def mcq_prompt(question: str, options: Mapping[str, str], hint: str | None = None) -> str:
    """A multiple-choice prompt: optional hint, the question, one ``X. text`` line per option, the suffix."""
    if not options:
        raise DataError(f"multiple-choice question has no options: {question[:60]!r}")
    lines = []
    if _present(hint):
        lines.append(f"Hint: {str(hint).strip()}")
    lines.append(question.strip())
    lines += [f"{k}. {v}" for k, v in options.items()]
    lines.append(MCQ_SUFFIX)
    return "\n".join(lines)


def yorn_prompt(question: str) -> str:
    """A yes/no prompt; the suffix is not repeated when the question already asks for yes or no."""
    q = question.strip()
    if "yes or no" in q.lower():
        return q
    return f"{q}\n{YORN_SUFFIX}"


def vqa_prompt(question: str) -> str:
    """A short-answer prompt."""
    return f"{question.strip()}\n{VQA_SUFFIX}"


def caption_prompt(question: str | None = None) -> str:
    """A captioning prompt: the benchmark's own instruction if it has one, else :data:`DESCRIBE_PROMPT`."""
    return question.strip() if _present(question) else DESCRIBE_PROMPT


def record_kind(kind: str, record: Mapping) -> str:
    """The kind actually used for a record: ``mcq`` without lettered options falls back to ``vqa``.

    (VLMEvalKit calls every unknown dataset name ``MCQ``, even an open-ended one.)
    """
    return "vqa" if kind == "mcq" and not options_of(record) else kind


def build_prompt(kind: str, record: Mapping) -> str:
    """The text prompt for one benchmark record (a TSV row as a mapping) of a given kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {', '.join(KINDS)}")
    question = record.get("question")
    if kind == "caption":
        return caption_prompt(question)
    if not _present(question):
        raise DataError(f"benchmark record {record.get('index', '?')!r} has no question")
    question = str(question)
    if kind == "yorn":
        return yorn_prompt(question)
    if kind == "mcq":
        return mcq_prompt(question, options_of(record), record.get("hint"))
    return vqa_prompt(question)
