"""Tests for azdistill.evaluation.stats: bootstrap intervals and paired randomization tests with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from azdistill.evaluation.metrics import bleu, item_scores, mean_score
from azdistill.evaluation.stats import (
    bootstrap_interval,
    metric_intervals,
    paired_test,
    student_comparisons,
)

# --- bootstrap_interval ----------------------------------------------------------------------------


def test_constant_scores_have_a_zero_width_interval():
    assert bootstrap_interval(np.full(30, 0.7), mean_score) == pytest.approx((0.7, 0.7))


def test_half_right_on_400_items_gives_the_binomial_width():
    # The standard error of a share of 0.5 on 400 items is 0.025, so the 95% interval is about 0.5 +- 0.049.
    low, high = bootstrap_interval(np.array([1.0, 0.0] * 200), mean_score)
    assert 0.44 <= low <= 0.46
    assert 0.54 <= high <= 0.56


def test_same_seed_same_interval_other_seed_other_draws():
    scores = np.random.default_rng(7).random(50)
    assert bootstrap_interval(scores, mean_score, seed=3) == bootstrap_interval(scores, mean_score, seed=3)
    assert bootstrap_interval(scores, mean_score, seed=3) != bootstrap_interval(scores, mean_score, seed=4)


def test_higher_confidence_gives_a_wider_interval():
    scores = np.random.default_rng(1).random(60)
    low90, high90 = bootstrap_interval(scores, mean_score, confidence=0.90)
    low99, high99 = bootstrap_interval(scores, mean_score, confidence=0.99)
    assert low99 < low90 < scores.mean() < high90 < high99


def test_bootstrap_needs_two_items():
    with pytest.raises(ValueError, match="at least two items"):
        bootstrap_interval(np.array([1.0]), mean_score)


def test_bleu_interval_resamples_items_and_contains_the_corpus_bleu():
    references = [f"the {animal} sat on the mat near the door today" for animal in ("cat", "dog", "fox", "owl")] * 5
    predictions = [
        reference if i % 3 else reference.replace("sat", "slept").replace("door", "window")
        for i, reference in enumerate(references)
    ]
    scores = item_scores("summarization", predictions, references, None)["bleu"]
    assert scores.value == pytest.approx(bleu(predictions, references))
    low, high = bootstrap_interval(scores.values, scores.aggregate)
    assert low < scores.value < high  # a corpus-level metric gets a real, non-degenerate interval
    assert 0.0 <= low and high <= 100.0


# --- paired_test -----------------------------------------------------------------------------------


def test_exact_test_where_every_item_favours_a():
    # Of the 2^6 = 64 swap patterns only "swap none" and "swap all" reach a difference of 1: p = 2/64.
    test = paired_test(np.ones(6), np.zeros(6), mean_score)
    assert test.p_value == pytest.approx(2 / 64)
    assert test.difference == pytest.approx(1.0)
    assert test.significant
    assert test.method == "exact randomization"


def test_identical_systems_are_not_significant():
    scores = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    test = paired_test(scores, scores.copy(), mean_score)
    assert test.p_value == pytest.approx(1.0)
    assert test.difference == 0.0
    assert not test.significant


def test_exact_test_on_01_scores_is_mcnemars_test():
    # 12 discordant items, 10 favouring a, and 4 where both are right: the exact two-sided sign test on the
    # discordant pairs (McNemar's exact test) gives 2 * (C(12,10) + C(12,11) + C(12,12)) / 2^12 = 158/4096.
    a = np.array([1.0] * 10 + [0.0] * 2 + [1.0] * 4)
    b = np.array([0.0] * 10 + [1.0] * 2 + [1.0] * 4)
    test = paired_test(a, b, mean_score)
    assert test.method == "exact randomization"
    assert test.p_value == pytest.approx(158 / 4096)
    assert test.p_value == pytest.approx(binomtest(10, 12).pvalue)


def test_monte_carlo_test_approximates_the_exact_answer():
    # 20 discordant items, 15 favouring a: exact p = 2 * P(Bin(20, 0.5) >= 15) = 0.0414; 10,000 random swaps
    # estimate it with a standard error of 0.002.
    a = np.array([1.0] * 15 + [0.0] * 5)
    test = paired_test(a, 1.0 - a, mean_score)
    assert test.method == "approximate randomization"
    assert test.p_value == pytest.approx(binomtest(15, 20).pvalue, abs=0.008)
    assert test.significant


def test_monte_carlo_p_value_counts_the_observed_pattern():
    # No random swap of 30 items all favouring a matches the observed difference: p = (0 + 1) / (10,000 + 1).
    test = paired_test(np.ones(30), np.zeros(30), mean_score)
    assert test.p_value == pytest.approx(1 / 10_001)
    assert paired_test(np.ones(30), np.zeros(30), mean_score, rounds=999).p_value == pytest.approx(1 / 1000)


def test_paired_test_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 2, 40).astype(float), rng.integers(0, 2, 40).astype(float)
    assert paired_test(a, b, mean_score, seed=1) == paired_test(a, b, mean_score, seed=1)


def test_paired_test_needs_the_same_items():
    with pytest.raises(ValueError, match="same items"):
        paired_test(np.ones(3), np.ones(4), mean_score)
    with pytest.raises(ValueError, match="at least one item"):
        paired_test(np.array([]), np.array([]), mean_score)


# --- the report's figures --------------------------------------------------------------------------


def _nli_scores(right: int, of: int, teacher_agrees: int):
    """Item scores of an nli model right on the first `right` of `of` items, agreeing with an always-correct
    teacher on the first `teacher_agrees`."""
    labels = ["yes", "no"]
    references = ["yes"] * of
    predictions = ["yes" if i < right else "no" for i in range(of)]
    teacher = ["yes" if i < teacher_agrees else "no" for i in range(of)]
    return item_scores("nli", predictions, references, teacher, labels)


def test_metric_intervals_cover_every_metric_with_two_items():
    scores = _nli_scores(right=30, of=40, teacher_agrees=40)
    intervals = metric_intervals(scores)
    assert set(intervals) == {"accuracy", "agreement", "parse_rate"}
    low, high = intervals["accuracy"]
    assert low < 0.75 < high
    assert intervals["parse_rate"] == pytest.approx((1.0, 1.0))
    # One referenced item: no spread to see, so no interval.
    single = item_scores("nli", ["yes", "no"], ["yes", None], None, ["yes", "no"])
    assert set(metric_intervals(single)) == {"parse_rate"}


def test_student_comparisons_against_each_baseline_present():
    student = _nli_scores(right=40, of=40, teacher_agrees=40)
    baseline = _nli_scores(right=0, of=40, teacher_agrees=0)
    close_rival = _nli_scores(right=39, of=40, teacher_agrees=39)
    tests = student_comparisons(
        {"teacher": student, "student": student, "baseline": baseline, "reference_sft": close_rival}, "accuracy"
    )
    assert [(t.other, t.metric) for t in tests] == [
        ("baseline", "accuracy"), ("baseline", "agreement"), ("reference_sft", "accuracy"), ("reference_sft", "agreement"),
    ]
    beaten = tests[0]
    assert (beaten.student_value, beaten.other_value, beaten.difference) == (1.0, 0.0, 1.0)
    assert beaten.significant and beaten.p_value < 0.001 and beaten.n == 40
    assert beaten.method == "approximate randomization"
    near = tests[2]
    assert near.difference == pytest.approx(1 / 40)
    assert near.p_value == pytest.approx(1.0) and not near.significant  # one item in 40 proves nothing


def test_student_comparisons_without_student_or_baselines():
    student = _nli_scores(right=3, of=4, teacher_agrees=4)
    assert student_comparisons({"teacher": student}, "accuracy") == []
    assert student_comparisons({"student": student}, "accuracy") == []
    # Agreement is the primary metric when there are no references: it is tested once.
    tests = student_comparisons({"student": student, "baseline": _nli_scores(0, 4, 0)}, "agreement")
    assert [t.metric for t in tests] == ["agreement"]
