"""The checks a new student must pass (`promotion` section) before it may become the champion, and the words the
report and the registry both use for the outcome."""

from __future__ import annotations

from typing import Any, Iterable

from azdistill.config.schema import DistillConfig
from azdistill.evaluation.report import FAILED_SIGN, ModelResult, PromotionCheck, Report, metric_in_sentence

# The registry's words for what a registered student is after the champion/challenger rule (tracking/registry.py):
# the champion; a challenger that passed the checks but did not beat the champion; a version rejected by the checks.
CHAMPION = "champion"
CHALLENGER = "challenger"
REJECTED = "rejected"


def promotion_checks(config: DistillConfig, models: dict[str, ModelResult], primary: str) -> list[PromotionCheck]:
    """The gate a student must pass to be promoted: agreement, quality kept, speed, better than baseline."""
    rules = config.evaluation.promotion
    teacher, student = models["teacher"], models["student"]
    checks = [
        PromotionCheck("agreement", student.metrics.get("agreement", 0.0), rules.min_agreement, ">=",
                       student.metrics.get("agreement", 0.0) >= rules.min_agreement),
    ]
    if teacher.metrics.get(primary):
        retained = student.metrics.get(primary, 0.0) / teacher.metrics[primary]
        checks.append(PromotionCheck("quality_retained", retained, rules.min_quality_retained, ">=", retained >= rules.min_quality_retained))
    if teacher.latency_p50_s > 0:  # NaN (a logged teacher: nothing timed) compares false
        ratio = student.latency_p50_s / teacher.latency_p50_s
        checks.append(PromotionCheck("latency_ratio", ratio, rules.max_latency_ratio, "<=", ratio <= rules.max_latency_ratio))
    if rules.beat_baseline and "baseline" in models:
        # With references the task metric decides; without them, agreement with the teacher does.
        metric = primary if primary in student.metrics else "agreement"
        ours, theirs = student.metrics.get(metric, 0.0), models["baseline"].metrics.get(metric, 0.0)
        checks.append(PromotionCheck(f"beats_baseline_{metric}", ours, theirs, ">", ours > theirs))
    return checks


def check_figure(value: float) -> str:
    """A check's value or threshold in a sentence: four significant digits, whole numbers from 100."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def failed_check_descriptions(checks: Iterable[Any]) -> list[str]:
    """`["agreement 0.7 < 0.8", ...]` for the promotion checks that did not pass: the comparison that did not hold."""
    return [
        f"{check.name} {check_figure(check.value)} {FAILED_SIGN.get(check.comparison, 'vs')} {check_figure(check.threshold)}"
        for check in checks
        if not check.passed
    ]


def rejection_reason(failed: list[str]) -> str:
    """Why a student that failed checks is rejected, word for word as the registry tags it and the report says it."""
    return "failed the promotion checks: " + "; ".join(failed)


def champion_metric_phrase(report: Report) -> str:
    """The champion metric as the promotion line names it; reports from before it was recorded name its setting."""
    return metric_in_sentence(report.champion_metric) if report.champion_metric else "evaluation.promotion.champion_metric"


def promotion_verdict(report: Report) -> tuple[str, str]:
    """The promotion outcome in the registry's words (tracking/registry.py applies the same rule when the student is
    registered): ("PROMOTE", what happens next) when every check passed, ("REJECTED", the reason the registry tags)
    when one failed."""
    failed = failed_check_descriptions(report.checks)
    if failed:
        return REJECTED.upper(), rejection_reason(failed)
    return "PROMOTE", f"becomes {CHAMPION} unless the current {CHAMPION}'s {champion_metric_phrase(report)} is as high"
