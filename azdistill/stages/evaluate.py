"""Evaluate: teacher, distilled student and baselines answer the held-out set; quality, speed, memory, size.

Each model is measured in a fresh process, so its peak memory is its own and not the high-water mark of
whatever ran before it in this process. Latency per response is timed with prompts answered one at a
time; throughput with the whole set answered in batches (those answers are the ones scored).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

from azdistill.config import DistillConfig, EvaluationConfig, RuntimeConfig
from azdistill.data import Message, read_records, write_json
from azdistill.metrics import TASK_METRICS, percentile, score_predictions
from azdistill.errors import StageFailed, UserError
from azdistill.report import ModelResult, PromotionCheck, Report, headline_lines, write_report
from azdistill.stages import state
from azdistill.tracking import NullTracker, log_evaluation

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
    from azdistill.models import BUILTIN_TEACHER_NAME

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

        from azdistill.models import BUILTIN_TEACHER_NAME as builtin, weights_folder

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
        return state.folder_digest(teacher_path)
    return state.fingerprint(config.teacher.model_dump(include={"kind", "endpoint", "model", "deployment", "api_version"}))


def measure_hosted(config: DistillConfig, conversations: list[list[Message]], description: str = "teacher") -> dict:
    """Measure a hosted teacher as a client sees it, through the same client that synthesized the data.

    Latency per response: the first `latency_samples` prompts sent one at a time. Quality: every prompt answered
    with the endpoint's concurrency (greedy, evaluation.max_new_tokens), whose tokens/s is the throughput. Cost:
    the configured token prices times the tokens the endpoint counted. Size and memory cannot be measured for a
    hosted model: they stay empty (the report says "hosted"), parameters are the declared count if any.
    """
    from azdistill.endpoints import RecordRejected, build_endpoint_teacher
    from azdistill.progress import Progress

    evaluation = config.evaluation
    greedy = config.synthesis.model_copy(
        update={"max_new_tokens": evaluation.max_new_tokens, "temperature": 0.0, "top_p": 1.0, "top_logprobs": 0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_cost": None}
    )
    teacher = build_endpoint_teacher(config.model_copy(update={"synthesis": greedy}))
    try:
        latencies: list[float] = []
        timed = conversations[: evaluation.latency_samples]
        with Progress(len(timed), f"latency {description} (endpoint)", unit="answers") as progress:
            for messages in timed:
                started = time.perf_counter()
                try:
                    teacher.complete(messages)
                except RecordRejected:
                    pass  # a refused prompt tells nothing about latency
                else:
                    latencies.append(time.perf_counter() - started)
                progress.update(1)
        started = time.perf_counter()
        with Progress(len(conversations), f"answer {description} (endpoint)", unit="answers") as progress:
            completions = []
            for start in range(0, len(conversations), teacher.batch_size):
                completions += teacher.answer(conversations[start : start + teacher.batch_size])
                progress.update(len(completions) - progress.count)
        seconds = time.perf_counter() - started
    finally:
        teacher.close()
    refused = [completion for completion in completions if completion.finish_reason.startswith("refused")]
    if len(refused) == len(conversations):
        raise StageFailed(
            f"evaluate: the teacher endpoint answered none of the {len(conversations)} held-out prompts; first: "
            f"{refused[0].finish_reason}"
        )
    if refused:
        log.warning("evaluate: the teacher endpoint refused %d of %d held-out prompts (scored as empty answers)", len(refused), len(conversations))
    prompt_tokens = sum(completion.prompt_tokens for completion in completions)
    generated_tokens = sum(completion.completion_tokens for completion in completions)
    priced = config.teacher.price_per_million_prompt_tokens is not None or config.teacher.price_per_million_completion_tokens is not None
    cost = teacher.budget.cost(prompt_tokens, generated_tokens) if priced else None
    return {
        "answers": [completion.text for completion in completions],
        "latencies_s": latencies,
        "throughput_tokens_per_s": generated_tokens / seconds if seconds > 0 else 0.0,
        "generated_tokens": generated_tokens,
        "prompt_tokens": prompt_tokens,
        "seconds": seconds,
        "parameters": config.teacher.parameters or 0,
        "weights_bytes": None,
        "peak_memory_bytes": None,
        "size_on_disk_bytes": None,
        "device": "hosted",
        "hosted": True,
        "refused": len(refused),
        "cost": cost,
        "cost_per_1k_answers": cost / len(conversations) * 1000 if cost is not None else None,
        "endpoint": teacher.stats.as_dict(),
    }


def measure_logged(records: list) -> dict:
    """`teacher.kind: logged`: the teacher's answers are the logged ones in the test split; nothing is timed."""
    answers = [record.reference or "" for record in records]
    if not any(answers):
        raise UserError("evaluate: teacher.kind logged takes the teacher's answers from the test split, and none of its records has one")
    return {
        "answers": answers, "latencies_s": [], "throughput_tokens_per_s": float("nan"), "generated_tokens": 0, "seconds": 0.0,
        "parameters": 0, "weights_bytes": None, "peak_memory_bytes": None, "size_on_disk_bytes": None, "device": "logged",
        "hosted": True, "cost_per_1k_answers": None,
    }


def local_cost_per_1k_answers(settings: EvaluationConfig, seconds: float, answers: int) -> Optional[float]:
    """A local model's cost per 1,000 answers: the serving machine's hourly price over the measured answering time."""
    if settings.serving_price_per_hour is None or not answers:
        return None
    return settings.serving_price_per_hour * seconds / 3600 / answers * 1000


def measure_model(path: str, conversations: list[list[Message]], settings: dict, description: str) -> dict:
    """Load one model and answer every conversation; runs in a child process (see module docstring)."""
    import psutil

    from azdistill.cli import configure_logging
    from azdistill.determinism import make_repeatable
    from azdistill.generation import GenerationSettings, generate_in_batches, timed_single_answers
    from azdistill.models import count_parameters, load_model, load_tokenizer, pick_device, size_on_disk, weights_bytes
    from azdistill.progress import Progress

    configure_logging()
    import torch

    make_repeatable(0, settings["threads"], settings["deterministic"])  # answers are greedy: the seed is for form's sake
    device = pick_device()
    before_load = psutil.Process().memory_info().rss
    tokenizer = load_tokenizer(Path(path))
    model = load_model(Path(path), device).eval()
    generation = GenerationSettings(max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"])

    timed = conversations[: settings["latency_samples"]]
    with Progress(len(timed), f"latency {description}", unit="answers") as progress:
        latencies = timed_single_answers(model, tokenizer, timed, generation, progress)

    answers: list[Optional[str]] = [None] * len(conversations)
    generated_tokens = 0
    started = time.perf_counter()
    with Progress(len(conversations), f"answer {description}", unit="answers") as progress:
        for batch in generate_in_batches(model, tokenizer, conversations, generation):
            for index, completion in batch:
                answers[index] = completion.text
                generated_tokens += completion.completion_tokens
            progress.update(len(batch))
    seconds = time.perf_counter() - started

    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        # Subtract what the process held before loading the model (interpreter, torch), so the figure is the model's.
        peak = peak_resident_bytes() - before_load
    return {
        "answers": answers,
        "latencies_s": latencies,
        "throughput_tokens_per_s": generated_tokens / seconds if seconds > 0 else 0.0,
        "generated_tokens": generated_tokens,
        "seconds": seconds,
        "parameters": count_parameters(model),
        "weights_bytes": weights_bytes(model),
        "peak_memory_bytes": max(peak, 0),
        "size_on_disk_bytes": size_on_disk(Path(path)),
        "device": device,
    }


def peak_resident_bytes() -> int:
    """This process's peak resident memory.

    Read from VmHWM, which starts afresh with the process image; ru_maxrss would not do: Linux carries it over
    from the parent across fork and exec, so every child would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss  # no /proc: current resident memory is the best we have


def _measure_in_child(
    path: Path, conversations: list[list[Message]], settings: EvaluationConfig, runtime: RuntimeConfig, description: str
) -> dict:
    # "spawn" gives a clean process (no copy of the parent's models or torch threads) and exact peak memory.
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        future = pool.submit(
            measure_model,
            str(path),
            conversations,
            {**{key: getattr(settings, key) for key in ("max_new_tokens", "batch_size", "latency_samples")}, **runtime.model_dump()},
            description,
        )
        return future.result()


def _die_with_parent(parent: int) -> None:
    """Make the measuring child end when azdistill does: killed with SIGKILL, the parent cannot stop its pool, and
    the child would otherwise wait forever holding a model in memory (seen after the kill-at-random test)."""
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return  # not Linux: the child still ends when its work is done
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def _megabytes(value: Optional[int]) -> float:
    return float("nan") if value is None else value / 2**20


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
        role: teacher_identity(config, path) if role == "teacher" else state.folder_digest(path)  # type: ignore[arg-type]
        for role, path in all_models.items()
    }
    answers_depend_on = {
        "test": state.file_digest(config.data.test),
        "max_records": config.data.max_records,
        "task": config.task.type,
        "evaluation": config.evaluation.model_dump(include={"max_new_tokens", "batch_size", "latency_samples"}),
        "runtime": config.runtime.model_dump(),
    }
    stage_fingerprint = state.fingerprint(
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
            key = state.fingerprint({**answers_depend_on, "model": identities[role]})
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

    from azdistill.report import report_from_dict

    return report_from_dict(json.loads((Path(out_dir) / "report.json").read_text()))
