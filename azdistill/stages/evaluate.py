"""Evaluate: teacher, distilled student and baselines answer the held-out set; quality, speed, memory, size.

Each model is measured in a fresh process, so its peak memory is its own and not the high-water mark of
whatever ran before it in this process. Latency is timed with prompts answered one at a time (per response, to
the first token, per output token); throughput with the whole set answered in batches (those answers are the
ones scored). Served models (`evaluation.served`) answer through their endpoints, as a hosted teacher does, one
report row each.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from azdistill.config.evaluation import ServedModelConfig
from azdistill.config.schema import DistillConfig, label_method
from azdistill.data import digests
from azdistill.data.files import write_json
from azdistill.data.records import read_records
from azdistill.evaluation.engines import engine_on_this_machine
from azdistill.evaluation.markdown import headline_lines
from azdistill.evaluation.measure import (
    device_description,
    hosted_cost_per_1k_answers,
    latency_figures,
    local_cost_per_1k_answers,
    measure_hosted,
    measure_in_child,
    measure_logged,
    megabytes,
)
from azdistill.evaluation.metrics import TASK_METRICS, ItemScores, item_scores
from azdistill.evaluation.promotion import promotion_checks
from azdistill.evaluation.publish import write_report
from azdistill.evaluation.report import ModelResult, Report, report_from_dict
from azdistill.evaluation.stats import metric_intervals, student_comparisons
from azdistill.stages import state
from azdistill.stages.judging import judge_student
from azdistill.teachers.factory import endpoint_identity
from azdistill.tracking.tracker import NullTracker, log_evaluation

log = logging.getLogger(__name__)


OUTPUTS = ["report.json", "report.md", "report.html", "report.png", "predictions"]
# What a rerun under other settings removes. The predictions stay: each model's answers carry the key of what they
# depend on (`measurement_key`) and are reused while it holds, whatever else (thresholds, prices) changed.
OWNED = ["report.json", "report.md", "report.html", "report.png"]
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
        **{served.role: served.name for served in config.evaluation.served},
    }


def teacher_identity(config: DistillConfig, teacher_path: Optional[Path]) -> str:
    """What the teacher row's answers depend on: a local teacher's weights, or which endpoint and model answer."""
    if config.teacher.kind == "local":
        assert teacher_path is not None, "a local teacher is evaluated from its folder"
        return digests.folder_digest(teacher_path)
    return endpoint_identity(config.teacher)


def served_models(config: DistillConfig) -> dict[str, tuple[int, ServedModelConfig]]:
    """The served models of `evaluation.served` by role, with their place in that list (their key is
    `evaluation.served.<place>`)."""
    return {served.role: (index, served) for index, served in enumerate(config.evaluation.served)}


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
    logged one with the test split's logged answers. A local model answers the quality prompts with the engine
    `evaluation.engine` resolves to here (vLLM or transformers), checked before anything is loaded.
    """
    # Resolved first: evaluation.engine vllm on a machine without vLLM or a GPU stops here, before any model loads.
    engine = engine_on_this_machine(config.evaluation.engine)
    out_dir = Path(out_dir or config.stage_dir("evaluate"))
    records = read_records(config.data.test, config.task.type, config.data.max_records)
    all_models: dict[str, Optional[Path]] = {"teacher": teacher_path if config.teacher.kind == "local" else None, **models}
    all_models.update({role: None for role in served_models(config)})  # answered through their endpoints
    identities = _model_identities(config, all_models)
    engines = {role: _engine_of(config, role, path, engine) for role, path in all_models.items()}
    answers_depend_on = _what_answers_depend_on(config)
    stage_fingerprint = _stage_fingerprint(config, answers_depend_on, identities, engines)
    if not force and state.is_done(out_dir, stage_fingerprint, "evaluate"):
        log.info("evaluate: models, data and settings unchanged, reusing %s (use --force to rerun)", out_dir)
        report = load_report(out_dir)
        _log_headline(report)
        return report
    state.begin(out_dir, stage_fingerprint, force, "evaluate", OWNED)
    predictions_dir = out_dir / "predictions"
    _remove_stale_predictions(predictions_dir, {**all_models, "judge": None})  # judge.json: the judge's verdicts
    with tracker.stage("evaluate"):
        measured: dict[str, dict] = {}
        for role, path in all_models.items():
            key = digests.fingerprint({**answers_depend_on, "model": identities[role], **_vllm_mark(engines[role])})
            measured[role] = _answers_of(config, role, path, records, predictions_dir / f"{role}.json", key, force, engines[role])
        report = _build_report(config, all_models, measured, records)
        report.judge = judge_student(
            config, teacher_path, records, measured, identities["teacher"], predictions_dir, tracker, force
        )
        paths = write_report(report, out_dir)
        log_evaluation(tracker, report, paths)  # metric names shared by every retrain: see tracking.py
        tracker.log_artifact(predictions_dir, "predictions")
        state.finish(out_dir, stage_fingerprint, OUTPUTS, {"promote": report.promote}, stage="evaluate")
    _log_headline(report)
    return report


def _model_identities(config: DistillConfig, all_models: dict[str, Optional[Path]]) -> dict[str, str]:
    """Per role, what its answers depend on on the model's side: the digest of its folder (the teacher's: see
    `teacher_identity`; a served model's: its endpoint, see `endpoint_identity`)."""
    served = served_models(config)
    identities = {}
    for role, path in all_models.items():
        if role == "teacher":
            identities[role] = teacher_identity(config, path)
            if label_method(config) is not None:  # its answers are labels chosen this way, not free answers
                identities[role] += f"+labels:{label_method(config)}"
        elif role in served:
            identities[role] = endpoint_identity(served[role][1])
        else:
            identities[role] = digests.folder_digest(path)  # type: ignore[arg-type]
    return identities


def _engine_of(config: DistillConfig, role: str, path: Optional[Path], engine: str) -> Optional[str]:
    """What answers a row's quality prompts: `engine` (resolved) for a local model, transformers for a teacher that
    scores the labels (vLLM has no counterpart of that scoring), None for a model answering through an endpoint or
    from logged answers."""
    if path is None or role in served_models(config):
        return None
    return "transformers" if role == "teacher" and label_method(config) == "scores" else engine


def _vllm_mark(engine: Optional[str]) -> dict:
    """What the engine adds to a fingerprint: nothing for transformers, so answers and runs from before the engine
    could be chosen stay valid; vLLM's answers and throughput are its own, so answers by it are keyed apart."""
    return {"engine": "vllm"} if engine == "vllm" else {}


def _what_answers_depend_on(config: DistillConfig) -> dict:
    """The data and settings every model's answers depend on; a model's saved answers are reused while these and
    its identity are the same."""
    return {
        "test": digests.file_digest(config.data.test),
        "max_records": config.data.max_records,
        "task": config.task.type,
        "evaluation": config.evaluation.model_dump(include={"max_new_tokens", "batch_size", "latency_samples"}),
        "runtime": config.runtime.model_dump(),
    }


def _stage_fingerprint(
    config: DistillConfig, answers_depend_on: dict, identities: dict[str, str], engines: dict[str, Optional[str]]
) -> str:
    """What the whole report depends on: the answers' inputs, and also the thresholds, metrics and prices that
    only change how the answers are scored and judged."""
    # The engine enters as resolved (`_vllm_mark`), not as asked: auto on a machine without vLLM is transformers.
    excluded = {"engine"} if config.evaluation.served else {"engine", "served"}
    return digests.fingerprint(
        {
            **answers_depend_on,
            **_vllm_mark("vllm" if "vllm" in engines.values() else None),
            "task": config.task.model_dump(),
            "models": identities,
            # Without served models the fingerprint stays what it was before they existed, so finished runs stay done.
            "evaluation": config.evaluation.model_dump(exclude=excluded),
            "prices": config.teacher.model_dump(
                include={"price_per_million_prompt_tokens", "price_per_million_completion_tokens"}
            ),
        }
    )


def _remove_stale_predictions(predictions_dir: Path, all_models: dict[str, Optional[Path]]) -> None:
    """Delete the saved answers of a model no longer evaluated (e.g. reference_baseline turned off)."""
    for stale in predictions_dir.glob("*.json"):
        if stale.stem not in all_models:
            stale.unlink()


def _answers_of(
    config: DistillConfig, role: str, path: Optional[Path], records: list, cached: Path, key: str, force: bool,
    engine: Optional[str] = None,
) -> dict:
    """One model's answers and measurements: the saved ones in `cached` while their `key` holds, else measured
    afresh (a local model's quality prompts answered by `engine`) and saved there."""
    if not force:
        previous = state.saved_under_key(cached, key)
        if previous is not None:
            log.info("evaluate: reusing the %s's answers (model, data and evaluation settings unchanged)", role)
            return previous
    measured = _measure(config, role, path, records, engine)
    write_json(cached, {"path": _where(config, role, path), "key": key, **measured})
    return measured


def _where(config: DistillConfig, role: str, path: Optional[Path]) -> str:
    """Where a model's answers come from, as its report row and saved answers say: its folder, the hosted or
    logged teacher, or a served model's kind, model and endpoint."""
    if path is not None:
        return str(path)
    served = served_models(config).get(role)
    if served is not None:
        return f"{served[1].label} at {served[1].endpoint}"
    return config.teacher.label


def _measure(config: DistillConfig, role: str, path: Optional[Path], records: list, engine: Optional[str] = None) -> dict:
    """Measure one model: a local one in a child process, its quality prompts answered by `engine` (resolved:
    transformers or vllm); a teacher without a folder through its endpoint, or from the logged answers."""
    conversations = [record.prompt for record in records]
    served = served_models(config).get(role)
    if served is not None:
        index, endpoint = served
        log.info("evaluate: %s (%s) answers %d held-out prompts", endpoint.name, _where(config, role, path), len(conversations))
        return measure_hosted(config, conversations, endpoint.name, endpoint, key_path=f"evaluation.served.{index}")
    if path is None:
        where = config.teacher.label
        log.info("evaluate: %s (%s) answers %d held-out prompts", ROLE_NAMES[role], where, len(conversations))
        return measure_logged(records) if config.teacher.kind == "logged" else measure_hosted(config, conversations)
    log.info("evaluate: %s (%s) answers %d held-out prompts", ROLE_NAMES[role], path, len(conversations))
    # A teacher that synthesis constrained to the labels answers the held-out prompts the same way; students generate.
    labels = list(config.task.labels or []) if role == "teacher" and label_method(config) == "scores" else None
    settings = config.evaluation.model_copy(update={"engine": engine or "transformers"})
    return measure_in_child(path, conversations, settings, config.runtime, role, labels)


def _build_report(
    config: DistillConfig, all_models: dict[str, Optional[Path]], measured: dict[str, dict], records: list
) -> Report:
    """Score every model's answers, run the promotion checks on the scores, and gather it all into the report."""
    references = [record.reference for record in records]
    teacher_answers = measured["teacher"]["answers"]
    has_references = any(reference is not None for reference in references)
    primary = TASK_METRICS[config.task.type][0] if has_references else "agreement"
    labels = model_labels(config, all_models)
    scores = {
        # The teacher's row is scored against the references only: agreement is with the teacher's answers.
        role: item_scores(
            config.task.type, data["answers"], references, None if role == "teacher" else teacher_answers, config.task.labels
        )
        for role, data in measured.items()
    }
    results = {
        role: _model_result(config, role, labels[role], all_models[role], data, scores[role]) for role, data in measured.items()
    }
    checks = promotion_checks(config, results, primary)  # on the teacher, student and baseline rows only
    # The served rows sit right after the student: most often they are that student, as a client reaches it.
    order = ["teacher", "student", *served_models(config), "baseline", "reference_sft"]
    return Report(
        pipeline=config.name,
        task=config.task.type,
        data_version=config.data.version,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        primary_metric=primary,
        models=[results[role] for role in order if role in results],
        promote=all(check.passed for check in checks),
        checks=checks,
        device=_measured_on(measured),
        samples=_samples(records, measured),
        comparisons=student_comparisons(scores, primary),  # is the student's lead over each baseline real?
        champion_metric=config.evaluation.promotion.champion_metric,  # what the registry will compare it on
    )


def _model_result(
    config: DistillConfig,
    role: str,
    name: str,
    path: Optional[Path],
    data: dict,
    scores: dict[str, ItemScores],
) -> ModelResult:
    """One row of the report: a model's scores with their 95% intervals (`scores`: its metrics item by item), speed,
    memory, size and cost from its measurements."""
    hosted, parameters = bool(data.get("hosted")), data["parameters"]
    if hosted and "prompt_tokens" in data:
        # Through an endpoint: priced and declared from the config now, so a price or count changed since still counts.
        served = served_models(config).get(role)
        endpoint = served[1] if served is not None else config.teacher
        cost = hosted_cost_per_1k_answers(endpoint, data["prompt_tokens"], data["generated_tokens"], len(data["answers"]))
        parameters = endpoint.parameters or 0
    elif hosted:  # the logged answers: nothing was paid for here
        cost = data.get("cost_per_1k_answers")
    else:
        cost = local_cost_per_1k_answers(config.evaluation, data["seconds"], len(data["answers"]))
    return ModelResult(
        role=role,
        name=name,
        path=_where(config, role, path),
        parameters=parameters,
        size_on_disk_mb=megabytes(data["size_on_disk_bytes"]),
        weights_memory_mb=megabytes(data["weights_bytes"]),
        peak_memory_mb=megabytes(data["peak_memory_bytes"]),
        **latency_figures(data),  # per response (p50, p95), to the first token, per output token
        throughput_tokens_per_s=data["throughput_tokens_per_s"],
        n=len(data["answers"]),
        metrics={name: items.value for name, items in scores.items()},
        cost_per_1k_answers=cost,
        hosted=hosted,
        intervals=metric_intervals(scores),
        engine=data.get("engine"),  # None: answered through an endpoint, logged, or saved before engines were recorded
    )


ENGINE_NAMES = {"vllm": "vLLM", "transformers": "transformers"}


def _measured_on(measured: dict[str, dict]) -> str:
    """The report's device line: the device, and which engine answered the local models' quality prompts, with the
    rows of each where they differ (a teacher that scores the labels stays with transformers)."""
    by_engine: dict[str, list[str]] = {}
    for role, data in measured.items():
        if data.get("engine"):
            by_engine.setdefault(data["engine"], []).append(role)
    device = device_description()
    if not by_engine:
        return device
    if len(by_engine) == 1:
        (engine,) = by_engine
        answered = ENGINE_NAMES.get(engine, engine)
    else:  # vLLM first, then transformers
        rows = sorted(by_engine.items(), reverse=True)
        answered = " and ".join(f"{ENGINE_NAMES.get(engine, engine)} ({', '.join(roles)})" for engine, roles in rows)
    return f"{device}; answers by {answered}" + (", latency timed with transformers" if "vllm" in by_engine else "")


def _samples(records: list, measured: dict[str, dict]) -> list[dict]:
    """The first few held-out prompts with the reference and every model's answer, for the report to show."""
    return [
        {
            "prompt": records[index].prompt[-1]["content"],
            "reference": records[index].reference,
            **{role: measured[role]["answers"][index] for role in measured},
        }
        for index in range(min(5, len(records)))
    ]


def _log_headline(report: Report) -> None:
    """End the stage with the report's few summary lines in the log."""
    for line in headline_lines(report):
        log.info("%s", line)


def load_report(out_dir: Path) -> Report:
    """The report an earlier run wrote to `out_dir`, for a rerun that finds nothing changed."""
    return report_from_dict(json.loads((Path(out_dir) / "report.json").read_text()))
