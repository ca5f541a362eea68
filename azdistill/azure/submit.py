"""Submit a pipeline definition to the workspace, or write it as YAML for review (a dry run)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from azdistill.azure.build import azure_settings, build_pipeline, experiment_name, register_environments
from azdistill.azure.workspace import Workspace, azure_errors, ml_client, resolve_workspace
from azdistill.config import DistillConfig
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


def write_job_yaml(job: Any, path: Path) -> Path:
    """Write the pipeline job as YAML (`az ml job create -f` takes it too) and prove `load_job` reads it back."""
    from azure.ai.ml import load_job

    path.parent.mkdir(parents=True, exist_ok=True)
    data = _relative_local_paths(job._to_dict(), path.parent.resolve())
    header = "# Written by `azdistill submit --dry-run`; submit it with `az ml job create -f` or `azdistill submit`.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8")
    load_job(source=path)
    return path


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
    with azure_errors(f"submitting the {name} pipeline", workspace):
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
