"""A submitted job's status and logs."""

from __future__ import annotations

from typing import Any, Callable, Optional

STD_LOG_NAMES = ("user_logs/std_log.txt", "azureml-logs/70_driver_log.txt")


def status_text(status: Any) -> str:
    """'Running', not 'JobStatus.RUNNING' (the SDK returns its enum for some statuses)."""
    return str(getattr(status, "value", status))


def job_status_lines(client: Any, name: str) -> list[str]:
    """The job's status, studio URL and, for a pipeline, each step's status."""
    job = client.jobs.get(name)
    lines = [
        f"job {job.name}: {status_text(job.status)}",
        f"  display name: {job.display_name}",
        f"  experiment: {job.experiment_name}",
    ]
    created = getattr(getattr(job, "creation_context", None), "created_at", None)
    if created is not None:
        lines.append(f"  created: {created}")
    if getattr(job, "studio_url", None):
        lines.append(f"  studio: {job.studio_url}")
    if job.type == "pipeline":
        steps = list(client.jobs.list(parent_job_name=job.name))
        if steps:
            lines.append("  steps:")
            for step in steps:
                label = (getattr(step, "properties", None) or {}).get("azureml.nodeid") or step.display_name or step.name
                lines.append(f"    {label}: {status_text(step.status)} ({step.name})")
    return lines


def fetch_logs(client: Any, name: str, step: Optional[str] = None, download: Optional[Callable[[str], str]] = None) -> list[tuple[str, str]]:
    """(heading, text) of the standard log of the job, or of each step of a pipeline (only `step` if given)."""
    import requests

    download = download or (lambda url: requests.get(url, timeout=60).text)
    job = client.jobs.get(name)
    runs = [job]
    if job.type == "pipeline":
        runs = list(client.jobs.list(parent_job_name=job.name))
        if step is not None:
            runs = [run for run in runs if step in (run.display_name, run.name, (getattr(run, "properties", None) or {}).get("azureml.nodeid"))]
            if not runs:
                from azdistill.errors import UserError

                raise UserError(f"job {name} has no step '{step}'; `azdistill status {name}` lists them")
    found = []
    for run in runs:
        # The SDK has no public call for a run's log files; `jobs.stream` reads the same run-history details.
        details = client.jobs._runs_operations.get_run_details(run.name)
        files = details.log_files or {}
        chosen = next((files[log_name] for log_name in STD_LOG_NAMES if log_name in files), None)
        heading = f"{run.display_name or run.name} ({run.name}, {status_text(run.status)})"
        found.append((heading, download(chosen) if chosen else "(no log yet: the step has not started)"))
    return found
