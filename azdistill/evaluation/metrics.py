"""Answer parsing and reference-based metrics for comparing a student with its teacher.

Everything here is a pure function of strings and numbers, so evaluation results can be recomputed
from saved predictions without loading a model.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import numpy as np

from azdistill.data.answers import format_number as _format_number
from azdistill.data.answers import parse_label, parse_number

# sacrebleu, rouge_score (which pulls in nltk and scipy: seconds) and numpy load on first use, so that the answer
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


def normalize_text(text: str) -> str:
    """Normalise an answer the SQuAD way: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


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
    return bleu_from_statistics(bleu_statistics(predictions, references))


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


def mean_score(values: "np.ndarray") -> float:
    """The mean of per-item scores; 0.0 over no items (agreement where the teacher committed to no answer)."""
    import numpy as np

    return float(np.mean(values)) if len(values) else 0.0


def bleu_from_statistics(rows: "np.ndarray") -> float:
    """Corpus BLEU (0-100) from per-item n-gram statistics (rows as `bleu_statistics` gives them): summed over
    the items, then scored as `sacrebleu.corpus_bleu` scores a corpus (exponential smoothing)."""
    import numpy as np
    from sacrebleu.metrics.bleu import BLEU

    totals = [int(total) for total in np.asarray(rows, dtype=np.int64).reshape(-1, _BLEU_STATISTICS).sum(axis=0)]
    score = BLEU.compute_bleu(
        correct=totals[2 : 2 + _BLEU_ORDER], total=totals[2 + _BLEU_ORDER :], sys_len=totals[0], ref_len=totals[1],
        smooth_method="exp",
    ).score
    # Floating-point error can put a perfect score a hair above 100.
    return float(min(max(score, 0.0), 100.0))


_BLEU_ORDER = 4
_BLEU_STATISTICS = 2 + 2 * _BLEU_ORDER  # hypothesis length, reference length, matched and total n-grams per order


def bleu_statistics(predictions: Sequence[str], references: Sequence[str]) -> "np.ndarray":
    """Each prediction's BLEU sufficient statistics against its reference, one row per item: hypothesis length,
    reference length, then matched and total n-grams for n = 1..4. Corpus BLEU is a function of their sum, so any
    selection of items (a bootstrap resample) is scored without tokenizing again."""
    import numpy as np
    from sacrebleu.metrics.bleu import BLEU

    # The per-segment statistics sacrebleu's own paired tests use; the settings are those of `sacrebleu.corpus_bleu`.
    rows = BLEU(smooth_method="exp")._extract_corpus_statistics(list(predictions), [list(references)])
    return np.asarray(rows, dtype=np.int64).reshape(-1, _BLEU_STATISTICS)


@dataclass(frozen=True, eq=False)
class ItemScores:
    """One metric of one model, held-out item by held-out item: what a bootstrap resamples and a paired test swaps.

    `values` has one row per item the metric counts (a score, or BLEU's n-gram statistics), in held-out order, so
    two models' rows for one metric are the same items; `aggregate` turns any selection of rows into the metric,
    exactly as `score_predictions` reports it.
    """

    values: "np.ndarray"
    aggregate: Callable[["np.ndarray"], float]

    @property
    def value(self) -> float:
        """The metric over all the items."""
        return self.aggregate(self.values)

    def __len__(self) -> int:
        return len(self.values)


def _per_item(scores: Sequence[float]) -> ItemScores:
    import numpy as np

    return ItemScores(np.asarray(scores, dtype=float), mean_score)


def _check_scoring_inputs(
    task_type: str,
    predictions: Sequence[str],
    references: Sequence[str | None],
    teacher_answers: Sequence[str] | None,
    labels: Sequence[str] | None,
) -> None:
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
      agree with, and its own "parse_rate" in the report shows how often that happened. For qa the mean token F1
      against the teacher's answer; for the other free-form tasks the mean ROUGE-L F against it. A missing (None)
      teacher answer counts as disagreement.
    - "parse_rate" for nli and math: the share of predictions whose `answer_key` is not None.

    Each is the aggregate of `item_scores`, so intervals and paired tests resample the very items counted here.
    Raises ValueError for an unknown task type, sequences of different lengths, no predictions, or an
    nli task without labels.
    """
    scores = item_scores(task_type, predictions, references, teacher_answers, labels)
    return {name: items.value for name, items in scores.items()}


def item_scores(
    task_type: str,
    predictions: Sequence[str],
    references: Sequence[str | None],
    teacher_answers: Sequence[str] | None,
    labels: Sequence[str] | None = None,
) -> dict[str, ItemScores]:
    """Every metric `score_predictions` reports, item by item (see `ItemScores`), over the same items it counts:
    the referenced ones for the task's metrics, those the teacher committed on for nli and math agreement, every
    item for parse rate and free-form agreement. Raises ValueError as `score_predictions` does."""
    _check_scoring_inputs(task_type, predictions, references, teacher_answers, labels)
    if task_type in ("nli", "math"):
        return _label_item_scores(task_type, predictions, references, teacher_answers, labels)
    return _free_form_item_scores(task_type, predictions, references, teacher_answers)


def _agrees(key: str | None, other: str | None) -> bool:
    # An unreadable answer never matches, not even another unreadable one.
    return key is not None and other is not None and key == other


def _label_item_scores(
    task_type: str,
    predictions: Sequence[str],
    references: Sequence[str | None],
    teacher_answers: Sequence[str] | None,
    labels: Sequence[str] | None,
) -> dict[str, ItemScores]:
    """Accuracy, agreement and parse rate of an nli or math task, as 0/1 per item."""
    keys = [answer_key(task_type, p, labels) for p in predictions]
    scores: dict[str, ItemScores] = {}
    if any(reference is not None for reference in references):
        scores["accuracy"] = _per_item(
            [_agrees(key, answer_key(task_type, ref, labels)) for key, ref in zip(keys, references) if ref is not None]
        )
    if teacher_answers is not None:
        teacher_keys = [None if teacher is None else answer_key(task_type, teacher, labels) for teacher in teacher_answers]
        scores["agreement"] = _per_item(
            [_agrees(key, teacher_key) for key, teacher_key in zip(keys, teacher_keys) if teacher_key is not None]
        )
    scores["parse_rate"] = _per_item([key is not None for key in keys])
    return scores


def _free_form_item_scores(
    task_type: str,
    predictions: Sequence[str],
    references: Sequence[str | None],
    teacher_answers: Sequence[str] | None,
) -> dict[str, ItemScores]:
    """The reference metrics of a qa or free-form task (BLEU as n-gram statistics), and agreement with the teacher."""
    scores: dict[str, ItemScores] = {}
    referenced = [(p, r) for p, r in zip(predictions, references) if r is not None]
    if referenced:
        per_pair = {"token_f1": token_f1, "exact_match": exact_match, "rouge_l": _rouge_l_one}
        for name in TASK_METRICS[task_type]:
            if name == "bleu":
                statistics = bleu_statistics([p for p, _ in referenced], [r for _, r in referenced])
                scores[name] = ItemScores(statistics, bleu_from_statistics)
            else:
                scores[name] = _per_item([per_pair[name](p, r) for p, r in referenced])
    if teacher_answers is not None:
        similarity = token_f1 if task_type == "qa" else _rouge_l_one
        scores["agreement"] = _per_item(
            [0.0 if teacher is None else similarity(p, teacher) for p, teacher in zip(predictions, teacher_answers)]
        )
    return scores
