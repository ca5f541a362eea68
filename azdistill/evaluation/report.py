"""The evaluation report: what was measured per model, and the figures derived from it (ratios against the
teacher). It round-trips through `report_to_dict` / `report_from_dict` (`report.json`)."""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from azdistill.config.evaluation import SERVED_ROLE_PREFIX

ROLE_ORDER = ("teacher", "student", "baseline", "reference_sft")

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "agreement": "Agreement",
    "parse_rate": "Parse rate",
    "rouge_l": "ROUGE-L",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "bleu": "BLEU",
    "exact_match": "Exact match",
    "f1": "F1",
}
# Metrics reported on their own 0-100 scale rather than as a fraction.
RAW_SCALE_METRICS = {"bleu"}


@dataclass
class ModelResult:
    """One evaluated model: its size, cost and quality on the held-out set."""

    role: str  # "teacher" | "student" | "baseline" | "reference_sft" | "served_<name>" (see `is_served`)
    name: str
    path: str
    parameters: int
    size_on_disk_mb: float
    weights_memory_mb: float  # parameters * bytes per parameter
    peak_memory_mb: float  # peak resident memory of the process that loaded the model and answered the set
    latency_p50_s: float  # seconds per response, prompts answered one at a time
    latency_p95_s: float
    throughput_tokens_per_s: float  # generated tokens per second when answering the set in batches
    n: int  # held-out records answered
    metrics: dict[str, float] = field(default_factory=dict)
    # Serving cost per 1,000 answers: a hosted model's token prices times its measured tokens; a local model's
    # serving machine's hourly price times its measured answering time. None when no price was configured.
    cost_per_1k_answers: Optional[float] = None
    hosted: bool = False  # answered through an endpoint: size and memory cannot be measured, parameters are declared
    # Per quality metric, its 95% bootstrap confidence interval over the held-out items (evaluation.stats); empty in
    # reports written before intervals existed, and for a metric counted on fewer than two items.
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Latency as users feel it, timed with the same prompts one at a time as latency_p50_s (evaluation.measure):
    # seconds from sending a prompt to the first token of its answer, and a response's seconds over the tokens it
    # generated, each the median over the prompts. None where it could not be seen: a hosted model's time to first
    # token (the endpoint client does not stream), the per-token figure of a teacher that scores the labels (its
    # answer comes whole, no token is generated), anything of a logged teacher, and reports written before them.
    ttft_p50_s: Optional[float] = None
    latency_per_token_p50_s: Optional[float] = None
    # What answered the held-out prompts for the quality figures and throughput of a local model: "vllm" or
    # "transformers" (evaluation.engine); None for a model answering through an endpoint or from logged answers, and
    # in reports written before the engine was recorded.
    engine: Optional[str] = None


# How a failed check reads: "agreement 0.71 < 0.8".
FAILED_SIGN = {">=": "<", "<=": ">", ">": "<=", "<": ">=", "==": "!="}


@dataclass
class PromotionCheck:
    """One gate the student must pass to replace the current model."""

    name: str
    value: float
    threshold: float
    comparison: str  # ">=", "<=" or ">"
    passed: bool


@dataclass
class PairedComparison:
    """The student against one other row on one metric, item by item over the same held-out items: is the
    difference real, or could the two models have swapped answers without changing it (evaluation.stats)?"""

    metric: str
    other: str  # the other row's role: "baseline" or "reference_sft"
    student_value: float
    other_value: float
    difference: float  # student - other, in the metric's own units
    p_value: float  # two-sided
    significant: bool  # p < 0.05
    method: str  # "exact randomization" (every swap enumerated) or "approximate randomization" (random swaps)
    n: int  # items compared


@dataclass
class Report:
    """Everything the evaluation stage found, ready to be written and shown."""

    pipeline: str
    task: str
    data_version: str
    created: str  # ISO-8601
    primary_metric: str
    models: list[ModelResult]  # teacher first, then student, the served models, baseline, reference_sft
    promote: bool
    checks: list[PromotionCheck]
    device: str
    samples: list[dict] = field(default_factory=list)
    judge: Optional[dict] = None  # the LLM judge's wins, ties and losses of the student (evaluation.judge.summarize)
    comparisons: list[PairedComparison] = field(default_factory=list)  # the student against each baseline row
    # The metric on which the registry compares a student that passed the checks with the champion
    # (evaluation.promotion.champion_metric); None in reports written before it was recorded.
    champion_metric: Optional[str] = None




def is_finite(x: Any) -> bool:
    """A real number (not a bool, NaN or infinity): what can be shown and logged as a figure."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _ratio(num: float, den: float) -> float | None:
    if not (is_finite(num) and is_finite(den)) or den == 0:
        return None
    return num / den


def is_served(role: str) -> bool:
    """Whether a row is a served model of `evaluation.served`: measured through its endpoint, compared with the
    teacher like the student, never part of the promotion checks."""
    return role.startswith(SERVED_ROLE_PREFIX)


def model_of(report: Report, role: str) -> ModelResult | None:
    return next((m for m in report.models if m.role == role), None)


def comparison(report: Report) -> dict[str, float]:
    """Student relative to teacher.

    Keys: ``param_ratio``, ``latency_ratio`` (student p50 / teacher p50, per response), ``speedup`` (its inverse),
    ``ttft_ratio`` (time to first token, p50), ``latency_per_token_ratio`` (seconds per output token, p50),
    ``memory_ratio`` (peak), ``weights_memory_ratio``, ``quality_retained`` (student / teacher on
    the primary metric), ``throughput_ratio`` and ``cost_ratio`` (per 1,000 answers). A key whose denominator is zero or missing is left
    out rather than reported as infinity; an empty dict if the teacher or student is absent.
    """
    teacher, student = model_of(report, "teacher"), model_of(report, "student")
    if teacher is None or student is None:
        return {}
    pm = report.primary_metric
    candidates = {
        "param_ratio": _ratio(student.parameters, teacher.parameters),
        "latency_ratio": _ratio(student.latency_p50_s, teacher.latency_p50_s),
        "speedup": _ratio(teacher.latency_p50_s, student.latency_p50_s),
        "ttft_ratio": _ratio(student.ttft_p50_s, teacher.ttft_p50_s),
        "latency_per_token_ratio": _ratio(student.latency_per_token_p50_s, teacher.latency_per_token_p50_s),
        "memory_ratio": _ratio(student.peak_memory_mb, teacher.peak_memory_mb),
        "weights_memory_ratio": _ratio(student.weights_memory_mb, teacher.weights_memory_mb),
        "quality_retained": _ratio(student.metrics.get(pm), teacher.metrics.get(pm)),
        "throughput_ratio": _ratio(student.throughput_tokens_per_s, teacher.throughput_tokens_per_s),
        "cost_ratio": _ratio(student.cost_per_1k_answers, teacher.cost_per_1k_answers),
    }
    return {k: float(v) for k, v in candidates.items() if v is not None}




def _json_safe(obj: Any) -> Any:
    # Strict JSON has no NaN/Infinity; a metric that could not be computed becomes null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def report_to_dict(report: Report) -> dict:
    """A JSON-ready dict of the report, with ``"comparison": comparison(report)`` added.

    Non-finite floats become ``None`` so the result passes ``json.dumps(..., allow_nan=False)``.
    """
    data = dataclasses.asdict(report)
    data["comparison"] = comparison(report)
    return _json_safe(data)


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _optional_float(x: Any) -> Optional[float]:
    return None if x is None else float(x)


def report_from_dict(data: dict) -> Report:
    """Rebuild a :class:`Report` from :func:`report_to_dict` output (derived keys are ignored).

    Raises ``ValueError`` naming the missing or malformed key.
    """
    where = "report"
    try:
        models = []
        for i, m in enumerate(data["models"]):
            where = f"models[{i}]"
            models.append(
                ModelResult(
                    role=str(m["role"]),
                    name=str(m["name"]),
                    path=str(m["path"]),
                    parameters=int(m["parameters"]),
                    size_on_disk_mb=_float(m["size_on_disk_mb"]),
                    weights_memory_mb=_float(m["weights_memory_mb"]),
                    peak_memory_mb=_float(m["peak_memory_mb"]),
                    latency_p50_s=_float(m["latency_p50_s"]),
                    latency_p95_s=_float(m["latency_p95_s"]),
                    throughput_tokens_per_s=_float(m["throughput_tokens_per_s"]),
                    n=int(m["n"]),
                    metrics={str(k): _float(v) for k, v in (m.get("metrics") or {}).items()},
                    cost_per_1k_answers=_optional_float(m.get("cost_per_1k_answers")),
                    hosted=bool(m.get("hosted", False)),
                    intervals={str(k): (_float(low), _float(high)) for k, (low, high) in (m.get("intervals") or {}).items()},
                    ttft_p50_s=_optional_float(m.get("ttft_p50_s")),
                    latency_per_token_p50_s=_optional_float(m.get("latency_per_token_p50_s")),
                    engine=None if m.get("engine") is None else str(m["engine"]),
                )
            )
        checks = []
        for i, c in enumerate(data.get("checks") or []):
            where = f"checks[{i}]"
            checks.append(
                PromotionCheck(
                    name=str(c["name"]),
                    value=_float(c["value"]),
                    threshold=_float(c["threshold"]),
                    comparison=str(c["comparison"]),
                    passed=bool(c["passed"]),
                )
            )
        comparisons = []
        for i, c in enumerate(data.get("comparisons") or []):
            where = f"comparisons[{i}]"
            comparisons.append(_comparison_from_dict(c))
        where = "report"
        return Report(
            pipeline=str(data["pipeline"]),
            task=str(data["task"]),
            data_version=str(data["data_version"]),
            created=str(data["created"]),
            primary_metric=str(data["primary_metric"]),
            models=models,
            promote=bool(data["promote"]),
            checks=checks,
            device=str(data["device"]),
            samples=[dict(s) for s in data.get("samples") or []],
            judge=None if data.get("judge") is None else dict(data["judge"]),
            comparisons=comparisons,
            champion_metric=None if data.get("champion_metric") is None else str(data["champion_metric"]),
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed value ({e})") from None


def _comparison_from_dict(c: dict) -> PairedComparison:
    return PairedComparison(
        metric=str(c["metric"]),
        other=str(c["other"]),
        student_value=_float(c["student_value"]),
        other_value=_float(c["other_value"]),
        difference=_float(c["difference"]),
        p_value=_float(c["p_value"]),
        significant=bool(c["significant"]),
        method=str(c["method"]),
        n=int(c["n"]),
    )


def error_bar_metrics(report: Report) -> dict[str, float]:
    """The error bars as tracking metrics: `student_<metric>_ci_low` / `_ci_high` for each of the student's quality
    intervals, and `student_vs_<role>_<metric>_p_value` for each paired comparison."""
    metrics: dict[str, float] = {}
    student = model_of(report, "student")
    for name, (low, high) in (student.intervals if student is not None else {}).items():
        metrics[f"student_{name}_ci_low"], metrics[f"student_{name}_ci_high"] = low, high
    for test in report.comparisons:
        metrics[f"student_vs_{test.other}_{test.metric}_p_value"] = test.p_value
    return metrics


# Formatting helpers shared by Markdown, plot and console


def metric_label(name: str) -> str:
    """Human-readable name of a metric key ("rouge_l" -> "ROUGE-L")."""
    return METRIC_LABELS.get(name, name.replace("_", " ").capitalize())


def metric_in_sentence(name: str) -> str:
    """A metric's name in the middle of a sentence: "accuracy", but "ROUGE-L" and "F1"."""
    label = metric_label(name)
    # Acronyms keep their case ("ROUGE-L", "F1"); ordinary words go lower case mid-sentence.
    return label if label[:2].isupper() else label.lower()


def format_metric(value: float | None, fraction: bool, metric: str) -> str:
    """A quality figure as shown: "73.3%" for a share (`fraction`, see `is_fraction_metric`), one decimal for BLEU's
    0-100 scale, else three significant digits; "n/a" when it is missing or not a number."""
    if not is_finite(value):
        return "n/a"
    if metric in RAW_SCALE_METRICS:
        return f"{value:.1f}"
    if fraction:
        return f"{value * 100:.1f}%"
    return f"{value:.3g}"


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write through `data.atomic_writer`: readers see the old file or the complete new one, never a part."""
    from azdistill.data.files import atomic_writer

    with atomic_writer(Path(path), "wb") as handle:
        write(handle)
    return Path(path)


def is_fraction_metric(report: Report, metric: str) -> bool:
    # Decided per column so one column never mixes "0.9" and "90.0%".
    if metric in RAW_SCALE_METRICS:
        return False
    values = [m.metrics[metric] for m in report.models if is_finite(m.metrics.get(metric))]
    return all(0.0 <= v <= 1.0 for v in values)
