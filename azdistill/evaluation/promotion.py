"""The checks a new student must pass (`promotion` section) before it may become the champion."""

from __future__ import annotations

from azdistill.config.schema import DistillConfig
from azdistill.evaluation.report import ModelResult, PromotionCheck


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
