"""Scoring a generated short answer against the gold answer and its aliases."""

from __future__ import annotations

import importlib
import re
import string
from collections.abc import Callable

from quantgate.errors import UserError

Scorer = Callable[[str, object], float]  # (prediction, item) -> score in [0, 1]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (the usual
    normalisation for short-answer QA such as TriviaQA and SQuAD)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def exact_match(prediction: str, answers: tuple[str, ...]) -> float:
    p = normalize(first_line(prediction))
    return float(any(p == normalize(a) for a in answers))


def contains(prediction: str, answers: tuple[str, ...]) -> float:
    p = f" {normalize(first_line(prediction))} "
    return float(any(f" {normalize(a)} " in p for a in answers if normalize(a)))


def load_scorer(ref: str) -> Scorer:
    """Import a user scorer given as 'module:function'."""
    module_name, _, func_name = ref.partition(":")
    if not module_name or not func_name:
        raise UserError(f"scorer '{ref}': expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"scorer '{ref}': cannot import {module_name}: {e}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"scorer '{ref}': {module_name} has no function {func_name}")
    return func


def score_generation(prediction: str, item, match: str, scorer: Scorer | None) -> float:
    """Score in [0, 1]; a user scorer's value outside that range is an error."""
    if scorer is None:
        return exact_match(prediction, item.answers) if match == "exact" else contains(prediction, item.answers)
    value = float(scorer(prediction, item))
    if not 0.0 <= value <= 1.0:
        raise UserError(f"scorer returned {value} for item '{item.id}': scores must be in [0, 1]")
    return value
