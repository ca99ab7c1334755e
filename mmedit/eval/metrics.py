"""Evaluation metrics, as MLLMU-Bench computes them. Pure functions: no model, no files.

Per question: `rouge_l` (generation), `cloze_correct` (cloze), `choice_from_logliks` / `parse_choice`
(multiple choice). Per set: `aggregate` turns per-question `Score`s into the report table
{split: {form: {metric: mean}}}. Between models: `forgetting_rate` and `retention`.
All scores are fractions in [0, 1].
"""
from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from mmedit.data.mllmu import FORMS, LETTERS  # MLLMU-Bench's form names and option letters
from mmedit.errors import MmeditError

METRICS = ("choice_acc", "rougeL", "cloze_acc")
# MLLMU-Bench cuts a decoded generation after these prompt markers before reading the answer
_ANSWER_MARKERS = ("ASSISTANT:", "Answer:")


@dataclass(frozen=True)
class Score:
    """One question's result: which split and form it belongs to, which metric, and its value."""
    split: str
    form: str  # one of FORMS
    metric: str  # one of METRICS, or any other name
    value: float


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # stemming as in MLLMU-Bench


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F1 of `prediction` against `reference` (rouge-score, Porter stemming)."""
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, runs of whitespace to one space."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def cloze_correct(answer: str, generation: str) -> bool:
    """Whether the answer occurs in the generation, after `normalise` on both.

    MLLMU-Bench tests `answer.lower() in generation.lower()`; normalising also forgives punctuation and
    spacing ("New-York" vs "new york", "Oslo ." vs "Oslo."). Like MLLMU it matches substrings, so "cat"
    counts as found in "category".
    """
    wanted, text = normalise(answer), normalise(generation)
    if not wanted:  # an answer made only of punctuation: compare as MLLMU does
        wanted, text = answer.lower().strip(), generation.lower()
    return bool(wanted) and wanted in text


def choice_from_logliks(logliks: Sequence[float]) -> int:
    """Index of the option the model finds most likely (ties: the first)."""
    if len(logliks) == 0:
        raise MmeditError("no option log-likelihoods to choose from")
    if any(math.isnan(value) for value in logliks):
        raise MmeditError(f"option log-likelihoods contain NaN: {list(logliks)}")
    return max(range(len(logliks)), key=lambda index: logliks[index])


def parse_choice(generation: str, n_options: int = 4) -> int | None:
    """Option index of the letter a model answered, as MLLMU-Bench reads it; None if there is none.

    MLLMU takes the text after "ASSISTANT:" or "Answer:" and reads its first character as the letter.
    We do the same, but also step over opening brackets and quotes, so "(B)" reads as B.
    """
    for marker in _ANSWER_MARKERS:
        if marker in generation:
            generation = generation.split(marker)[1]
            break
    first = generation.strip().lstrip("([{\"'*").strip()[:1].upper()
    letters = LETTERS[:n_options]
    return letters.index(first) if first and first in letters else None


def forgetting_rate(base: float, edited: float) -> float | None:
    """1 - edited/base on a forget set: 1 = all forgotten, 0 = nothing. None when the base scored 0."""
    return None if base == 0 else 1.0 - edited / base


def retention(base: float, edited: float) -> float | None:
    """edited/base on a retain set: 1 = all kept. None when the base scored 0 (nothing to keep)."""
    return None if base == 0 else edited / base


def aggregate(scores: Iterable[Score]) -> dict[str, dict[str, dict[str, float]]]:
    """Per-question scores -> {split: {form: {metric: mean}}}, keys in order of first appearance."""
    totals: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for score in scores:
        total = totals[(score.split, score.form, score.metric)]
        total[0] += float(score.value)
        total[1] += 1
    table: dict[str, dict[str, dict[str, float]]] = {}
    for (split, form, metric), (value_sum, count) in totals.items():
        table.setdefault(split, {}).setdefault(form, {})[metric] = value_sum / count
    return table
