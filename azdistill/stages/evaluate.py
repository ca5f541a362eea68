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
from azdistill.report import ModelResult, PromotionCheck, Report, headline_lines, write_report
from azdistill.stages import state
from azdistill.tracking import NullTracker, log_evaluation

log = logging.getLogger(__name__)

OUTPUTS = ["report.json", "report.md", "report.png", "predictions"]
ROLE_NAMES = {
    "teacher": "teacher",
    "student": "distilled student",
    "baseline": "baseline: student before distillation",
    "reference_sft": "baseline: student fine-tuned on the reference answers",
}


def model_labels(config: DistillConfig, models: dict[str, Path]) -> dict[str, str]:
    """Row names a person recognises: the teacher's model name, and what each student row is."""
    from azdistill.models import BUILTIN_TEACHER_NAME

    teacher = BUILTIN_TEACHER_NAME if config.teacher.model == "builtin" else Path(config.teacher.model).name
    if config.student.model == "pruned-teacher" and "baseline" in models:
        import json

        layers = json.loads((Path(models["baseline"]) / "config.json").read_text()).get("num_hidden_layers")
        student = f"{teacher}, {layers} layers"
    else:
        student = Path(config.student.model).name
    return {
        "teacher": f"{teacher} (teacher)",
        "student": f"{student} (distilled student)",
        "baseline": f"{student} (before distillation)",
        "reference_sft": f"{student} (trained on references)",
    }


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
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        future = pool.submit(
            measure_model,
            str(path),
            conversations,
            {**{key: getattr(settings, key) for key in ("max_new_tokens", "batch_size", "latency_samples")}, **runtime.model_dump()},
            description,
        )
        return future.result()


def _device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


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
    if teacher.latency_p50_s > 0:
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
    teacher_path: Path,
    models: dict[str, Path],
    tracker: NullTracker = NullTracker(),
    force: bool = False,
    out_dir: Optional[Path] = None,
) -> Report:
    """Answer the test set with the teacher and each model in `models` (role -> folder); write the report."""
    out_dir = Path(out_dir or config.stage_dir("evaluate"))
    records = read_records(config.data.test, config.task.type, config.data.max_records)
    conversations = [record.prompt for record in records]
    references = [record.reference for record in records]
    all_models = {"teacher": teacher_path, **models}
    stage_fingerprint = state.fingerprint(
        {
            "test": state.file_digest(config.data.test),
            "max_records": config.data.max_records,
            "task": config.task.model_dump(),
            "models": {role: state.folder_digest(path) for role, path in all_models.items()},
            "evaluation": config.evaluation.model_dump(exclude={"promotion"}),
        }
    )
    resumed = False
    if force or not state.is_done(out_dir, stage_fingerprint):
        resumed = state.begin(out_dir, stage_fingerprint, force)
    predictions_dir = out_dir / "predictions"
    with tracker.stage("evaluate"):
        measured: dict[str, dict] = {}
        for role, path in all_models.items():
            cached = predictions_dir / f"{role}.json"
            if cached.is_file():
                import json

                measured[role] = json.loads(cached.read_text())
                if resumed:
                    log.info("evaluate: reusing the %s's answers from the interrupted run", role)
                continue
            log.info("evaluate: %s (%s) answers %d held-out prompts", ROLE_NAMES[role], path, len(conversations))
            measured[role] = _measure_in_child(path, conversations, config.evaluation, config.runtime, role)
            write_json(cached, {"path": str(path), **measured[role]})

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
            results[role] = ModelResult(
                role=role,
                name=labels[role],
                path=str(all_models[role]),
                parameters=data["parameters"],
                size_on_disk_mb=data["size_on_disk_bytes"] / 2**20,
                weights_memory_mb=data["weights_bytes"] / 2**20,
                peak_memory_mb=data["peak_memory_bytes"] / 2**20,
                latency_p50_s=percentile(data["latencies_s"], 50),
                latency_p95_s=percentile(data["latencies_s"], 95),
                throughput_tokens_per_s=data["throughput_tokens_per_s"],
                n=len(data["answers"]),
                metrics=metrics,
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
        state.finish(out_dir, stage_fingerprint, OUTPUTS, {"promote": report.promote})
    for line in headline_lines(report):
        log.info("%s", line)
    return report


def load_report(out_dir: Path) -> Report:
    import json

    from azdistill.report import report_from_dict

    return report_from_dict(json.loads((Path(out_dir) / "report.json").read_text()))
