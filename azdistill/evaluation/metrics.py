"""Answer parsing and reference-based metrics for comparing a student with its teacher.

Everything here is a pure function of strings and numbers, so evaluation results can be recomputed
from saved predictions without loading a model.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from functools import lru_cache
from typing import Sequence

# sacrebleu and rouge_score (which pulls in nltk and scipy: seconds) load on first use, so that the answer
# parsers below cost nothing to import for the synthesize stage.

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "nli": ("accuracy",),
    "math": ("accuracy",),
    "qa": ("token_f1", "exact_match"),
    "summarization": ("rouge_l", "bleu"),
    "conversation": ("rouge_l", "bleu"),
    "chat": ("rouge_l", "bleu"),
}
"""Reference-based metrics each task reports; the first is the task's primary metric."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# Spaces, hyphens and underscores inside a label are interchangeable, so "not_entailment" (as GLUE
# spells it) is found in "not entailment" and "not-entailment".
_LABEL_SEPARATOR = r"[\s_\-]+"
# A hyphen counts as part of a word at a label's edges: "non-negative" must not name "negative".
_WORD_BEFORE = r"(?<![\w\-])"
_WORD_AFTER = r"(?![\w\-])"

_ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
# A minus sign only makes a number negative when it is not a subtraction ("10-3", "(4)-1"); the
# thousands-separated form comes first so "1,250" is one number rather than 1 and 250.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w)\]])[-\u2212])?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)


def normalize_text(text: str) -> str:
    """Normalise an answer the SQuAD way: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _label_pattern(label: str) -> re.Pattern[str] | None:
    parts = [re.escape(part) for part in re.split(_LABEL_SEPARATOR, label.strip()) if part]
    if not parts:
        return None
    return re.compile(_WORD_BEFORE + _LABEL_SEPARATOR.join(parts) + _WORD_AFTER, re.IGNORECASE)


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """Return the one label that a free-form answer names, spelled as in `labels`, else None.

    Matching is case-insensitive and on whole words, so "Answer: Positive!" names "positive" but
    "negatively" does not name "negative". A longer label wins over a shorter one it contains: with
    labels "entailment" and "not entailment", the text "not entailment" names only the latter. An
    answer that names no label, or several different ones, returns None so that hedged answers never
    count as correct.
    """
    # Longest labels claim their spans first; a shorter label found inside a claimed span is part of
    # the longer one, not a second answer.
    order = sorted(range(len(labels)), key=lambda i: len(labels[i].strip()), reverse=True)
    claimed: list[tuple[int, int]] = []
    named: set[int] = set()
    for index in order:
        pattern = _label_pattern(labels[index])
        if pattern is None:
            continue
        for match in pattern.finditer(text):
            start, end = match.span()
            if any(start < c_end and c_start < end for c_start, c_end in claimed):
                continue
            claimed.append((start, end))
            named.add(index)
    distinct = {labels[i].strip().lower() for i in named}
    if len(distinct) != 1:
        return None
    return labels[min(named)]


def _to_float(match: re.Match[str]) -> float:
    value = float(match.group("digits").replace(",", ""))
    return -value if match.group("sign") else value


def parse_number(text: str) -> float | None:
    """Return the final numeric answer of a math response, or None if it contains no number.

    The first number after the last "Answer:" (any case) is preferred; without one, the last number
    in the text is used, so "3 + 4 = 7 apples." gives 7. Negative numbers, decimals, thousands
    separators ("1,250") and surrounding units or currency signs ("$12.50") are handled. A number too
    large to represent as a finite float counts as no number.
    """
    markers = list(_ANSWER_MARKER.finditer(text))
    match = _NUMBER.search(text, markers[-1].end()) if markers else None
    if match is None:
        numbers = list(_NUMBER.finditer(text))
        if not numbers:
            return None
        match = numbers[-1]
    value = _to_float(match)
    return value if math.isfinite(value) else None


def _format_number(value: float) -> str:
    # Integers are written without ".0" so "7", "7.0" and "7.00" all give the same key.
    if value.is_integer():
        return str(int(value))
    return repr(value)


def answer_key(task_type: str, text: str, labels: Sequence[str] | None = None) -> str | None:
    """Return the canonical answer used for accuracy and for agreement between two models.

    nli: the label named (see `parse_label`); math: the final number written canonically ("7", "2.5");
    any other task: the normalised text. None means the answer could not be read.
    """
    if task_type == "nli":
        if not labels:
            raise ValueError("answer_key for task type nli needs the task's labels")
        return parse_label(text, labels)
    if task_type == "math":
        value = parse_number(text)
        return None if value is None else _format_number(value)
    return normalize_text(text) or None


def exact_match(prediction: str, reference: str) -> float:
    """Return 1.0 if prediction and reference are equal after `normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Return the SQuAD token-overlap F1 of two answers after `normalize_text`.

    Two empty answers agree (1.0); an empty answer against a non-empty one scores 0.0.
    """
    predicted = normalize_text(prediction).split()
    expected = normalize_text(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted)
    recall = common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _check_pair(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Return corpus BLEU (0-100) of predictions against one reference each, via sacrebleu.

    Like any corpus BLEU, it is 0 when no 4-gram matches, which includes corpora of very short texts.
    """
    _check_pair(predictions, references)
    import sacrebleu

    score = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    # Floating-point error can put a perfect score a hair above 100.
    return float(min(max(score, 0.0), 100.0))


@lru_cache(maxsize=1)
def _rouge_scorer() -> "rouge_scorer.RougeScorer":  # noqa: F821 - imported here, on first use
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _rouge_l_one(prediction: str, reference: str) -> float:
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Return the mean ROUGE-L F-measure (0-1) over prediction/reference pairs, with stemming."""
    _check_pair(predictions, references)
    return sum(_rouge_l_one(p, r) for p, r in zip(predictions, references)) / len(predictions)


def percentile(values: Sequence[float], q: float) -> float:
    """Return the q-th percentile (q in [0, 100]) by linear interpolation, as numpy does by default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(float(v) for v in values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def score_predictions(
    task_type: str,
    predictions: Sequence[str],
    references: Sequence[str | None],
    teacher_answers: Sequence[str] | None,
    labels: Sequence[str] | None = None,
) -> dict[str, float]:
    """Return one model's metrics on the held-out set as a flat dict of floats.

    - The task's `TASK_METRICS`, over the items that have a reference (absent if none has one).
      "accuracy" is the share of those items whose `answer_key` equals the reference's.
    - "agreement" with the teacher (absent if `teacher_answers` is None): for nli and math the share of
      the items the teacher answered with a label or number (its `answer_key` is not None) whose
      `answer_key` the prediction matches; where the teacher committed to no answer there is nothing to
      agree with, and its own "parse_rate" in the report shows how often that happened. For qa the mean token F1 against the teacher's
      answer; for the other free-form tasks the mean ROUGE-L F against it. A missing (None) teacher
      answer counts as disagreement.
    - "parse_rate" for nli and math: the share of predictions whose `answer_key` is not None.

    Raises ValueError for an unknown task type, sequences of different lengths, no predictions, or an
    nli task without labels.
    """
    if task_type not in TASK_METRICS:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {', '.join(TASK_METRICS)}")
    if len(references) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if teacher_answers is not None and len(teacher_answers) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(teacher_answers)} teacher answers")
    if not predictions:
        raise ValueError("no predictions to score")
    if task_type == "nli" and not labels:
        raise ValueError("task type nli needs its labels to score predictions")

    metrics: dict[str, float] = {}
    referenced = [(p, r) for p, r in zip(predictions, references) if r is not None]
    labelled = task_type in ("nli", "math")

    if labelled:
        keys = [answer_key(task_type, p, labels) for p in predictions]

        def agrees(key: str | None, other: str | None) -> bool:
            return key is not None and other is not None and key == other

        if referenced:
            hits = [
                agrees(key, answer_key(task_type, ref, labels))
                for key, ref in zip(keys, references)
                if ref is not None
            ]
            metrics["accuracy"] = _mean(hits)
        if teacher_answers is not None:
            teacher_keys = [None if teacher is None else answer_key(task_type, teacher, labels) for teacher in teacher_answers]
            decided = [(key, teacher_key) for key, teacher_key in zip(keys, teacher_keys) if teacher_key is not None]
            metrics["agreement"] = _mean([agrees(key, teacher_key) for key, teacher_key in decided]) if decided else 0.0
        metrics["parse_rate"] = _mean([key is not None for key in keys])
        return metrics

    if referenced:
        preds = [p for p, _ in referenced]
        refs = [r for _, r in referenced]
        for name in TASK_METRICS[task_type]:
            if name == "token_f1":
                metrics[name] = _mean([token_f1(p, r) for p, r in referenced])
            elif name == "exact_match":
                metrics[name] = _mean([exact_match(p, r) for p, r in referenced])
            elif name == "rouge_l":
                metrics[name] = rouge_l(preds, refs)
            elif name == "bleu":
                metrics[name] = bleu(preds, refs)
    if teacher_answers is not None:
        similarity = token_f1 if task_type == "qa" else _rouge_l_one
        metrics["agreement"] = _mean(
            [0.0 if teacher is None else similarity(p, teacher) for p, teacher in zip(predictions, teacher_answers)]
        )
    return metrics
