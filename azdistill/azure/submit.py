"""Submit a pipeline definition to the workspace, or write it as YAML for review (a dry run)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from azdistill.azure.build import SPLITS, azure_settings, build_pipeline, experiment_name, register_environments
from azdistill.azure.workspace import Workspace, azure_errors, ml_client, plain_sdk_output, resolve_workspace
from azdistill.config.schema import DistillConfig
from azdistill.errors import UserError


@dataclass
class Submitted:
    pipeline: str
    job_name: Optional[str] = None
    studio_url: Optional[str] = None
    status: Optional[str] = None
    yaml_path: Optional[Path] = None
    workspace: Optional[Workspace] = None


def output_folder(config: DistillConfig) -> Path:
    """Where the job config and dry-run YAML go: <workdir>/azure/<name>/."""
    return Path(config.workdir) / "azure" / config.name


def validate_job(job: Any) -> None:
    """The SDK's own local validation (schemas, bindings, required inputs); a failure is a UserError."""
    result = job._validate()
    if not result.passed:
        raise UserError(f"the pipeline does not validate: {result.error_messages}")


def _relative_local_paths(node: Any, base: Path) -> Any:
    """Local paths in a dumped job, made relative to the YAML's folder so the file can be moved with the
    repository and loaded back. (The SDK dumps an absolute local input path as 'azureml:/...'.)"""
    if isinstance(node, dict):
        fixed = {}
        for key, value in node.items():
            if isinstance(value, str) and key in ("path", "code"):
                local = value[len("azureml:") :] if value.startswith("azureml:/") else value
                if local.startswith("/") and Path(local).exists():
                    value = os.path.relpath(local, base)
            fixed[key] = _relative_local_paths(value, base)
        return fixed
    if isinstance(node, list):
        return [_relative_local_paths(item, base) for item in node]
    return node


def _parallel_steps_use_their_components_task(data: dict) -> dict:
    """Leave out a parallel step's copy of its component's `task` in a dumped job.

    The SDK resolves a step's own relative task code path (`code: code`) against the current folder, not the YAML's
    as it does for the component's, so `az ml job create -f` refused the file anywhere but in its folder ("Can't find
    directory or file in resolved absolute path: <cwd>/azureml:code"). A step without one takes its component's.
    """
    for step in data.get("jobs", {}).values():
        component = step.get("component")
        if step.get("type") == "parallel" and isinstance(component, dict) and step.get("task") == component.get("task"):
            del step["task"]
    return data


def write_job_yaml(job: Any, path: Path) -> Path:
    """Write the pipeline job as YAML for `az ml job create -f` (or `azdistill submit`), and prove it: read back with
    `load_job` and validated by the SDK as `az ml job create` does before it sends anything."""
    from azure.ai.ml import load_job

    path.parent.mkdir(parents=True, exist_ok=True)
    data = _parallel_steps_use_their_components_task(_relative_local_paths(job._to_dict(), path.parent.resolve()))
    header = "# Written by `azdistill submit --dry-run`; submit it with `az ml job create -f` or `azdistill submit`.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8")
    result = load_job(source=path)._validate()
    if not result.passed:
        raise UserError(f"{path}: the written job does not validate: {result.error_messages}")
    return path


def check_data_assets(client: Any, config: DistillConfig, workspace: Workspace) -> None:
    """Look up every registered data asset the config names (azure.data) before anything is uploaded, the way the
    retrain pipeline's validate step resolves them, so a misspelt name or version is one line now, not a submission
    that fails half-way or a retrain that fails when it runs. Nothing is pinned here."""
    from azure.core.exceptions import ResourceNotFoundError

    from azdistill.azure.injob import resolve_data_asset

    assets = azure_settings(config).data
    for split in SPLITS:
        reference = getattr(assets, split)
        if not reference:
            continue
        try:
            resolve_data_asset(client, reference)
        except Exception as error:  # the SDK wraps a missing `@latest` container in its own exceptions
            cause: Optional[BaseException] = error
            while cause is not None and not isinstance(cause, ResourceNotFoundError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise UserError(
                f"azure.data.{split}: no data asset {reference} in workspace {workspace} (404): check the name and "
                "version (`az ml data list`), or register the file (`az ml data create --name NAME --type uri_file --path FILE`)"
            ) from None


def submit(
    config: DistillConfig,
    pipeline: Optional[str] = None,
    dry_run: bool = False,
    stream: bool = False,
    folder: Optional[Path] = None,
    credential: Any = None,
    echo: Callable[[str], None] = print,
) -> Submitted:
    """Build the pipeline `pipeline` (default: azure.pipeline) for `config` and submit it, or with `dry_run`
    only validate it and write its YAML (no network, no credentials)."""
    name = pipeline or azure_settings(config).pipeline
    folder = Path(folder or output_folder(config))
    job = build_pipeline(config, name, folder)
    validate_job(job)
    if dry_run:
        return Submitted(pipeline=name, yaml_path=write_job_yaml(job, folder / f"{name}.pipeline.yaml"))
    workspace = resolve_workspace(config.azure)
    client = ml_client(workspace, credential)
    with azure_errors(f"submitting the {name} pipeline", workspace), plain_sdk_output():
        check_data_assets(client, config, workspace)
        register_environments(client)
        created = client.jobs.create_or_update(job, experiment_name=experiment_name(config))
    url = getattr(created, "studio_url", None) or workspace.studio_url(created.name)
    from azdistill.azure.jobs import status_text

    result = Submitted(pipeline=name, job_name=created.name, studio_url=url, status=status_text(created.status), workspace=workspace)
    echo(f"submitted {name} pipeline: job {created.name} ({result.status}) in {workspace}")
    echo(f"studio: {url}")
    if stream:
        with azure_errors(f"following job {created.name}", workspace):
            client.jobs.stream(created.name)
            result.status = status_text(client.jobs.get(created.name).status)
    return result
