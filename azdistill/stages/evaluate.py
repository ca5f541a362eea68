"""Evaluate: teacher, distilled student and baselines answer the held-out set; quality, speed, memory, size.

Each model is measured in a fresh process, so its peak memory is its own and not the high-water mark of
whatever ran before it in this process. Latency per response is timed with prompts answered one at a
time; throughput with the whole set answered in batches (those answers are the ones scored).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from azdistill.config.schema import DistillConfig
from azdistill.data import digests
from azdistill.data.files import write_json
from azdistill.data.records import read_records
from azdistill.evaluation.markdown import headline_lines
from azdistill.evaluation.measure import (
    _device_description,
    _measure_in_child,
    _megabytes,
    local_cost_per_1k_answers,
    measure_hosted,
    measure_logged,
)
from azdistill.evaluation.metrics import TASK_METRICS, percentile, score_predictions
from azdistill.evaluation.promotion import promotion_checks
from azdistill.evaluation.publish import write_report
from azdistill.evaluation.report import ModelResult, Report
from azdistill.stages import state
from azdistill.tracking.tracker import NullTracker, log_evaluation

log = logging.getLogger(__name__)


OUTPUTS = ["report.json", "report.md", "report.png", "predictions"]
# What a rerun under other settings removes. The predictions stay: each model's answers carry the key of what they
# depend on (`measurement_key`) and are reused while it holds, whatever else (thresholds, prices) changed.
OWNED = ["report.json", "report.md", "report.png"]
ROLE_NAMES = {
    "teacher": "teacher",
    "student": "distilled student",
    "baseline": "baseline: student before distillation",
    "reference_sft": "baseline: student fine-tuned on the reference answers",
}


def model_labels(config: DistillConfig, models: dict[str, Optional[Path]]) -> dict[str, str]:
    """Row names a person recognises: the teacher's model name, and what each student row is."""
    from azdistill.models.builtin import BUILTIN_TEACHER_NAME

    teacher_config = config.teacher
    if teacher_config.kind == "local":
        teacher = BUILTIN_TEACHER_NAME if teacher_config.model == "builtin" else Path(teacher_config.model).name
        teacher_row = f"{teacher} (teacher)"
    elif teacher_config.kind == "logged":
        teacher = "logged answers"
        teacher_row = "logged answers (teacher)"
    else:
        teacher = teacher_config.deployment if teacher_config.kind == "azure_openai" else teacher_config.model
        teacher = str(teacher).rstrip("/").rsplit("/", 1)[-1]  # meta-llama/Llama-3.1-405B-Instruct, or a served folder's path
        teacher_row = f"{teacher} (teacher, {teacher_config.kind} endpoint)"
    if config.student.model == "pruned-teacher" and models.get("baseline"):
        import json

        from azdistill.models.builtin import BUILTIN_TEACHER_NAME as builtin
        from azdistill.models.files import weights_folder

        layers = json.loads((weights_folder(Path(models["baseline"])) / "config.json").read_text()).get("num_hidden_layers")
        local = teacher_config.weights
        student = f"{builtin if local == 'builtin' else Path(str(local)).name}, {layers} layers"
    else:
        student = Path(config.student.model).name
    return {
        "teacher": teacher_row,
        "student": f"{student} (distilled student)",
        "baseline": f"{student} (before distillation)",
        "reference_sft": f"{student} (trained on references)",
    }


def teacher_identity(config: DistillConfig, teacher_path: Optional[Path]) -> str:
    """What the teacher row's answers depend on: a local teacher's weights, or which endpoint and model answer."""
    if config.teacher.kind == "local":
        assert teacher_path is not None, "a local teacher is evaluated from its folder"
        return digests.folder_digest(teacher_path)
    return digests.fingerprint(config.teacher.model_dump(include={"kind", "endpoint", "model", "deployment", "api_version"}))


def evaluate(
    config: DistillConfig,
    teacher_path: Optional[Path],
    models: dict[str, Path],
    tracker: NullTracker = NullTracker(),
    force: bool = False,
    out_dir: Optional[Path] = None,
) -> Report:
    """Answer the test set with the teacher and each model in `models` (role -> folder); write the report.

    A local teacher answers from `teacher_path`; a hosted one through its endpoint (see `measure_hosted`); a
    logged one with the test split's logged answers.
    """
    out_dir = Path(out_dir or config.stage_dir("evaluate"))
    records = read_records(config.data.test, config.task.type, config.data.max_records)
    conversations = [record.prompt for record in records]
    references = [record.reference for record in records]
    all_models: dict[str, Optional[Path]] = {"teacher": teacher_path if config.teacher.kind == "local" else None, **models}
    import json

    identities = {
        role: teacher_identity(config, path) if role == "teacher" else digests.folder_digest(path)  # type: ignore[arg-type]
        for role, path in all_models.items()
    }
    answers_depend_on = {
        "test": digests.file_digest(config.data.test),
        "max_records": config.data.max_records,
        "task": config.task.type,
        "evaluation": config.evaluation.model_dump(include={"max_new_tokens", "batch_size", "latency_samples"}),
        "runtime": config.runtime.model_dump(),
    }
    stage_fingerprint = digests.fingerprint(
        {
            **answers_depend_on,
            "task": config.task.model_dump(),
            "models": identities,
            "evaluation": config.evaluation.model_dump(),
            "prices": config.teacher.model_dump(include={"price_per_million_prompt_tokens", "price_per_million_completion_tokens"}),
        }
    )
    if not force and state.is_done(out_dir, stage_fingerprint, "evaluate"):
        log.info("evaluate: models, data and settings unchanged, reusing %s (use --force to rerun)", out_dir)
        report = load_report(out_dir)
        for line in headline_lines(report):
            log.info("%s", line)
        return report
    state.begin(out_dir, stage_fingerprint, force, "evaluate", OWNED)
    predictions_dir = out_dir / "predictions"
    for stale in predictions_dir.glob("*.json"):
        if stale.stem not in all_models:
            stale.unlink()  # a model no longer evaluated (e.g. reference_baseline turned off)
    with tracker.stage("evaluate"):
        measured: dict[str, dict] = {}
        for role, path in all_models.items():
            cached = predictions_dir / f"{role}.json"
            key = digests.fingerprint({**answers_depend_on, "model": identities[role]})
            if not force and cached.is_file():
                try:
                    previous = json.loads(cached.read_text())
                except ValueError:
                    previous = {}  # cut short by a kill: measured again
                if previous.get("key") == key:
                    measured[role] = previous
                    log.info("evaluate: reusing the %s's answers (model, data and evaluation settings unchanged)", role)
                    continue
            if path is None:
                where = config.teacher.label
                log.info("evaluate: %s (%s) answers %d held-out prompts", ROLE_NAMES[role], where, len(conversations))
                measured[role] = measure_logged(records) if config.teacher.kind == "logged" else measure_hosted(config, conversations)
            else:
                log.info("evaluate: %s (%s) answers %d held-out prompts", ROLE_NAMES[role], path, len(conversations))
                measured[role] = _measure_in_child(path, conversations, config.evaluation, config.runtime, role)
            write_json(cached, {"path": str(path) if path is not None else config.teacher.label, "key": key, **measured[role]})

        teacher_answers = measured["teacher"]["answers"]
        has_references = any(reference is not None for reference in references)
        primary = TASK_METRICS[config.task.type][0] if has_references else "agreement"
        results: dict[str, ModelResult] = {}
        labels = model_labels(config, all_models)
        for role, data in measured.items():
            metrics = score_predictions(
                config.task.type,
                data["answers"],
                references,
                None if role == "teacher" else teacher_answers,
                config.task.labels,
            )
            hosted = bool(data.get("hosted"))
            cost = data.get("cost_per_1k_answers") if hosted else local_cost_per_1k_answers(config.evaluation, data["seconds"], len(data["answers"]))
            results[role] = ModelResult(
                role=role,
                name=labels[role],
                path=str(all_models[role]) if all_models[role] is not None else config.teacher.label,
                parameters=data["parameters"],
                size_on_disk_mb=_megabytes(data["size_on_disk_bytes"]),
                weights_memory_mb=_megabytes(data["weights_bytes"]),
                peak_memory_mb=_megabytes(data["peak_memory_bytes"]),
                latency_p50_s=percentile(data["latencies_s"], 50) if data["latencies_s"] else float("nan"),
                latency_p95_s=percentile(data["latencies_s"], 95) if data["latencies_s"] else float("nan"),
                throughput_tokens_per_s=data["throughput_tokens_per_s"],
                n=len(data["answers"]),
                metrics=metrics,
                cost_per_1k_answers=cost,
                hosted=hosted,
            )
        checks = promotion_checks(config, results, primary)
        samples = [
            {
                "prompt": conversations[index][-1]["content"],
                "reference": references[index],
                **{role: measured[role]["answers"][index] for role in measured},
            }
            for index in range(min(5, len(records)))
        ]
        report = Report(
            pipeline=config.name,
            task=config.task.type,
            data_version=config.data.version,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            primary_metric=primary,
            models=[results[role] for role in ("teacher", "student", "baseline", "reference_sft") if role in results],
            promote=all(check.passed for check in checks),
            checks=checks,
            device=_device_description(),
            samples=samples,
        )
        paths = write_report(report, out_dir)
        log_evaluation(tracker, report, paths)  # metric names shared by every retrain: see tracking.py
        tracker.log_artifact(predictions_dir, "predictions")
        state.finish(out_dir, stage_fingerprint, OUTPUTS, {"promote": report.promote}, stage="evaluate")
    for line in headline_lines(report):
        log.info("%s", line)
    return report


def load_report(out_dir: Path) -> Report:
    import json

    from azdistill.evaluation.report import report_from_dict

    return report_from_dict(json.loads((Path(out_dir) / "report.json").read_text()))
