"""Tests for azdistill.evaluation.metrics: answer parsing, reference metrics and per-task scoring."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from azdistill.config.sections import TASK_TYPES
from azdistill.evaluation.metrics import (
    TASK_METRICS,
    answer_key,
    bleu,
    exact_match,
    item_scores,
    normalize_text,
    parse_label,
    parse_number,
    percentile,
    rouge_l,
    score_predictions,
    token_f1,
)

NLI_LABELS = ["entailment", "neutral", "contradiction"]
SENTIMENT = ["positive", "negative"]


# --- normalize_text ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat, sat!", "cat sat"),
        ("  a   an the  ", ""),
        ("An apple a day", "apple day"),
        ("theory thereby", "theory thereby"),  # articles only as whole words
        ("Hello,\n\tWORLD...", "hello world"),
        ("", ""),
        ("it's 3.5%", "its 35"),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


# --- parse_label ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Positive!", "positive"),
        ("The review is negative.", "negative"),
        ("NEGATIVE", "negative"),
        ("answer: Positive", "positive"),
        ("positive, clearly positive", "positive"),  # the same label twice is not ambiguous
        ("positive or negative", None),  # several labels: ambiguous
        ("I cannot tell.", None),
        ("", None),
        ("negatively", None),  # whole words only
        ("It was unpositive", None),
        ("non-negative", None),  # a hyphenated word is not the label
        ("(negative)", "negative"),
        ('"positive"', "positive"),
    ],
)
def test_parse_label_sentiment(text, expected):
    assert parse_label(text, SENTIMENT) == expected


def test_parse_label_returns_spelling_from_labels():
    assert parse_label("answer: entailment", ["Entailment", "Neutral"]) == "Entailment"
    assert parse_label("Answer: entailment", NLI_LABELS) == "entailment"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not entailment", "not entailment"),
        ("Answer: Not Entailment.", "not entailment"),
        ("not-entailment", "not entailment"),
        ("not   entailment", "not entailment"),
        ("entailment", "entailment"),
        ("The answer is entailment.", "entailment"),
        ("entailment, not entailment", None),  # both labels named separately
        ("nothing", None),
    ],
)
def test_parse_label_longer_label_wins(text, expected):
    # Order of the labels must not matter for which one wins.
    assert parse_label(text, ["entailment", "not entailment"]) == expected
    assert parse_label(text, ["not entailment", "entailment"]) == expected


def test_parse_label_separator_variants():
    labels = ["entailment", "not_entailment"]
    assert parse_label("not entailment", labels) == "not_entailment"
    assert parse_label("not_entailment", labels) == "not_entailment"
    assert parse_label("entailment", labels) == "entailment"


def test_parse_label_three_way_ambiguous():
    assert parse_label("Either neutral or contradiction", NLI_LABELS) is None
    assert parse_label("contradiction", NLI_LABELS) == "contradiction"


# --- parse_number --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: -3", -3.0),
        ("answer: 42", 42.0),
        ("1,250", 1250.0),
        ("She paid $1,250,000.75 in total", 1250000.75),
        ("$12.50", 12.5),
        ("3 + 4 = 7 apples", 7.0),
        ("7 apples.", 7.0),
        ("The temperature is -2.5 degrees.", -2.5),
        ("10-3", 3.0),  # subtraction, not a negative number
        ("50%", 50.0),
        ("Pay .5 now", 0.5),
        ("\u22125", -5.0),  # unicode minus sign
        ("no number here", None),
        ("", None),
        ("1,2,3", 3.0),  # a list, not a thousands-separated number
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_parse_number_prefers_last_answer_marker():
    assert parse_number("Answer: 5. Actually, 2 + 2 = 4. ANSWER: 4 cookies, not 6") == 4.0
    assert parse_number("Answer: 12 apples because 3 * 4 = 12 and 1 more is 13") == 12.0


def test_parse_number_falls_back_when_marker_has_no_number():
    assert parse_number("3 + 4 = 7. Answer: seven") == 7.0


def test_parse_number_too_large_is_none():
    assert parse_number("9" * 400) is None


# --- answer_key ----------------------------------------------------------------------------------


def test_answer_key_math_canonical():
    assert answer_key("math", "Answer: 7.0") == "7"
    assert answer_key("math", "7") == "7"
    assert answer_key("math", "Answer: 2.50") == "2.5"
    assert answer_key("math", "1,250") == "1250"
    assert answer_key("math", "-0.0") == "0"
    assert answer_key("math", "no idea") is None


def test_answer_key_nli():
    assert answer_key("nli", "Answer: Neutral.", NLI_LABELS) == "neutral"
    assert answer_key("nli", "neutral or contradiction", NLI_LABELS) is None
    with pytest.raises(ValueError):
        answer_key("nli", "neutral")


def test_answer_key_free_form():
    assert answer_key("qa", "The Eiffel Tower!") == "eiffel tower"
    assert answer_key("summarization", "  The ... ") is None
    assert answer_key("chat", "") is None


# --- exact_match / token_f1 ----------------------------------------------------------------------


def test_exact_match():
    assert exact_match("The Cat.", "cat") == 1.0
    assert exact_match("a cat", "cats") == 0.0
    assert exact_match("", "the") == 1.0  # both normalise to empty
    assert isinstance(exact_match("x", "y"), float)


def test_token_f1_hand_computed():
    # "cat sat" vs "cat sat down": 2 common, P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (5/3) = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # "cat cat dog" vs "cat bird": common = min(2, 1) = 1, P = 1/3, R = 1/2, F1 = 2/5
    assert token_f1("cat cat dog", "cat bird") == pytest.approx(0.4)
    assert token_f1("Paris", "paris.") == 1.0
    assert token_f1("red", "blue") == 0.0


def test_token_f1_empty():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("", "cat") == 0.0
    assert token_f1("cat", "") == 0.0


# --- bleu / rouge_l ------------------------------------------------------------------------------


def test_bleu_identical_corpus_is_100():
    corpus = ["the quick brown fox jumps over the lazy dog", "a journey of a thousand miles begins today"]
    assert bleu(corpus, corpus) == 100.0


def test_bleu_hand_computed_brevity_penalty():
    # All n-gram precisions are 1; the brevity penalty is exp(1 - 8/6).
    assert bleu(["a b c d e f"], ["a b c d e f g h"]) == pytest.approx(100 * math.exp(-1 / 3))


def test_bleu_disjoint_is_zero():
    assert bleu(["one two three four five"], ["six seven eight nine ten"]) == 0.0


def test_bleu_errors():
    with pytest.raises(ValueError):
        bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        bleu([], [])


def test_rouge_l():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    # LCS = 3 of 6 predicted and 3 reference tokens: P = 1/2, R = 1, F = 2/3.
    assert rouge_l(["the cat sat on the mat"], ["the cat sat"]) == pytest.approx(2 / 3)
    # Mean over pairs, with stemming ("running" ~ "runs").
    assert rouge_l(["dogs running", "x"], ["dog runs", "y"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


# --- percentile ----------------------------------------------------------------------------------


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for size in (1, 2, 5, 17, 100):
        values = rng.normal(size=size).tolist()
        for q in (0, 1, 25, 50, 62.5, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)


def test_percentile_hand_computed():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 0], 25) == 2.5  # unsorted input
    assert percentile([5], 73) == 5.0


def test_percentile_errors():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1, 2], 101)
    with pytest.raises(ValueError):
        percentile([1, 2], -1)


# --- TASK_METRICS --------------------------------------------------------------------------------


def test_task_metrics_cover_every_task_type():
    assert set(TASK_METRICS) == set(TASK_TYPES)
    assert TASK_METRICS["nli"] == ("accuracy",)
    assert TASK_METRICS["qa"][0] == "token_f1"
    assert TASK_METRICS["summarization"][0] == "rouge_l"


# --- score_predictions ---------------------------------------------------------------------------


def _assert_plain_floats(result):
    assert all(type(value) is float for value in result.values())


def test_score_nli_full():
    predictions = ["Answer: entailment", "It is neutral.", "no idea", "contradiction or neutral"]
    references = ["entailment", "contradiction", "neutral", "neutral"]
    teacher = ["entailment", "neutral", "neutral", "Neutral."]
    result = score_predictions("nli", predictions, references, teacher, NLI_LABELS)
    assert set(result) == {"accuracy", "agreement", "parse_rate"}
    assert result["accuracy"] == pytest.approx(1 / 4)
    # Item 1 agrees; unparseable predictions (items 3, 4) never agree.
    assert result["agreement"] == pytest.approx(2 / 4)
    assert result["parse_rate"] == pytest.approx(2 / 4)
    _assert_plain_floats(result)


def test_score_nli_partial_references_and_no_teacher():
    predictions = ["entailment", "neutral", "contradiction"]
    references = ["entailment", None, "neutral"]
    result = score_predictions("nli", predictions, references, None, NLI_LABELS)
    assert result == {"accuracy": 0.5, "parse_rate": 1.0}


def test_score_nli_no_references():
    result = score_predictions("nli", ["neutral", "??"], [None, None], ["neutral", "neutral"], NLI_LABELS)
    assert result == {"agreement": 0.5, "parse_rate": 0.5}


def test_score_nli_unparseable_teacher_never_agrees():
    # Both answers are unparseable: None keys must not count as agreement.
    result = score_predictions("nli", ["hmm"], ["neutral"], ["hmm"], NLI_LABELS)
    assert result == {"accuracy": 0.0, "agreement": 0.0, "parse_rate": 0.0}


def test_score_label_agreement_counts_only_items_the_teacher_decided():
    # Item 2's teacher answer names both labels: there is no decision to agree with, so it is left out.
    predictions = ["positive", "negative", "positive"]
    teacher = ["Positive.", "It is positive or negative.", "negative"]
    result = score_predictions("nli", predictions, [None] * 3, teacher, ["positive", "negative"])
    assert result == {"agreement": 0.5, "parse_rate": 1.0}


def test_score_math():
    predictions = ["3 + 4 = 7 apples", "Answer: 2.50", "Answer: 1,250", "I don't know"]
    references = ["#### 7", "2.5", None, "5"]
    teacher = ["Answer: 7", "Answer: 3", "1250", "Answer: 5"]
    result = score_predictions("math", predictions, references, teacher)
    assert set(result) == {"accuracy", "agreement", "parse_rate"}
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["agreement"] == pytest.approx(2 / 4)
    assert result["parse_rate"] == pytest.approx(3 / 4)
    _assert_plain_floats(result)


def test_score_math_without_references_or_teacher():
    assert score_predictions("math", ["7", "x"], [None, None], None) == {"parse_rate": 0.5}


def test_score_qa():
    predictions = ["the cat sat", "Paris", "blue"]
    references = ["a cat sat down", "paris.", None]
    teacher = ["cat sat down", "Paris", "red"]
    result = score_predictions("qa", predictions, references, teacher)
    assert set(result) == {"token_f1", "exact_match", "agreement"}
    assert result["token_f1"] == pytest.approx((0.8 + 1.0) / 2)
    assert result["exact_match"] == pytest.approx(1 / 2)
    assert result["agreement"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    _assert_plain_floats(result)


def test_score_qa_no_references_no_teacher():
    assert score_predictions("qa", ["x"], [None], None) == {}


@pytest.mark.parametrize("task_type", ["summarization", "conversation", "chat"])
def test_score_free_form_generation(task_type):
    sentence = "the quick brown fox jumps over the lazy dog"
    predictions = [sentence, "the cat sat on the mat", "alpha beta"]
    references = [sentence, "the cat sat", None]
    teacher = [sentence, "completely different words", "alpha beta"]
    result = score_predictions(task_type, predictions, references, teacher)
    assert set(result) == {"rouge_l", "bleu", "agreement"}
    assert result["rouge_l"] == pytest.approx((1.0 + 2 / 3) / 2)
    expected_bleu = bleu([sentence, "the cat sat on the mat"], [sentence, "the cat sat"])
    assert result["bleu"] == pytest.approx(expected_bleu)
    assert 0.0 < result["bleu"] < 100.0
    assert result["agreement"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    _assert_plain_floats(result)


def test_score_free_form_identical_bleu_100():
    texts = ["the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore"]
    result = score_predictions("summarization", texts, texts, None)
    assert result == {"rouge_l": 1.0, "bleu": 100.0}


def test_score_free_form_teacher_only():
    result = score_predictions("chat", ["hello there friend"], [None], ["hello there friend"])
    assert result == {"agreement": 1.0}


def test_score_missing_teacher_answer_counts_as_disagreement():
    result = score_predictions("qa", ["cat", "dog"], [None, None], ["cat", None])
    assert result == {"agreement": 0.5}


def test_score_predictions_errors():
    with pytest.raises(ValueError, match="unknown task type"):
        score_predictions("translation", ["a"], ["a"], None)
    with pytest.raises(ValueError):
        score_predictions("qa", ["a", "b"], ["a"], None)
    with pytest.raises(ValueError):
        score_predictions("qa", ["a"], ["a"], ["a", "b"])
    with pytest.raises(ValueError):
        score_predictions("qa", [], [], None)
    with pytest.raises(ValueError):
        score_predictions("nli", ["entailment"], ["entailment"], None)


# --- item_scores: the metrics item by item, for intervals and paired tests ---------------------------


def test_bleu_from_item_statistics_is_sacrebleus_corpus_bleu():
    import sacrebleu

    predictions = ["the cat sat on the mat today", "a quick brown fox jumped", "hello there my good friend"]
    references = ["the cat sat on a mat today", "the quick brown fox jumps", "hello my good friend"]
    expected = sacrebleu.corpus_bleu(predictions, [references]).score
    assert 0.0 < expected < 100.0
    assert bleu(predictions, references) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    "task_type, predictions, references, teacher, labels",
    [
        ("nli", ["Answer: entailment", "It is neutral.", "no idea", "neutral"], ["entailment", None, "neutral", "neutral"],
         ["entailment", "neutral", "neutral or contradiction", "Neutral."], NLI_LABELS),
        ("math", ["3 + 4 = 7", "Answer: 2.50", "x"], ["7", "2.5", None], ["Answer: 7", "no idea", "Answer: 5"], None),
        ("qa", ["the cat sat", "Paris", "blue"], ["a cat sat down", "paris.", None], ["cat sat down", None, "red"], None),
        ("summarization", ["the quick brown fox jumps over it", "the cat sat on the mat", "alpha beta"],
         ["the quick brown fox jumps over the dog", "the cat sat", None], ["the quick fox", "the cat", "beta"], None),
    ],
)
def test_item_scores_aggregate_to_score_predictions(task_type, predictions, references, teacher, labels):
    scores = item_scores(task_type, predictions, references, teacher, labels)
    expected = score_predictions(task_type, predictions, references, teacher, labels)
    assert set(scores) == set(expected)
    for name, items in scores.items():
        assert items.aggregate(items.values) == pytest.approx(expected[name])
        assert items.value == pytest.approx(expected[name])


def test_item_scores_count_the_items_their_metric_counts():
    # Accuracy over the referenced items, label agreement over the items the teacher committed on, parse rate over all.
    scores = item_scores(
        "nli", ["entailment", "neutral", "neutral", "x"], ["entailment", None, "neutral", None],
        ["entailment", "neutral or contradiction", "contradiction", "neutral"], NLI_LABELS,
    )
    assert scores["accuracy"].values.tolist() == [1.0, 1.0]
    assert scores["agreement"].values.tolist() == [1.0, 0.0, 0.0]
    assert len(scores["parse_rate"]) == 4
    # BLEU keeps each referenced item's n-gram statistics, so any subset of items can be scored again.
    bleu_items = item_scores("chat", ["the cat sat on the mat", "hi"], ["the cat sat on the mat", None], None)["bleu"]
    assert bleu_items.values.shape == (1, 10)
    assert bleu_items.value == pytest.approx(100.0)


def test_agreement_with_a_teacher_that_never_committed_is_zero_over_no_items():
    scores = item_scores("nli", ["entailment"], [None], ["no idea"], NLI_LABELS)
    assert len(scores["agreement"]) == 0 and scores["agreement"].value == 0.0


def test_module_does_not_import_torch():
    # A fresh interpreter, because another test module may already have imported torch.
    code = "import sys, azdistill.evaluation.metrics; sys.exit('torch' in sys.modules)"
    repo_root = Path(__file__).resolve().parent.parent
    completed = subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=False)
    assert completed.returncode == 0
