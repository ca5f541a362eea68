"""Error bars as people read them: a quality figure with its 95% interval, and each paired test of the student
against a baseline as one sentence, for `report.md` ("Is the difference real?") and the console lines."""

from __future__ import annotations

from azdistill.evaluation.report import (
    RAW_SCALE_METRICS,
    ModelResult,
    PairedComparison,
    Report,
    format_metric,
    is_finite,
    is_fraction_metric,
    metric_in_sentence,
)


def _fmt_bound(value: float, fraction: bool, metric: str) -> str:
    """One end of an interval, in the units of its figure but without the "%": "62.5" beside "73.3%"."""
    if metric in RAW_SCALE_METRICS:
        return f"{value:.1f}"
    return f"{value * 100:.1f}" if fraction else f"{value:.3g}"


def quality_cell(model: ModelResult, metric: str, fraction: bool) -> str:
    """A model's quality figure with its 95% interval where it has one: "73.3% (62.5-83.0)"; the figure alone
    otherwise (a report written before intervals, or a metric counted on a single item)."""
    value = model.metrics.get(metric)
    text = format_metric(value, fraction, metric)
    interval = model.intervals.get(metric)
    if interval is None or not is_finite(value) or not all(is_finite(bound) for bound in interval):
        return text
    return f"{text} ({_fmt_bound(interval[0], fraction, metric)}-{_fmt_bound(interval[1], fraction, metric)})"


def _fmt_p(p_value: float) -> str:
    """A p-value as people read one: "p < 0.001" below that, else two significant digits ("p = 0.21")."""
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.2g}"


def _fmt_difference(difference: float, fraction: bool, metric: str) -> str:
    """A difference of two figures: percentage points for a share ("+61.3 points"), BLEU points, else the number."""
    if fraction:
        return f"{difference * 100:+.1f} points"
    if metric in RAW_SCALE_METRICS:
        return f"{difference:+.1f} points"
    return f"{difference:+.3g}"


def _verdict(test: PairedComparison) -> str:
    return "significant" if test.significant else "not significant"


def significance_line(report: Report, test: PairedComparison) -> str:
    """One paired test as a sentence: "student vs baseline: accuracy 61.3% vs 0.0%, +61.3 points, p < 0.001
    (paired approximate randomization, 80 items): significant"."""
    fraction = is_fraction_metric(report, test.metric)
    student, other = (format_metric(v, fraction, test.metric) for v in (test.student_value, test.other_value))
    return (
        f"student vs {test.other.replace('_', ' ')}: {metric_in_sentence(test.metric)} {student} vs {other}, "
        f"{_fmt_difference(test.difference, fraction, test.metric)}, {_fmt_p(test.p_value)} "
        f"(paired {test.method}, {test.n} items): {_verdict(test)}"
    )


def significance_section(report: Report) -> list[str]:
    """The "Is the difference real?" section of `report.md`: one line per paired test, and how to read p; nothing
    for a report without tests (no baseline row, or one written before they existed)."""
    if not report.comparisons:
        return []
    out = ["## Is the difference real?", ""]
    out += [f"- {significance_line(report, test)}" for test in report.comparisons]
    out += [
        "",
        "p is how often swapping the two models' answers on randomly chosen items gives a difference at least this "
        "large (two-sided); below 0.05 the difference is called significant.",
        "",
    ]
    return out


def significance_headline(report: Report) -> list[str]:
    """The console's one line on the paired tests of the primary metric: "student vs baseline on accuracy: +61.3
    points (p < 0.001, significant)"; none without such tests."""
    tests = [test for test in report.comparisons if test.metric == report.primary_metric]
    if not tests:
        return []
    fraction = is_fraction_metric(report, report.primary_metric)
    shown = "; ".join(
        f"vs {test.other.replace('_', ' ')} {_fmt_difference(test.difference, fraction, test.metric)} "
        f"({_fmt_p(test.p_value)}, {_verdict(test)})"
        for test in tests
    )
    return [f"student on {metric_in_sentence(report.primary_metric)}: {shown}"]
