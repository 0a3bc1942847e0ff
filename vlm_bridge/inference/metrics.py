"""Answer metrics for ``evaluate``: exact match, ANLS (DocVQA), or a user's function.

A metric takes the generated answer and the reference answers (one or more) and returns a score in
[0, 1]; a sample's score is its best over the references.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Metric = Callable[[str, Sequence[str]], float]
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1 when the normalised answer equals a normalised reference."""
    answer = normalize_answer(prediction)
    return float(any(answer == normalize_answer(ref) for ref in references))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity, DocVQA's metric: 1 - distance / longer length
    on lower-cased, whitespace-normalised strings, 0 when that distance reaches ``threshold``."""
    answer = " ".join(prediction.lower().split())
    best = 0.0
    for ref in references:
        ref = " ".join(ref.lower().split())
        longest = max(len(answer), len(ref))
        distance = levenshtein(answer, ref) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


METRICS: dict[str, Metric] = {"exact_match": exact_match, "anls": anls}


def resolve_metric(name: str, option: str = "--metric") -> Metric:
    """A built-in metric by name, or ``module:function`` (called as ``function(answer, references)``;
    the module may also be a file in the current folder, as ``python -m`` would find it), or
    ``FILE.py:function``. ``option`` is what errors call the setting."""
    if name in METRICS:
        return METRICS[name]
    module, sep, function = name.rpartition(":")
    if not sep or not module or not function:
        raise ValueError(f"{option} {name!r}: use one of {', '.join(METRICS)}, module:function or "
                         "FILE.py:function")
    try:
        loaded = _module_from_file(module) if module.endswith(".py") else _import_from_here(module)
        metric = getattr(loaded, function)
    # SystemExit: a scoring script that parses its own arguments or exits at import (it ended the
    # command silently, or printed the script's usage)
    except (ImportError, AttributeError, TypeError, OSError, SyntaxError, SystemExit) as exc:
        raise ValueError(f"{option} {name!r}: cannot import it ({type(exc).__name__}: {exc})") from None
    if not callable(metric):
        raise ValueError(f"{option} {name!r}: {function} is a {type(metric).__name__}, not a function")
    return metric


def _import_from_here(module: str):
    """``import module`` with the current folder searched first (the ``vlm-bridge`` script's own
    ``sys.path`` does not hold it)."""
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(os.getcwd())


def check_metric(name: str, option: str = "--metric") -> Metric:
    """:func:`resolve_metric`, then one call on an answer equal to its reference, so that a metric
    that fails or returns no score in [0, 1] is named before any model loads or answer is made."""
    metric = resolve_metric(name, option)
    score_value(name, metric, "yes", ["yes"], option)
    return metric


def score_value(name: str, metric: Metric, answer: str, refs: Sequence[str],
                option: str = "--metric") -> float:
    """One metric on one answer: a number in [0, 1], else a one-line error naming the metric."""
    try:
        value = float(metric(answer, refs))
    # Any failure of user code is a usage error here; sys.exit() in a metric too (it ended the
    # command with exit 0 and nothing written).
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        raise ValueError(f"{option} {name} failed on answer {answer!r}: "
                         f"{type(exc).__name__}: {exc}") from None
    if not (0.0 <= value <= 1.0 or math.isnan(value)):  # nan: no score (the mean is reported as null)
        raise ValueError(f"{option} {name} gave {value} for answer {answer!r}; a score must be in [0, 1]")
    return value


def _module_from_file(path: str):
    """A metric module given as a file (``metrics.py:fn``), not on the import path."""
    import importlib.util

    file = Path(path).expanduser()
    spec = importlib.util.spec_from_file_location(file.stem, file)
    if spec is None or spec.loader is None or not file.is_file():
        raise ImportError(f"no such file {file}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
