"""Recurring retrains: Azure ML job schedules running the retrain pipeline (pipelines/retrain.py).

The retrain pipeline resolves its data assets when each triggered job runs, so every run trains on the latest
versions, and its register step promotes the new student only if it beats the champion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from azdistill.azure.build import build_pipeline
from azdistill.azure.submit import output_folder, validate_job, write_job_yaml
from azdistill.config.azure import ScheduleConfig
from azdistill.config.schema import DistillConfig
from azdistill.errors import UserError


def schedule_settings(config: DistillConfig) -> ScheduleConfig:
    if config.azure is None or config.azure.schedule is None:
        raise UserError(
            "no schedule in the config: add azure.schedule, e.g. `schedule: {cron: '0 3 * * 1', time_zone: UTC}` "
            "or `schedule: {frequency: week, interval: 1, week_days: [monday], hours: [3], minutes: [0]}`"
        )
    return config.azure.schedule


def schedule_name(config: DistillConfig) -> str:
    return schedule_settings(config).name or f"{config.name}-retrain"


def make_trigger(settings: ScheduleConfig) -> Any:
    """A CronTrigger or RecurrenceTrigger in the schedule's time zone."""
    from azure.ai.ml.constants import TimeZone
    from azure.ai.ml.entities import CronTrigger, RecurrencePattern, RecurrenceTrigger

    zones = {zone.value for zone in TimeZone}
    if settings.time_zone not in zones:
        raise UserError(
            f"azure.schedule.time_zone: '{settings.time_zone}' is not a Windows time zone name Azure ML knows; "
            "use e.g. 'UTC', 'W. Europe Standard Time', 'Pacific Standard Time' or 'Tokyo Standard Time'"
        )
    if settings.cron:
        return CronTrigger(expression=settings.cron, time_zone=settings.time_zone, start_time=settings.start_time)
    pattern = None
    if settings.hours is not None or settings.minutes is not None or settings.week_days:
        pattern = RecurrencePattern(hours=settings.hours or [0], minutes=settings.minutes or [0], week_days=settings.week_days)
    return RecurrenceTrigger(
        frequency=settings.frequency, interval=settings.interval, schedule=pattern, time_zone=settings.time_zone, start_time=settings.start_time
    )


def build_schedule(config: DistillConfig, folder: Optional[Path] = None) -> tuple[Any, Any]:
    """(the JobSchedule for `config`, the retrain pipeline job it creates at each trigger)."""
    from azure.ai.ml.entities import JobSchedule

    settings = schedule_settings(config)
    folder = Path(folder or output_folder(config))
    job = build_pipeline(config, "retrain", folder)
    validate_job(job)
    return JobSchedule(
        name=schedule_name(config),
        trigger=make_trigger(settings),
        create_job=job,
        display_name=f"Retrain {config.name}",
        description=f"Retrain '{config.name}' on the latest data; the student replaces the champion only if it is better.",
        tags={"azdistill.config": config.name, "azdistill.pipeline": "retrain"},
    ), job


def describe(schedule: Any) -> str:
    """One line: name, enabled, trigger."""
    trigger = schedule.trigger
    if getattr(trigger, "expression", None):
        when = f"cron '{trigger.expression}'"
    else:
        when = f"every {trigger.interval} {trigger.frequency}"
        pattern = getattr(trigger, "schedule", None)
        if pattern is not None:
            when += f" at hours {pattern.hours} minutes {pattern.minutes}" + (f" on {pattern.week_days}" if pattern.week_days else "")
    state = "enabled" if schedule.is_enabled else "disabled"
    return f"{schedule.name}: {state}, {when} ({trigger.time_zone})"


def dry_run_schedule(config: DistillConfig, folder: Optional[Path] = None) -> Path:
    """Write the schedule's job as YAML for review; nothing is sent."""
    folder = Path(folder or output_folder(config))
    schedule, job = build_schedule(config, folder)
    return write_job_yaml(job, folder / "retrain.pipeline.yaml")
