"""Error bars for the report: a bootstrap confidence interval for every quality figure, and a paired significance
test of the student against each baseline, both over the held-out items.

Both work on items, not on scores: a bootstrap resample draws held-out items with replacement and recomputes the
metric's own aggregate on them (`metrics.ItemScores`), so a corpus-level metric such as BLEU gets an interval like
any mean. The paired test is approximate randomization, the test machine translation uses to compare two systems on
one test set: if the two models were interchangeable, swapping their outputs on any item would be as likely to give
the observed difference as not, so the p-value is the share of swaps whose difference of the aggregate is at least
as large (two-sided). It works for any aggregate metric, and for 0/1 scores (accuracy, label agreement) it is in
effect McNemar's test. Every figure is seeded, so the same answers always give the same intervals and p-values.

scipy does the resampling (`scipy.stats.bootstrap`, `scipy.stats.permutation_test`); it loads on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from azdistill.evaluation.metrics import ItemScores
from azdistill.evaluation.report import PairedComparison

if TYPE_CHECKING:
    import numpy as np

RESAMPLES = 2000  # bootstrap resamples: enough for stable 2.5th and 97.5th percentiles
CONFIDENCE = 0.95
ROUNDS = 10_000  # random swaps of a Monte Carlo paired test: p-values down to 1/10,001
EXACT_UP_TO = 16  # items: up to 2^16 = 65,536 swap patterns are all enumerated, an exact p-value in about a second
ALPHA = 0.05  # a difference is significant when p < ALPHA
COMPARED_ROLES = ("baseline", "reference_sft")  # the rows the student must be shown to beat


@dataclass(frozen=True)
class PairedTest:
    """What a paired randomization test found: the observed difference of the aggregates (a - b), its two-sided
    p-value, whether that is below `ALPHA`, and whether every swap was enumerated or random ones drawn."""

    difference: float
    p_value: float
    significant: bool
    method: str  # "exact randomization" or "approximate randomization"


def bootstrap_interval(
    items: "np.ndarray",
    statistic: Callable[["np.ndarray"], float],
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """The percentile bootstrap interval of `statistic` over `items` (one row per held-out item): items are drawn
    with replacement `resamples` times, `statistic` is recomputed on each draw, and the interval spans the middle
    `confidence` of those values. Raises ValueError for fewer than two items, where there is no spread to see."""
    import numpy as np
    from scipy import stats

    items = np.asarray(items)
    if len(items) < 2:
        raise ValueError(f"a bootstrap interval needs at least two items, got {len(items)}")
    # Resampling row numbers rather than the rows themselves keeps multi-column items (BLEU's n-gram counts) whole.
    result = stats.bootstrap(
        (np.arange(len(items)),),
        lambda rows: statistic(items[rows]),
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=False,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_test(
    items_a: "np.ndarray",
    items_b: "np.ndarray",
    statistic: Callable[["np.ndarray"], float],
    rounds: int = ROUNDS,
    seed: int = 0,
    exact_up_to: int = EXACT_UP_TO,
) -> PairedTest:
    """Approximate randomization test of `statistic(items_a) - statistic(items_b)`, where row i of both is the same
    held-out item. Each round swaps the two systems' rows on a random subset of items and recomputes the difference;
    p is the share of rounds whose absolute difference is at least the observed one. Up to `exact_up_to` items every
    one of the 2^n swap patterns is enumerated (p = count / 2^n); beyond, `rounds` random ones are drawn, counting
    the observed pattern too (p = (count + 1) / (rounds + 1)), so p is never 0."""
    import numpy as np
    from scipy import stats

    a, b = np.asarray(items_a), np.asarray(items_b)
    if len(a) != len(b):
        raise ValueError(f"a paired test needs the same items on both sides, got {len(a)} and {len(b)}")
    if not len(a):
        raise ValueError("a paired test needs at least one item")
    n = len(a)
    both = np.concatenate([a, b])

    def gap(rows_a: "np.ndarray", rows_b: "np.ndarray") -> float:
        # Row numbers again (0..n-1 are a's items, n..2n-1 b's), so scipy's swaps move whole items.
        return abs(statistic(both[rows_a]) - statistic(both[rows_b]))

    exact = n <= exact_up_to
    result = stats.permutation_test(
        (np.arange(n), np.arange(n, 2 * n)),
        gap,
        permutation_type="samples",  # swap within pairs: item i's two outputs trade places, or not
        vectorized=False,
        n_resamples=2**n if exact else rounds,  # scipy enumerates every pattern when asked for at least 2^n
        alternative="greater",  # on the absolute difference: two-sided
        rng=np.random.default_rng(seed),
    )
    p_value = float(min(result.pvalue, 1.0))
    return PairedTest(
        difference=float(statistic(a) - statistic(b)),
        p_value=p_value,
        significant=p_value < ALPHA,
        method="exact randomization" if exact else "approximate randomization",
    )


def metric_intervals(scores: dict[str, ItemScores], seed: int = 0) -> dict[str, tuple[float, float]]:
    """The 95% bootstrap interval of each of one model's metrics; a metric counted on fewer than two items (one
    referenced item, say) gets none."""
    return {
        name: bootstrap_interval(items.values, items.aggregate, seed=seed)
        for name, items in scores.items()
        if len(items) >= 2
    }


def student_comparisons(scores_by_role: dict[str, dict[str, ItemScores]], primary_metric: str) -> list[PairedComparison]:
    """Paired tests of the student against each baseline row present (`COMPARED_ROLES`), on the primary metric and
    on agreement with the teacher, wherever both rows have that metric on the same items."""
    student = scores_by_role.get("student")
    if student is None:
        return []
    comparisons = []
    for role in COMPARED_ROLES:
        other = scores_by_role.get(role) or {}
        for metric in dict.fromkeys((primary_metric, "agreement")):
            ours, theirs = student.get(metric), other.get(metric)
            if ours is None or theirs is None or not len(ours) or len(ours) != len(theirs):
                continue
            test = paired_test(ours.values, theirs.values, ours.aggregate)
            comparisons.append(
                PairedComparison(
                    metric=metric,
                    other=role,
                    student_value=ours.value,
                    other_value=theirs.value,
                    difference=test.difference,
                    p_value=test.p_value,
                    significant=test.significant,
                    method=test.method,
                    n=len(ours),
                )
            )
    return comparisons
