"""What MLflow shows of a retrain at a glance: run names that tell retrains apart, the evaluation's metrics by role,
which of them are the student model's own, and the pipeline run's headline (rounded metrics and the note that puts
student and teacher side by side with the promotion decision). `tracking.tracker` logs them; nothing here talks to
MLflow.

- The pipeline run is `data-v<version> #<run id[:6]> <name>` (`pipeline_run_name`): the data version and a short id
  come first, where the runs table does not cut them; it is tagged `azdistill.*` (`pipeline_tags`). Each stage run
  is named after it, `data-v<version> #<pipeline run id[:6]> / <stage>` (`stage_run_name`).
- The evaluate run's metrics are `<role>_<metric>` (`evaluation_metrics`: `student_agreement`,
  `teacher_latency_p50_s`, ...); the student's logged model carries the student's own (`is_model_metric`).
- The pipeline run's metrics are named apart from every stage's, so no retrain is counted twice in a chart
  (`headline_metrics`: `agreement`, `quality_retained`, `student_vs_teacher_speedup`, ..., `checks_passed`,
  `promoted`, rounded to 4 significant digits), and its note (`mlflow.note.content`, the description on the run's
  overview page) is the side-by-side summary with the decision (`run_note`).
"""

from __future__ import annotations

from typing import Any, Optional

from azdistill.config.schema import DistillConfig
from azdistill.evaluation.promotion import failed_check_descriptions
from azdistill.evaluation.report import comparison, format_metric, is_finite, is_fraction_metric, metric_label, model_of

SHORT_ID_LENGTH = 6
HEADLINE_DIGITS = 4  # significant digits of the pipeline run's headline metrics
# MLflow caps a tag value at 8000 characters; the run note is a tag.
MAX_NOTE_LENGTH = 8000


def run_label(config: DistillConfig, run_id: str) -> str:
    """`data-v<version> #<run id[:6]>`: what tells one retrain's runs from another's, at the start of their names."""
    return f"data-v{config.data.version} #{run_id[:SHORT_ID_LENGTH]}"


def pipeline_run_name(config: DistillConfig, run_id: str) -> str:
    """Name of a pipeline's parent run, `data-v<version> #<run id[:6]> <name>`: retrains of one config differ by their
    data version and, for reruns on the same data, by the id; both come first, where the runs table does not cut
    them, and the id is one `azdistill runs compare` takes."""
    return f"{run_label(config, run_id)} {config.name}"


def stage_run_name(label: str, stage: str) -> str:
    """Name of a stage run, after its pipeline run's label (`run_label`): `data-v3 #1a2b3c / evaluate`."""
    return f"{label} / {stage}"


def pipeline_tags(config: DistillConfig, mode: str = "local") -> dict[str, str]:
    """Tags of a pipeline's parent run: what was distilled into what, on which data, where."""
    return {
        "azdistill.pipeline": config.name,
        "azdistill.task": config.task.type,
        "azdistill.teacher": config.teacher.label,
        "azdistill.student": config.student.model,
        "azdistill.data_version": config.data.version,
        "azdistill.mode": mode,
    }


def evaluation_metrics(report: Any) -> dict[str, float]:
    """What an evaluation logs: `<role>_<metric>` for each model's quality metrics and its cost figures
    (latency per response p50/p95, time to first token p50 and latency per output token p50 where measured, throughput,
    peak memory, parameters, cost per 1,000 answers), and `promote` (1 if every check passed). A figure that was not
    measured (None) is left out by the logging."""
    metrics: dict[str, float] = {}
    for model in report.models:
        metrics.update({f"{model.role}_{name}": value for name, value in model.metrics.items()})
        metrics.update(
            {
                f"{model.role}_latency_p50_s": model.latency_p50_s,
                f"{model.role}_latency_p95_s": model.latency_p95_s,
                f"{model.role}_ttft_p50_s": model.ttft_p50_s,
                f"{model.role}_latency_per_token_p50_s": model.latency_per_token_p50_s,
                f"{model.role}_throughput_tokens_per_s": model.throughput_tokens_per_s,
                f"{model.role}_peak_memory_mb": model.peak_memory_mb,
                f"{model.role}_parameters": model.parameters,
                f"{model.role}_cost_per_1k_answers": model.cost_per_1k_answers,
            }
        )
    metrics["promote"] = float(report.promote)
    return metrics


def is_model_metric(name: str) -> bool:
    """Whether an evaluate-run metric is one of the student's own figures, which its logged model carries:
    `student_<metric>` and its error bars, not the paired tests against the baselines (`student_vs_<role>_...`)."""
    return name.startswith("student_") and not name.startswith("student_vs_")


def rounded(value: float, digits: int = HEADLINE_DIGITS) -> float:
    """`value` to `digits` significant digits: 0.7333333333333333 -> 0.7333."""
    return float(f"{value:.{digits}g}")


def headline_metrics(report: Any, decision: Any = None) -> dict[str, float]:
    """The pipeline run's own metrics, named apart from every stage's and rounded to 4 significant digits:

    - `agreement`: the student's agreement with the teacher on the held-out set;
    - `quality_retained`: the student's primary quality metric over the teacher's;
    - `student_vs_teacher_<ratio>`: each ratio of `report.comparison` (`speedup` and `latency_ratio`: p50 per
      response; `ttft_ratio`, `latency_per_token_ratio`, `param_ratio`, `memory_ratio`, `weights_memory_ratio`,
      `throughput_ratio`, `cost_ratio`), where both figures were measured;
    - `checks_passed`: 1 if the student passed every promotion check, else 0;
    - `promoted`: 1 if the registered student is the champion after the decision, else 0 (only once decided).
    """
    metrics: dict[str, float] = {}
    student = model_of(report, "student")
    if student is not None and is_finite(student.metrics.get("agreement")):
        metrics["agreement"] = student.metrics["agreement"]
    for name, value in comparison(report).items():
        metrics[name if name == "quality_retained" else f"student_vs_teacher_{name}"] = value
    metrics["checks_passed"] = float(report.promote)
    if decision is not None:
        metrics["promoted"] = float(decision.promoted)
    return {name: rounded(value) for name, value in metrics.items() if is_finite(value)}


def run_note(report: Any, decision: Any = None) -> str:
    """The pipeline run's description (Markdown). The MLflow run page shows its first lines and folds the rest, so
    the decision with its reason comes first ("pending" until the student is registered and judged), then the
    student against the teacher side by side (`side_by_side`), then the promotion checks."""
    if decision is None:
        lines = ["**Decision:** pending; it is made when the student is registered, after the evaluation."]
    else:
        summary = decision.summary().strip()
        lines = [f"**Decision: {decision.decision}.** {summary[:1].upper()}{summary[1:].rstrip('.')}."]
    lines += ["", f"**{report.pipeline}**, data version {report.data_version}: the distilled student against its teacher", ""]
    rows = side_by_side(report)
    if rows:
        lines += ["| | teacher | student | student against teacher |", "|---|---:|---:|---|"]
        lines += [f"| {label} | {teacher} | {student} | {versus} |" for label, teacher, student, versus in rows]
        lines.append("")
    failed = failed_check_descriptions(report.checks)
    if not report.checks:
        lines.append("**Promotion checks:** none configured.")
    elif failed:
        lines.append(f"**Promotion checks:** {len(failed)} of {len(report.checks)} failed: {'; '.join(failed)}.")
    else:
        lines.append(f"**Promotion checks:** all {len(report.checks)} passed.")
    lines += ["", "The whole report: `report.html` (with its plot), `report.md` and `report.png` under Artifacts; every "
              "model's figures on the evaluate run."]
    return "\n".join(lines)[:MAX_NOTE_LENGTH]


def side_by_side(report: Any) -> list[tuple[str, str, str, str]]:
    """The note's table, one row per figure: (what, the teacher's, the student's, the student against the teacher).
    Agreement, the primary quality metric and how much of it is kept, latency (per response, which the speedup
    quotes; to the first token and per output token where measured), parameters, size, memory and cost. Empty
    without a teacher and a student row."""
    teacher, student = model_of(report, "teacher"), model_of(report, "student")
    if teacher is None or student is None:
        return []
    ratios = comparison(report)

    def quality(model: Any, metric: str) -> str:
        return format_metric(model.metrics.get(metric), is_fraction_metric(report, metric), metric)

    def figure(value: Any, digits: str = ".3g") -> str:
        return format(value, digits) if is_finite(value) else "n/a"

    def times(ratio: Optional[float], words: str = "the teacher's") -> str:
        return f"{ratio:.2f}x {words}" if is_finite(ratio) else ""

    primary = report.primary_metric
    rows = [("Agreement with the teacher", "—", quality(student, "agreement"), "")]
    if primary != "agreement":
        kept = f"{ratios['quality_retained']:.1%} kept" if "quality_retained" in ratios else ""
        rows.append((f"{metric_label(primary)} (primary metric)", quality(teacher, primary), quality(student, primary), kept))
    speedup = ratios.get("speedup")
    faster = f"{speedup:.2f}x faster" if is_finite(speedup) and speedup >= 1 else times(ratios.get("latency_ratio"), "the teacher's time")
    rows.append(("Latency per response, p50 (s)", figure(teacher.latency_p50_s), figure(student.latency_p50_s), faster))
    for label, name, key in (
        ("Time to first token, p50 (s)", "ttft_p50_s", "ttft_ratio"),
        ("Latency per output token, p50 (s)", "latency_per_token_p50_s", "latency_per_token_ratio"),
    ):
        if is_finite(getattr(student, name)):  # None in reports written before these were timed
            rows.append((label, figure(getattr(teacher, name)), figure(getattr(student, name)), times(ratios.get(key), "the teacher's time")))
    size_ratio = student.size_on_disk_mb / teacher.size_on_disk_mb if is_finite(teacher.size_on_disk_mb) and teacher.size_on_disk_mb else None
    rows += [
        ("Parameters (M)", figure(teacher.parameters / 1e6, ",.1f"), figure(student.parameters / 1e6, ",.1f"), times(ratios.get("param_ratio"))),
        ("Size on disk (MB)", figure(teacher.size_on_disk_mb, ",.1f"), figure(student.size_on_disk_mb, ",.1f"), times(size_ratio)),
        ("Peak memory (MB)", figure(teacher.peak_memory_mb, ",.0f"), figure(student.peak_memory_mb, ",.0f"), times(ratios.get("memory_ratio"))),
        ("Cost per 1,000 answers", figure(teacher.cost_per_1k_answers), figure(student.cost_per_1k_answers), times(ratios.get("cost_ratio"))),
    ]
    return rows
