"""Which workspace, which credential, and what an Azure error means for the user.

The workspace comes from the config's `azure` section, else the environment (AZURE_SUBSCRIPTION_ID,
AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME; inside an Azure ML job AZUREML_ARM_*), else an Azure ML
`config.json` (the file the studio offers for download) in the current folder, a parent, or their `.azureml/`.
Each of the three fields is looked up on its own, in that order.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from azdistill.errors import UserError

# Extra keyword arguments for every MLClient (tests pass retry_total=0).
CLIENT_OPTIONS: dict[str, Any] = {}

ENV_FIELDS = {
    "subscription_id": ("AZURE_SUBSCRIPTION_ID", "AZUREML_ARM_SUBSCRIPTION"),
    "resource_group": ("AZURE_RESOURCE_GROUP", "AZUREML_ARM_RESOURCEGROUP"),
    "workspace_name": ("AZUREML_WORKSPACE_NAME", "AZUREML_ARM_WORKSPACE_NAME"),
}


@dataclass(frozen=True)
class Workspace:
    subscription_id: str
    resource_group: str
    workspace_name: str

    @property
    def arm_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.MachineLearningServices/workspaces/{self.workspace_name}"
        )

    def studio_url(self, job_name: str) -> str:
        """The studio page of a job (used when the service does not return one)."""
        wsid = f"/subscriptions/{self.subscription_id}/resourcegroups/{self.resource_group}/workspaces/{self.workspace_name}"
        return f"https://ml.azure.com/runs/{job_name}?wsid={wsid}"

    def __str__(self) -> str:
        return f"{self.workspace_name} (resource group {self.resource_group}, subscription {self.subscription_id})"


def find_config_json(start: Optional[Path] = None) -> Optional[Path]:
    """The nearest Azure ML config.json: in `start` or a parent folder, directly or under `.azureml/`."""
    folder = Path(start or Path.cwd()).resolve()
    for candidate_folder in (folder, *folder.parents):
        for candidate in (candidate_folder / "config.json", candidate_folder / ".azureml" / "config.json"):
            if candidate.is_file():
                try:
                    data = json.loads(candidate.read_text(encoding="utf-8"))
                except (ValueError, UnicodeDecodeError):
                    continue
                if isinstance(data, dict) and "subscription_id" in data:
                    return candidate
    return None


def resolve_workspace(azure_config: Any = None, start: Optional[Path] = None) -> Workspace:
    """Find the workspace (see the module docstring); a missing field is a UserError naming every way to set it."""
    found: dict[str, Optional[str]] = {}
    for field, env_names in ENV_FIELDS.items():
        value = getattr(azure_config, field, None) if azure_config is not None else None
        for env_name in env_names:
            value = value or os.environ.get(env_name)
        found[field] = value
    if not all(found.values()):
        path = find_config_json(start)
        if path is not None:
            data = json.loads(path.read_text(encoding="utf-8"))
            aliases = {"workspace_name": ("workspace_name", "workspace")}
            for field in found:
                for key in aliases.get(field, (field,)):
                    found[field] = found[field] or data.get(key)
    missing = [field for field, value in found.items() if not value]
    if missing:
        hints = ", ".join(f"azure.{field} (or {ENV_FIELDS[field][0]})" for field in missing)
        raise UserError(
            f"no Azure ML workspace given: set {hints} in the config or the environment, "
            "or put the workspace's config.json (Azure ML studio > workspace > Download config file) in this folder"
        )
    return Workspace(found["subscription_id"], found["resource_group"], found["workspace_name"])  # type: ignore[arg-type]


def make_credential(identity_client_id: Optional[str] = None):
    """DefaultAzureCredential: environment variables, workload or managed identity, then the az CLI login.

    Interactive browser sign-in is left out so a command never hangs waiting for a person. Inside a job the
    user-assigned identity is picked by its client id (AZURE_CLIENT_ID or `identity_client_id`).
    """
    from azure.identity import DefaultAzureCredential

    client_id = identity_client_id or os.environ.get("AZURE_CLIENT_ID") or os.environ.get("DEFAULT_IDENTITY_CLIENT_ID")
    return DefaultAzureCredential(exclude_interactive_browser_credential=True, managed_identity_client_id=client_id)


def ml_client(workspace: Workspace, credential: Any = None):
    """An MLClient for `workspace`, telemetry off; upload progress bars only on a terminal (elsewhere, in a log or
    a pipe, they are lines of colour codes)."""
    from azure.ai.ml import MLClient

    options = {"show_progress": sys.stderr.isatty(), **CLIENT_OPTIONS}
    return MLClient(
        credential or make_credential(),
        subscription_id=workspace.subscription_id,
        resource_group_name=workspace.resource_group,
        workspace_name=workspace.workspace_name,
        enable_telemetry=False,
        **options,
    )


# Colour and cursor codes of a terminal (the SDK colours its upload messages with colorama).
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def quiet_sdk_notices() -> None:
    """Keep azure-ai-ml's "Class ...: This is an experimental class" notices (one for each experimental schema it
    builds, a dry run included) out of the output. That logger says nothing else, so no warning or error is lost."""
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)


@contextmanager
def plain_sdk_output() -> Iterator[None]:
    """What the SDK prints on stderr inside this block, without terminal colour codes and blank lines, unless stderr
    is a terminal (there its progress bars and colours are meant to be seen).

    After every upload, progress bar or not, the SDK prints a colour reset and two blank lines
    (azure/ai/ml/_artifacts/_blob_storage_helper.py, `print(Fore.RESET + "\\n", file=sys.stderr)`). Everything else
    it printed is passed on, after the block ends or fails.
    """
    if sys.stderr.isatty():
        yield
        return
    printed = io.StringIO()
    try:
        with redirect_stderr(printed):
            yield
    finally:
        for line in TERMINAL_CODES.sub("", printed.getvalue()).splitlines():
            if line.strip():
                print(line, file=sys.stderr)


def _what_was_missing(url: str) -> str:
    """Name the resource a 404 was about, from the request URL."""
    parts = url.split("?")[0].rstrip("/").split("/")
    kinds = {
        "computes": "compute",
        "jobs": "job",
        "schedules": "schedule",
        "data": "data asset",
        "models": "model",
        "environments": "environment",
        "connections": "workspace connection",
        "datastores": "datastore",
    }
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] in kinds:
            return f"{kinds[parts[index]]} '{parts[index + 1]}'"
    return ""


def explain_http_error(error: Exception, workspace: Optional[Workspace], action: str) -> Optional[str]:
    """A one-line message saying what to fix for a 401, 403 or 404 from Azure; None for anything else."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    where = f"workspace {workspace}" if workspace else "the workspace"
    status = getattr(error, "status_code", None)
    response = getattr(error, "response", None)
    if status is None and response is not None:
        status = getattr(response, "status_code", None)
    url = ""
    request = getattr(response, "request", None)
    if request is not None:
        url = str(getattr(request, "url", ""))
    if status == 401 or (isinstance(error, ClientAuthenticationError) and status is None):
        return (
            f"{action}: Azure did not accept the credentials (401): sign in with `az login`, or set AZURE_TENANT_ID, "
            "AZURE_CLIENT_ID and AZURE_CLIENT_SECRET for a service principal"
        )
    if status == 403:
        return (
            f"{action}: the signed-in identity has no permission on {where} (403): ask an owner for the "
            "'AzureML Data Scientist' role on the workspace (and 'Contributor' on its resource group to create schedules)"
        )
    if status == 404:
        # A 404 on creating something means its parent, the workspace, is not there.
        missing = "" if str(getattr(request, "method", "GET")).upper() in ("PUT", "POST") else _what_was_missing(url)
        if missing.startswith("compute"):
            return (
                f"{action}: no {missing} in {where} (404): create it (infra/ deploys cpu-cluster and gpu-cluster) "
                "or name an existing one, or a serverless instance_type, under azure.compute in the config"
            )
        if missing:
            return f"{action}: no {missing} in {where} (404): check the name"
        return (
            f"{action}: {where} was not found (404): check azure.subscription_id, azure.resource_group and "
            "azure.workspace_name (or config.json)"
        )
    if isinstance(error, HttpResponseError) and status is None:
        return None
    return None


@contextmanager
def azure_errors(action: str, workspace: Optional[Workspace] = None) -> Iterator[None]:
    """Turn Azure's 401/403/404 and credential failures into a UserError that says what to fix."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    try:
        yield
    except UserError:
        raise  # already says what to fix
    except (HttpResponseError, ClientAuthenticationError) as error:
        message = explain_http_error(error, workspace, action)
        if message is None:
            raise
        raise UserError(message) from None
    except Exception as error:  # the SDK wraps some service errors; look for the HTTP error inside
        missing_compute = re.search(r"ResourceNotFound\).*?compute.*?\"value\": \"(?:azureml:)?([^\"]+)\"", str(error), re.S)
        if missing_compute:
            where = f"workspace {workspace}" if workspace else "the workspace"
            raise UserError(
                f"{action}: no compute '{missing_compute[1]}' in {where} (404): create it (infra/ deploys cpu-cluster and "
                "gpu-cluster) or name an existing one, or a serverless instance_type, under azure.compute in the config"
            ) from None
        inner = error.__cause__ or error.__context__
        if isinstance(inner, HttpResponseError):
            message = explain_http_error(inner, workspace, action)
            if message is not None:
                raise UserError(message) from None
        if type(error).__name__ == "CredentialUnavailableError":
            raise UserError(
                f"{action}: no Azure credentials found: sign in with `az login`, or set AZURE_TENANT_ID, AZURE_CLIENT_ID "
                "and AZURE_CLIENT_SECRET (a managed identity is used automatically on Azure)"
            ) from None
        raise


def workspace_tracking_uri(azure_config, credential=None) -> str:
    """The MLflow tracking URI of the Azure ML workspace `submit` uses (`azure_config`, else AZURE_* variables, else
    config.json; see azure/workspace.py), as the workspace reports it:
    `azureml://<region>.api.azureml.ms/mlflow/v<n>/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.MachineLearningServices/workspaces/<ws>`.

    Asking the workspace (one GET) rather than assembling the URI gives its region, and registers `credential`
    with azureml-mlflow, which then signs MLflow's requests to that URI.
    """
    workspace = resolve_workspace(azure_config)
    with azure_errors("reading the workspace's MLflow tracking URI", workspace):
        found = ml_client(workspace, credential).workspaces.get(workspace.workspace_name)
    uri = getattr(found, "mlflow_tracking_uri", None)
    if not uri:
        raise UserError(f"workspace {workspace} reports no MLflow tracking URI: is azureml-mlflow installed?")
    return uri
