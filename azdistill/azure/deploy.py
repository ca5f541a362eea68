"""Deploy a registered student to an Azure ML managed online endpoint, blue/green: a new version is smoke-tested on
its own deployment before it takes the traffic.

Every version gets its own deployment, `student-v<version>`, on the config's endpoint (`azure.deployment`). A version
that does not serve yet is deployed (or updated) at 0% traffic, answers `smoke_prompts` held-out prompts sent to it
alone (azure/deploy_smoke.py), and only then takes 100%; the deployments it replaces stay at 0%, ready for a
rollback (`azdistill deploy CONFIG --model <old version>`), until they are retired (`--retire NAME`, or the printed
`az ml online-deployment delete`). A failed smoke test leaves the traffic where it was.

`--model @champion` (the default) is the version the pipeline's register step tagged `azdistill.champion=true`, so
`azdistill deploy CONFIG` after a scheduled retrain moves the traffic to a newly promoted champion, or changes
nothing and says why (the newest version's `promotion.reason`).

The student is registered as an MLflow model, so the deployment names no scoring script and no environment: Azure ML
builds both (no-code deployment). The endpoint's key stays inside the SDK's scoring call; this module prints only how
to fetch it with the Azure CLI.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from azdistill.azure.deploy_smoke import request_payload, run_smoke_test, smoke_prompts
from azdistill.azure.submit import output_folder
from azdistill.azure.workspace import Workspace, azure_errors, ml_client, plain_sdk_output, resolve_workspace
from azdistill.config.azure import ENDPOINT_NAME_PATTERN, DeploymentConfig
from azdistill.config.schema import DistillConfig
from azdistill.data.files import atomic_writer
from azdistill.errors import StageFailed, UserError
from azdistill.tracking.registry import CHAMPION_TAG, REASON_TAG, champion_among

CHAMPION = "@champion"
DEPLOYMENT_PREFIX = "student-v"  # Azure wants 3-32 characters, so a bare "v3" is too short


def deploy_settings(config: DistillConfig) -> DeploymentConfig:
    """The config's azure.deployment section, or its defaults."""
    return (config.azure.deployment if config.azure is not None else None) or DeploymentConfig()


def endpoint_name(config: DistillConfig) -> str:
    """azure.deployment.endpoint_name, else `<config name>-student`, which must then follow Azure's naming rule."""
    explicit = deploy_settings(config).endpoint_name
    if explicit:
        return explicit
    default = f"{config.name}-student"
    if not re.fullmatch(ENDPOINT_NAME_PATTERN, default):
        raise UserError(
            f"azure.deployment.endpoint_name: the default '{default}' (the config name + '-student') is not a valid "
            "endpoint name (3-32 letters, digits and hyphens, starting with a letter): set azure.deployment.endpoint_name"
        )
    return default


def deployment_name(version: str) -> str:
    return f"{DEPLOYMENT_PREFIX}{version}"


def requested_version(model: str) -> Optional[str]:
    """None for `@champion`; the version number of `3` or `v3`."""
    if model.strip() == CHAMPION:
        return None
    match = re.fullmatch(r"[vV]?([0-9]+)", model.strip())
    if not match or int(match[1]) == 0:
        raise UserError(f"--model: '{model}' is not a registered version: give {CHAMPION} (the default), a version (3) or v3")
    return str(int(match[1]))


def build_endpoint(config: DistillConfig) -> Any:
    """The endpoint as azdistill creates it: the configured auth mode, no traffic yet."""
    from azure.ai.ml.entities import ManagedOnlineEndpoint

    return ManagedOnlineEndpoint(
        name=endpoint_name(config),
        auth_mode=deploy_settings(config).auth_mode,
        description=f"The champion of {config.registered_model_name}, deployed by `azdistill deploy`.",
        tags={"azdistill.model": config.registered_model_name},
    )


def build_deployment(config: DistillConfig, version: str) -> Any:
    """One version's deployment: the registered MLflow model by reference, and the configured instances."""
    from azure.ai.ml.entities import DefaultScaleSettings, ManagedOnlineDeployment

    settings = deploy_settings(config)
    return ManagedOnlineDeployment(
        name=deployment_name(version),
        endpoint_name=endpoint_name(config),
        model=f"azureml:{config.registered_model_name}:{version}",
        instance_type=settings.instance_type,
        instance_count=settings.instance_count,
        # Managed deployments take only default scale settings; autoscale is Azure Monitor's (see autoscale_commands).
        scale_settings=DefaultScaleSettings(),
        description=f"Version {version} of {config.registered_model_name}.",
        tags={"azdistill.model": config.registered_model_name, "azdistill.version": version},
    )


# ---------------------------------------------------------------------------------------------------
# The dry run: the two YAML files, proven by the SDK's own loaders


def write_dry_run(config: DistillConfig, model: str, folder: Optional[Path] = None) -> list[Path]:
    """Write endpoint.yaml, deployment.yaml and smoke-request.json (the first smoke prompt) for `az ml` to apply;
    no network, no credentials. The version must be a number: nothing is looked up to find the champion."""
    from azure.ai.ml import load_online_deployment, load_online_endpoint

    version = requested_version(model)
    if version is None:
        raise UserError(
            f"--model: a dry run looks nothing up, so it cannot know which version is the {CHAMPION}: give the version "
            f"(--model 3); the champion's is `az ml model list --name {config.registered_model_name} "
            f"--query \"[?tags.\\\"{CHAMPION_TAG}\\\"=='true'].version\" -o tsv`"
        )
    folder = Path(folder or output_folder(config) / "deploy")
    header = "# Written by `azdistill deploy --dry-run`; apply with `az ml online-{kind} create -f {name}` (see docs/azure.md).\n"
    endpoint_path, deployment_path = folder / "endpoint.yaml", folder / "deployment.yaml"
    # ManagedOnlineEndpoint.dump ignores its destination and returns the YAML's content (azure-ai-ml 1.35), and
    # OnlineDeployment.dump refuses an existing file, so both are dumped to memory and written here.
    deployment_text = io.StringIO()
    build_deployment(config, version).dump(deployment_text)
    for path, kind, text in (
        # The endpoint's dump is nested OrderedDicts, which safe_dump refuses; a JSON round trip keeps the order.
        (endpoint_path, "endpoint", yaml.safe_dump(json.loads(json.dumps(build_endpoint(config).dump())), sort_keys=False)),
        (deployment_path, "deployment", deployment_text.getvalue()),
    ):
        with atomic_writer(path) as handle:
            handle.write(header.format(kind=kind, name=path.name) + text)
    load_online_endpoint(endpoint_path), load_online_deployment(deployment_path)  # what `az ml` will read
    request_path = folder / "smoke-request.json"
    with atomic_writer(request_path) as handle:
        handle.write(json.dumps(request_payload(smoke_prompts(config, 1)[0]), indent=2) + "\n")
    return [endpoint_path, deployment_path, request_path]


def manual_steps(config: DistillConfig, model: str, written: list[Path]) -> list[str]:
    """The `az ml` commands that apply a dry run's files the way `deploy` would: endpoint, deployment at 0%, one smoke
    request to that deployment alone, then all the traffic."""
    endpoint, deployment = endpoint_name(config), deployment_name(str(requested_version(model)))
    return [
        f"az ml online-endpoint create -f {written[0]}    # skip if the endpoint exists",
        f"az ml online-deployment create -f {written[1]}",
        f"az ml online-endpoint invoke --name {endpoint} --deployment-name {deployment} --request-file {written[2]}",
        f"az ml online-endpoint update --name {endpoint} --traffic \"{deployment}=100\"",
    ]


# ---------------------------------------------------------------------------------------------------
# Deploying


@dataclass
class Deployed:
    """What `deploy` did: the version, its deployment, and the endpoint's traffic before and after."""

    endpoint: str
    deployment: str
    version: str
    changed: bool
    traffic_before: dict[str, int] = field(default_factory=dict)
    traffic_after: dict[str, int] = field(default_factory=dict)


@dataclass
class Versions:
    """The registered versions of the student: the one to deploy, the newest, and the champion."""

    chosen: Any  # azure.ai.ml.entities.Model
    newest: Any
    champion: Optional[str]

    def reason(self, model: Any) -> str:
        return (model.tags or {}).get(REASON_TAG, "no promotion reason recorded")


def find_versions(client: Any, model_name: str, requested: Optional[str], workspace: Workspace) -> Versions:
    """The version to deploy (`requested`, or the champion for None) among the registered versions of `model_name`."""
    # Registered versions are numbers; one set by hand to text sorts first, so it is never taken for the newest.
    def number(model: Any) -> int:
        return int(model.version) if str(model.version).isdigit() else -1

    versions = sorted(client.models.list(name=model_name), key=number)
    if not versions:
        raise UserError(
            f"no registered model {model_name} in workspace {workspace}: run the pipeline first (`azdistill submit "
            "CONFIG`); its register step registers the student (or set tracking.registered_model)"
        )
    newest, champion = versions[-1], champion_among(versions)
    wanted = requested or champion
    if wanted is None:
        raise UserError(
            f"{model_name} has no {CHAMPION} yet (no version tagged {CHAMPION_TAG}=true): the newest, version "
            f"{newest.version}, was not promoted: {(newest.tags or {}).get(REASON_TAG, 'no reason recorded')}; "
            "deploy a version anyway with --model VERSION"
        )
    chosen = next((model for model in versions if str(model.version) == wanted), None)
    if chosen is None:
        raise UserError(
            f"--model: {model_name} has no version {wanted}; registered: {', '.join(str(model.version) for model in versions)}"
        )
    return Versions(chosen, newest, champion)


@contextmanager
def sdk_progress() -> Iterator[None]:
    """The SDK's polling dots (printed on stdout while a deployment comes up) on a terminal, ended with a newline;
    elsewhere, in a log or a pipe, they are left out."""
    if sys.stdout.isatty():
        yield
        print()
        return
    with redirect_stdout(io.StringIO()):
        yield


def get_or_create_endpoint(client: Any, config: DistillConfig, echo: Callable[[str], None]) -> Any:
    """The endpoint (with every deployment in its traffic map), created with no traffic when it does not exist."""
    from azure.core.exceptions import ResourceNotFoundError

    name = endpoint_name(config)
    try:
        endpoint = client.online_endpoints.get(name)
    except ResourceNotFoundError:
        echo(f"endpoint {name}: creating it (auth mode {deploy_settings(config).auth_mode}); this takes a minute or two")
        with sdk_progress():
            client.online_endpoints.begin_create_or_update(build_endpoint(config)).result()
        return client.online_endpoints.get(name)
    wanted = deploy_settings(config).auth_mode
    if str(endpoint.auth_mode).lower() != wanted:
        echo(f"endpoint {name}: its auth mode is {endpoint.auth_mode}, not {wanted} as configured (set only when it is created)")
    return endpoint


def deploy(
    config: DistillConfig,
    model: str = CHAMPION,
    retire: tuple[str, ...] = (),
    credential: Any = None,
    echo: Callable[[str], None] = print,
) -> Deployed:
    """Deploy version `model` of the config's registered student and move the endpoint's traffic to it (see the module
    docstring); StageFailed when the smoke test fails, with the traffic left as it was."""
    name, model_name = endpoint_name(config), config.registered_model_name
    requested = requested_version(model)
    # The SDK logs "Check: endpoint <name> exists" at INFO before each deployment; its warnings (a VM size too small) stay.
    logging.getLogger("azure.ai.ml.operations._online_deployment_operations").setLevel(logging.WARNING)
    prompts = smoke_prompts(config, deploy_settings(config).smoke_prompts)  # bad data fails before anything is sent
    workspace = resolve_workspace(config.azure)
    client = ml_client(workspace, credential)
    with azure_errors(f"deploying {model_name} to endpoint {name}", workspace), plain_sdk_output():
        versions = find_versions(client, model_name, requested, workspace)
        version = str(versions.chosen.version)
        target = deployment_name(version)
        endpoint = get_or_create_endpoint(client, config, echo)
        before = {key: int(value) for key, value in (endpoint.traffic or {}).items()}
        _check_retire(retire, target, before, name)
        if before.get(target) == 100:
            _say_nothing_changes(versions, target, name, echo)
            result = Deployed(name, target, version, False, before, before)
        else:
            _deploy_version(client, config, version, before, workspace, echo)
            _smoke_test(client, name, target, version, prompts, before, workspace, echo)
            after = {key: 0 for key in before} | {target: 100}
            endpoint.traffic = after
            with sdk_progress():
                client.online_endpoints.begin_create_or_update(endpoint).result()
            echo(f"traffic: {_describe(after)} (was {_describe(before)})")
            if version == versions.champion:
                echo(f"version {version} is the {CHAMPION}: {versions.reason(versions.chosen)}")
            result = Deployed(name, target, version, True, before, after)
        for old in retire:
            echo(f"retiring deployment {old}")
            with sdk_progress():
                client.online_deployments.begin_delete(name=old, endpoint_name=name).result()
        _print_access(endpoint, result, retire, workspace, config, echo)
    return result


def _check_retire(retire: tuple[str, ...], target: str, deployments: dict[str, int], endpoint: str) -> None:
    """Refuse, before anything changes, to retire the deployment about to serve or one the endpoint does not have."""
    for old in retire:
        if old == target:
            raise UserError(f"--retire: {old} is the deployment that takes the traffic; retire only the old ones")
        if old not in deployments:
            known = ", ".join(sorted(deployments)) or "none"
            raise UserError(f"--retire: endpoint {endpoint} has no deployment {old}; its deployments: {known}")


def _say_nothing_changes(versions: Versions, target: str, endpoint: str, echo: Callable[[str], None]) -> None:
    """Why nothing changes: the version already serves; after a retrain, why the newest version did not replace it."""
    version = str(versions.chosen.version)
    echo(f"version {version} already takes all the traffic of endpoint {endpoint} (deployment {target}): nothing changes")
    newest = str(versions.newest.version)
    if newest != version and version == versions.champion:
        echo(f"the newest version, {newest}, stays a challenger: {versions.reason(versions.newest)}")
    elif version == versions.champion:
        echo(f"version {version} is the newest and the {CHAMPION}: {versions.reason(versions.chosen)}")


def _deploy_version(
    client: Any, config: DistillConfig, version: str, traffic: dict[str, int], workspace: Workspace, echo: Callable[[str], None]
) -> None:
    """Create (or update) the version's deployment; the endpoint's traffic is not touched, so it starts at 0%. One that
    does not come up (its container fails to start, say) is StageFailed, pointing at its logs."""
    from azure.core.exceptions import HttpResponseError

    deployment = build_deployment(config, version)
    echo(
        f"deployment {deployment.name}: model {deployment.model} on {deployment.instance_count} x {deployment.instance_type}, "
        "at 0% traffic; this takes several minutes"
    )
    try:
        with sdk_progress():
            client.online_deployments.begin_create_or_update(deployment).result()
    except HttpResponseError as error:
        if getattr(error, "status_code", None) in (401, 403, 404):
            raise  # azure_errors says what to fix
        endpoint = deployment.endpoint_name
        echo(_logs_line(workspace, deployment.name, endpoint))
        reason = (str(error.message or error).strip().splitlines() or ["no reason given"])[0]
        raise StageFailed(
            f"deployment {deployment.name} (version {version}) did not come up on endpoint {endpoint}: {reason}; "
            f"the traffic stays as it was ({_describe(traffic)})"
        ) from None


def _smoke_test(
    client: Any, endpoint: str, target: str, version: str, prompts: list[str], traffic: dict[str, int], workspace: Workspace,
    echo: Callable[[str], None],
) -> None:
    """The new deployment answers the held-out prompts, or StageFailed (the traffic untouched, the deployment kept)."""
    smoke = run_smoke_test(client, endpoint, target, prompts)
    if not smoke.passed:
        echo(_logs_line(workspace, target, endpoint))
        raise StageFailed(
            f"smoke test of deployment {target} (version {version}) on endpoint {endpoint} failed: {'; '.join(smoke.failures)}; "
            f"the traffic stays as it was ({_describe(traffic)}), and {target} stays at 0% for its logs"
        )
    echo(f"smoke test: {len(smoke.answers)} held-out prompt(s) answered by {target}")


def _logs_line(workspace: Workspace, deployment: str, endpoint: str) -> str:
    return f"logs of the new deployment: {_cli(workspace, 'online-deployment get-logs', deployment, endpoint)} --lines 200"


def _describe(traffic: dict[str, int]) -> str:
    return ", ".join(f"{name} {share}%" for name, share in sorted(traffic.items(), key=lambda item: -item[1])) or "no deployment"


def _cli(workspace: Workspace, command: str, deployment: Optional[str], endpoint: str) -> str:
    """An `az ml` command line for this endpoint (or one of its deployments) in the workspace."""
    target = f"--name {deployment} --endpoint-name {endpoint}" if deployment else f"--name {endpoint}"
    return f"az ml {command} {target} --resource-group {workspace.resource_group} --workspace-name {workspace.workspace_name}"


def _print_access(
    endpoint: Any, result: Deployed, retired: tuple[str, ...], workspace: Workspace, config: DistillConfig,
    echo: Callable[[str], None],
) -> None:
    """How to call the endpoint (its key never printed: the command that fetches it), the old deployments still there,
    and the autoscale commands for a new deployment."""
    echo(f"scoring URI: {endpoint.scoring_uri}")
    auth_mode = str(endpoint.auth_mode).lower()
    if auth_mode == "aad_token":
        echo("token: az account get-access-token --resource https://ml.azure.com --query accessToken -o tsv")
    else:  # key, or aml_token on an endpoint made elsewhere: the Azure CLI fetches either
        fetch = _cli(workspace, "online-endpoint get-credentials", None, result.endpoint)
        echo(f"{'key' if auth_mode == 'key' else 'token'}: {fetch}")
    idle = sorted(name for name in result.traffic_after if name != result.deployment and name not in retired)
    if idle:
        echo("at 0%, kept for a rollback (azdistill deploy CONFIG --model <version>); retire with --retire NAME or:")
        for name in idle:
            echo(f"  {_cli(workspace, 'online-deployment delete', name, result.endpoint)} --yes")
    if result.changed and deploy_settings(config).autoscaled:
        echo("autoscale (Azure Monitor; managed deployments take no scale rules of their own):")
        for line in autoscale_commands(config, result, workspace):
            echo(f"  {line}")


def autoscale_commands(config: DistillConfig, result: Deployed, workspace: Workspace) -> list[str]:
    """Azure Monitor autoscale for the new deployment, as Azure ML documents it for managed online endpoints: between
    min_instances and max_instances, one more instance above the target CPU %, one fewer below half of it."""
    settings = deploy_settings(config)
    target = settings.target_utilization_percentage or 70
    scale_name = f"{result.endpoint}-{result.deployment}-autoscale"
    resource = f"{workspace.arm_id}/onlineEndpoints/{result.endpoint}/deployments/{result.deployment}"
    group = f"--resource-group {workspace.resource_group}"
    return [
        f"az monitor autoscale create {group} --name {scale_name} --resource {resource} "
        f"--min-count {settings.min_instances} --max-count {settings.max_instances} --count {settings.instance_count}",
        f"az monitor autoscale rule create {group} --autoscale-name {scale_name} "
        f"--condition \"CpuUtilizationPercentage > {target} avg 5m\" --scale out 1",
        f"az monitor autoscale rule create {group} --autoscale-name {scale_name} "
        f"--condition \"CpuUtilizationPercentage < {max(1, target // 2)} avg 5m\" --scale in 1",
    ]
