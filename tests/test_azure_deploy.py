"""`azdistill deploy` through the real azure-ai-ml SDK, with the workspace, its online endpoint and the endpoint's
scoring route faked at the HTTP layer (tests/azure_wire.py).

The assertions read what went over the wire: the endpoint and deployment requests (model reference, instance
settings), the smoke-test calls sent to the new deployment alone, the traffic before and after, the retrain ->
deploy decision, and that the endpoint's key is in no request URL or body, no output and no written file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from azure_wire import RESOURCE_GROUP, WORKSPACE, WS_PATH, FakeWorkspace, installed
from click.testing import CliRunner
from conftest import records

from azdistill.cli import cli
from azdistill.config.loading import load_config
from azdistill.errors import UserError

MODEL = "unit-test-student"  # the registered model of the `unit-test` config
ENDPOINT = "unit-test-student"  # the endpoint's default name: <config name>-student
DEPLOYMENT_SECTION = """
azure:
  deployment:
    instance_type: Standard_DS4_v2
    instance_count: 2
    min_instances: 1
    max_instances: 4
    target_utilization_percentage: 60
    smoke_prompts: 2
"""
CHAMPION_REASON = "agreement 0.91 beats champion version 1 (0.85)"
FAILED_CHECKS = "failed the promotion checks: agreement 0.4 < 0.8"
CHALLENGER_REASON = "agreement 0.80 does not beat champion version 1 (0.85)"


@pytest.fixture
def wire(monkeypatch):
    """The fake workspace; any request it does not know fails the test."""
    with installed(monkeypatch) as fake:
        yield fake


def model_id(version: str) -> str:
    """The ARM id of a registered version: how a deployment names its model on the wire."""
    return f"{WS_PATH}/models/{MODEL}/versions/{version}"


def version(number: str, champion: bool, reason: str = "", **tags: str) -> dict:
    """A registered version as the pipeline's register step tags it."""
    tags = {"azdistill.champion": str(champion).lower(), "promotion.decision": "champion" if champion else "challenger", **tags}
    return {"version": number, "tags": {**tags, "promotion.reason": reason} if reason else tags}


def deploy(config: Path, *args: str):
    return CliRunner().invoke(cli, ["deploy", str(config), *args])


def request_index(wire: FakeWorkspace, method: str, pattern: str) -> list[int]:
    """Positions of the matching requests in the order they were sent."""
    found = wire.sent(method, pattern)
    return [index for index, sent in enumerate(wire.requests) if any(sent is item for item in found)]


def endpoint_puts(wire: FakeWorkspace) -> list[dict]:
    return [sent.body["properties"] for sent in wire.sent("PUT", rf"/onlineEndpoints/{ENDPOINT}$")]


def scoring_calls(wire: FakeWorkspace) -> list:
    return [sent for sent in wire.requests if sent.method == "POST" and sent.path == "/score"]


def assert_key_is_nowhere(wire: FakeWorkspace, output: str, folder: Path, key_auth: bool = True) -> None:
    """The key is in no request URL or body and in no header but the scoring calls' Authorization (with key auth: how
    the endpoint authenticates them); not in the command's output, and in no file under `folder`."""
    key = wire.endpoint_key
    assert key not in wire.all_text() and key not in output
    for sent in wire.requests:
        headers = {name.lower(): value for name, value in sent.headers.items()}
        leaked = [name for name, value in headers.items() if key in str(value)]
        assert leaked == (["authorization"] if sent.path == "/score" and key_auth else []), (sent.method, sent.url, leaked)
    for path in folder.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_deploy_creates_the_endpoint_smoke_tests_the_champion_alone_then_moves_the_traffic(wire, make_config, tmp_path, caplog):
    wire.add_model_versions(MODEL, version("1", False, FAILED_CHECKS), version("2", True, CHAMPION_REASON))
    config = make_config(extra=DEPLOYMENT_SECTION)
    caplog.set_level(logging.DEBUG, logger="azure")  # the SDK's own HTTP logging too: requests, headers, bodies
    result = CliRunner().invoke(cli, ["--verbose", "deploy", str(config)])
    assert result.exit_code == 0, result.output

    # the endpoint did not exist: created with the configured auth mode and no traffic
    created, switched = endpoint_puts(wire)
    assert created["authMode"] == "Key" and created["traffic"] == {}
    # the champion (version 2) on its own deployment: the registered MLflow model by ARM id, the configured
    # instances, no scoring script or environment (no-code deployment of an MLflow model)
    (put,) = wire.sent("PUT", rf"/onlineEndpoints/{ENDPOINT}/deployments/student-v2$")
    assert put.body["properties"]["model"] == model_id("2")
    assert put.body["properties"]["instanceType"] == "Standard_DS4_v2" and put.body["sku"]["capacity"] == 2
    assert put.body["properties"]["scaleSettings"] == {"scaleType": "Default"}
    assert put.body["properties"]["endpointComputeType"] == "Managed"
    assert not {"codeConfiguration", "environmentId"} & set(put.body["properties"])

    # the smoke test: the first two held-out prompts, each sent to student-v2 alone, before the traffic moved
    calls = scoring_calls(wire)
    test_prompts = [row["messages"][1]["content"] for row in records("nli", 2)]
    assert [call.body["input_data"] for call in calls] == [[prompt] for prompt in test_prompts]
    assert all({k.lower(): v for k, v in call.headers.items()}["azureml-model-deployment"] == "student-v2" for call in calls)
    (deployed,) = request_index(wire, "PUT", r"/deployments/student-v2$")
    _, traffic_put = request_index(wire, "PUT", rf"/onlineEndpoints/{ENDPOINT}$")
    assert all(deployed < index < traffic_put for index in request_index(wire, "POST", r"^/score$"))
    assert switched["traffic"] == {"student-v2": 100}

    output = result.output
    assert "smoke test: 2 held-out prompt(s) answered by student-v2" in output
    assert f"version 2 is the @champion: {CHAMPION_REASON}" in output
    assert f"scoring URI: https://{ENDPOINT}.westeurope.inference.ml.azure.com/score" in output
    assert (
        f"az ml online-endpoint get-credentials --name {ENDPOINT} --resource-group {RESOURCE_GROUP} --workspace-name {WORKSPACE}"
        in output
    )
    # autoscale: Azure Monitor on the new deployment, from the configured bounds and CPU target
    deployment_id = f"{WS_PATH}/onlineEndpoints/{ENDPOINT}/deployments/student-v2"
    assert f"--resource {deployment_id} --min-count 1 --max-count 4 --count 2" in output
    assert '"CpuUtilizationPercentage > 60 avg 5m" --scale out 1' in output
    assert "Request URL" in caplog.text and "Authorization" in caplog.text  # logged, and redacted by azure-core
    assert_key_is_nowhere(wire, output + caplog.text, tmp_path)


def test_a_retrain_that_promoted_a_new_champion_moves_the_traffic_and_keeps_the_old_one_at_0(wire, make_config, tmp_path, caplog):
    former = version("1", False, "first version to pass", **{"promotion.replaced_by": "2"})
    wire.add_model_versions(MODEL, former, version("2", True, CHAMPION_REASON))
    wire.online_endpoint(ENDPOINT, traffic={"student-v1": 100}, **{"student-v1": model_id("1")})
    config = make_config(extra="azure:\n  deployment:\n    smoke_prompts: 5\n")  # more than data.test's 3
    result = deploy(config)
    assert result.exit_code == 0, result.output

    assert not wire.sent("PUT", rf"/onlineEndpoints/{ENDPOINT}/deployments/student-v1$")  # the old one is untouched
    assert wire.sent("PUT", r"/deployments/student-v2$")[0].body["properties"]["model"] == model_id("2")
    assert len(scoring_calls(wire)) == 3  # all data.test holds, with a warning naming both numbers
    assert "azure.deployment.smoke_prompts is 5, but data.test" in caplog.text and "holds 3 prompts" in caplog.text
    # the existing endpoint is sent one PUT, the traffic switch; the service keeps student-v1, now at 0%
    assert [put["traffic"] for put in endpoint_puts(wire)] == [{"student-v2": 100}]
    assert wire.endpoints[ENDPOINT]["properties"]["traffic"] == {"student-v2": 100}
    assert set(wire.deployments[ENDPOINT]) == {"student-v1", "student-v2"}
    assert "traffic: student-v2 100%, student-v1 0% (was student-v1 100%)" in result.output
    assert (
        f"az ml online-deployment delete --name student-v1 --endpoint-name {ENDPOINT} --resource-group {RESOURCE_GROUP} "
        f"--workspace-name {WORKSPACE} --yes" in result.output
    )
    assert_key_is_nowhere(wire, result.output, tmp_path)


def test_a_retrain_that_promoted_nothing_leaves_the_traffic_and_says_why(wire, make_config):
    wire.add_model_versions(MODEL, version("1", True, "first version to pass"), version("2", False, CHALLENGER_REASON))
    wire.online_endpoint(ENDPOINT, traffic={"student-v1": 100}, **{"student-v1": model_id("1")})
    result = deploy(make_config())
    assert result.exit_code == 0, result.output
    assert not [sent for sent in wire.requests if sent.method in ("PUT", "DELETE")] and not scoring_calls(wire)
    assert f"version 1 already takes all the traffic of endpoint {ENDPOINT} (deployment student-v1): nothing changes" in (
        result.output
    )
    assert f"the newest version, 2, stays a challenger: {CHALLENGER_REASON}" in result.output


@pytest.mark.parametrize(
    "answer, failure",
    [
        ((500, {"error": {"code": "InternalServerError", "message": "model failed to load"}}), "prompt 1: HTTP 500"),
        ((200, [""]), "prompt 1: empty answer"),
    ],
    ids=["server-error", "empty-answer"],
)
def test_a_failed_smoke_test_leaves_the_traffic_where_it_was(wire, make_config, tmp_path, answer, failure):
    wire.add_model_versions(MODEL, version("1", False, "first version to pass"), version("2", True, CHAMPION_REASON))
    wire.online_endpoint(ENDPOINT, traffic={"student-v1": 100}, **{"student-v1": model_id("1")})
    wire.scoring_answers["student-v2"] = answer
    result = deploy(make_config())
    assert result.exit_code == 1, result.output
    assert failure in result.stderr and "the traffic stays as it was (student-v1 100%)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # the new deployment was made and tested, and no traffic change was sent: it stays at 0% for its logs
    assert wire.sent("PUT", r"/deployments/student-v2$") and scoring_calls(wire)
    assert endpoint_puts(wire) == [] and wire.endpoints[ENDPOINT]["properties"]["traffic"] == {"student-v1": 100}
    assert f"az ml online-deployment get-logs --name student-v2 --endpoint-name {ENDPOINT}" in result.stdout
    assert_key_is_nowhere(wire, result.output, tmp_path)


def test_a_version_by_number_takes_the_traffic_and_retire_deletes_the_old_deployment_after(wire, make_config):
    wire.add_model_versions(MODEL, version("1", True, "first version to pass"), version("2", False, CHALLENGER_REASON))
    wire.online_endpoint(ENDPOINT, traffic={"student-v1": 100}, **{"student-v1": model_id("1")})
    result = deploy(make_config(), "--model", "v2", "--retire", "student-v1")
    assert result.exit_code == 0, result.output
    assert wire.sent("PUT", r"/deployments/student-v2$")[0].body["properties"]["model"] == model_id("2")
    (traffic_put,) = request_index(wire, "PUT", rf"/onlineEndpoints/{ENDPOINT}$")
    (deleted,) = request_index(wire, "DELETE", r"/deployments/student-v1$")
    assert traffic_put < deleted and set(wire.deployments[ENDPOINT]) == {"student-v2"}
    assert "online-deployment delete" not in result.output  # nothing left to retire


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model", "latest"), "error: --model: 'latest' is not a registered version"),
        (("--model", "7"), f"error: --model: {MODEL} has no version 7; registered: 1, 2"),
        (("--retire", "student-v2"), "error: --retire: student-v2 is the deployment that takes the traffic"),
        (("--retire", "student-v9"), f"error: --retire: endpoint {ENDPOINT} has no deployment student-v9; its deployments: "),
    ],
)
def test_a_bad_option_is_one_line_and_changes_nothing(wire, make_config, args, message):
    wire.add_model_versions(MODEL, version("1", False, "first version to pass"), version("2", True, CHAMPION_REASON))
    wire.online_endpoint(ENDPOINT, traffic={"student-v1": 100}, **{"student-v1": model_id("1")})
    result = deploy(make_config(), *args)
    assert result.exit_code == 2 and result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1, result.output
    assert not [sent for sent in wire.requests if sent.method in ("PUT", "DELETE")]


def test_no_champion_yet_is_one_line_naming_the_newest_version_and_why(wire, make_config):
    wire.add_model_versions(MODEL, version("1", False, FAILED_CHECKS))
    result = deploy(make_config())
    assert result.exit_code == 2
    assert "has no @champion yet" in result.stderr and "version 1, was not promoted: failed the promotion checks" in result.stderr
    assert not [sent for sent in wire.requests if sent.method in ("PUT", "DELETE")]


def test_an_aad_token_endpoint_is_created_as_such_and_tells_how_to_get_a_token(wire, make_config, tmp_path):
    wire.add_model_versions(MODEL, version("1", True, "first version to pass"))
    result = deploy(make_config(extra="azure:\n  deployment:\n    auth_mode: aad_token\n    endpoint_name: sentiment-prod\n"))
    assert result.exit_code == 0, result.output
    created = wire.sent("PUT", r"/onlineEndpoints/sentiment-prod$")[0].body["properties"]
    assert created["authMode"] == "AADToken"
    assert not wire.sent("POST", r"/listKeys$")  # the smoke test authenticated with an Entra ID token
    assert "token: az account get-access-token --resource https://ml.azure.com" in result.output
    assert_key_is_nowhere(wire, result.output, tmp_path, key_auth=False)


def test_the_dry_run_writes_yaml_the_sdk_loads_back_and_sends_nothing(wire, make_config, tmp_path):
    from azure.ai.ml import load_online_deployment, load_online_endpoint

    config = make_config(extra=DEPLOYMENT_SECTION)
    result = deploy(config, "--dry-run", "--model", "3")
    assert result.exit_code == 0, result.output
    assert wire.requests == []
    folder = tmp_path / "work" / "azure" / "unit-test" / "deploy"
    endpoint = load_online_endpoint(folder / "endpoint.yaml")
    deployment = load_online_deployment(folder / "deployment.yaml")
    assert endpoint.name == ENDPOINT and endpoint.auth_mode == "key"
    assert deployment.name == "student-v3" and deployment.endpoint_name == ENDPOINT
    assert f"model: azureml:{MODEL}:3" in (folder / "deployment.yaml").read_text()
    assert deployment.model == f"{MODEL}:3"  # the loader strips the azureml: prefix, as `az ml` does
    assert deployment.instance_type == "Standard_DS4_v2" and deployment.instance_count == 2
    request = json.loads((folder / "smoke-request.json").read_text())
    assert request["input_data"] == [records("nli", 1)[0]["messages"][1]["content"]]
    assert f'az ml online-endpoint update --name {ENDPOINT} --traffic "student-v3=100"' in result.output
    # a rerun replaces the files
    assert deploy(config, "--dry-run", "--model", "v3").exit_code == 0


def test_the_dry_run_needs_a_version_number(wire, make_config):
    result = deploy(make_config(), "--dry-run")
    assert result.exit_code == 2 and result.stderr.startswith("error: --model: a dry run looks nothing up")
    assert wire.requests == []


@pytest.mark.parametrize(
    "section, message",
    [
        ("endpoint_name: 9-lives", "azure.deployment.endpoint_name: use 3-32 letters, digits and hyphens"),
        ("endpoint_name: ab", "azure.deployment.endpoint_name: use 3-32 letters"),
        ("min_instances: 2", "autoscale needs min_instances and max_instances together"),
        ("{instance_count: 5, min_instances: 1, max_instances: 3}", "instance_count 5 must lie within min_instances 1 and max"),
        ("auth_mode: password", "azure.deployment.auth_mode"),
        ("smoke_prompts: 0", "azure.deployment.smoke_prompts"),
    ],
)
def test_the_deployment_section_is_checked_when_the_config_loads(make_config, section, message):
    body = f" {section}" if section.startswith("{") else f"\n    {section}"
    config = make_config(extra=f"azure:\n  deployment:{body}\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_config(config)


def test_a_default_endpoint_name_azure_refuses_is_one_line_naming_the_key(wire, make_config):
    result = deploy(make_config(name="unit_test"), "--dry-run", "--model", "1")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: azure.deployment.endpoint_name: the default 'unit_test-student'")


def test_a_deployment_that_fails_to_come_up_leaves_the_traffic_and_points_at_its_logs(wire, make_config):
    wire.add_model_versions(MODEL, version("1", False, "first version to pass"), version("2", True, CHAMPION_REASON))
    wire.online_endpoint(ENDPOINT, traffic={"student-v1": 100}, **{"student-v1": model_id("1")})
    wire.deployment_failures["student-v2"] = "User container has crashed or terminated: liveness probe failed"
    result = deploy(make_config())
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("failed: deployment student-v2 (version 2) did not come up on endpoint unit-test-student")
    assert "liveness probe failed" in result.stderr and "the traffic stays as it was (student-v1 100%)" in result.stderr
    assert not scoring_calls(wire) and endpoint_puts(wire) == []
    assert f"az ml online-deployment get-logs --name student-v2 --endpoint-name {ENDPOINT}" in result.stdout
