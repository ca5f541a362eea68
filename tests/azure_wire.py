"""A fake Azure ML workspace at the HTTP layer, for driving the real azure-ai-ml SDK offline.

Every request the SDK sends (to Azure Resource Manager, the workspace's data plane and blob storage) goes through
`responses`; `FakeWorkspace` answers it like the service would, records it, and fails the test on anything it
does not know. Tests then assert on `wire.requests`: what was really sent.
"""

from __future__ import annotations

import base64
import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import responses

SUBSCRIPTION = "00000000-0000-0000-0000-0000000000aa"
RESOURCE_GROUP = "rg-distill"
WORKSPACE = "ws-distill"
ARM = "https://management.azure.com"
WS_PATH = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.MachineLearningServices/workspaces/{WORKSPACE}"
API_HOST = "https://westeurope.api.azureml.ms"
BLOB = "https://fakestorage.blob.core.windows.net"


def fake_jwt(audience: str = "https://ml.azure.com") -> str:
    """An unsigned JWT: the SDK decodes the ml.azure.com token and checks its audience, nothing more."""

    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    claims = {"aud": audience, "oid": "11111111-1111-1111-1111-111111111111", "tid": "22222222-2222-2222-2222-222222222222", "exp": int(time.time()) + 3600}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


class FakeCredential:
    """A TokenCredential that hands out unsigned JWTs for any scope, and records the scopes asked for."""

    def __init__(self) -> None:
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: Any):
        from azure.core.credentials import AccessToken

        self.scopes.extend(scopes)
        audience = scopes[0].replace("/.default", "") if scopes else "https://ml.azure.com"
        return AccessToken(fake_jwt(audience), int(time.time()) + 3600)


@dataclass
class Sent:
    method: str
    url: str
    path: str
    query: dict
    body: Any
    headers: dict = field(default_factory=dict)  # as sent; only the online endpoint tests read them

    @property
    def text(self) -> str:
        return self.body if isinstance(self.body, str) else json.dumps(self.body)


@dataclass
class FakeWorkspace:
    """Answers the requests of azure-ai-ml 1.35 for jobs, components, environments, code, data, computes,
    schedules and run history, echoing what was sent the way the service does."""

    computes: dict[str, dict] = field(default_factory=lambda: {"cpu-cluster": {}, "gpu-cluster": {}})
    # Registered data assets: name -> versions, oldest first (the last is what `@latest` resolves to).
    data_assets: dict[str, list[str]] = field(
        default_factory=lambda: {name: ["1", "2", "3"] for name in ("sentiment-train", "sentiment-validation", "sentiment-test")}
    )
    status_overrides: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path regex, status)
    jobs: dict[str, dict] = field(default_factory=dict)
    schedules: dict[str, dict] = field(default_factory=dict)
    children: dict[str, list[dict]] = field(default_factory=dict)
    log_texts: dict[str, str] = field(default_factory=dict)
    # Registered model versions by model name, oldest first: {"version": "3", "tags": {...}} each.
    models: dict[str, list[dict]] = field(default_factory=dict)
    # Managed online endpoints and their deployments, as the service stores them (see online_endpoint()).
    endpoints: dict[str, dict] = field(default_factory=dict)
    deployments: dict[str, dict[str, dict]] = field(default_factory=dict)
    endpoint_key: str = "fake-endpoint-primary-key-5d41402abc4b2a76b9719d911017c592"
    # What a deployment's scoring route answers: deployment name -> (status, JSON body); default 200 ["positive"].
    scoring_answers: dict[str, tuple[int, Any]] = field(default_factory=dict)
    # Deployments whose creation fails (the container does not start): deployment name -> the service's message.
    deployment_failures: dict[str, str] = field(default_factory=dict)
    failed_operations: dict[str, str] = field(default_factory=dict)
    requests: list[Sent] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    # -- helpers for tests ------------------------------------------------------------------------
    def sent(self, method: str, pattern: str) -> list[Sent]:
        return [item for item in self.requests if item.method == method and re.search(pattern, item.path)]

    def all_text(self) -> str:
        return "\n".join(f"{item.method} {item.url}\n{item.text}" for item in self.requests)

    def fail(self, method: str, pattern: str, status: int) -> None:
        self.status_overrides.append((method, pattern, status))

    # -- the responder ------------------------------------------------------------------------------
    def install(self, mock: responses.RequestsMock) -> None:
        for method in ("GET", "PUT", "POST", "DELETE", "HEAD", "PATCH"):
            mock.add_callback(method, re.compile(r"https?://.*"), callback=self._respond)

    def _respond(self, request) -> tuple[int, dict, str]:
        parts = urlsplit(request.url)
        body: Any = request.body
        if isinstance(body, bytes):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError:
                body = "<binary>"
        if isinstance(body, str) and body[:1] in "{[":
            try:
                body = json.loads(body)
            except ValueError:
                pass
        sent = Sent(request.method, request.url, parts.path, parse_qs(parts.query), body, dict(request.headers))
        self.requests.append(sent)
        for method, pattern, status in self.status_overrides:
            if method == request.method and re.search(pattern, parts.path):
                return status, {"content-type": "application/json"}, json.dumps({"error": {"code": str(status), "message": f"fake {status}"}})
        answer = self._route(sent, request)
        if answer is None:
            self.unmatched.append(f"{request.method} {request.url}")
            return 404, {"content-type": "application/json"}, json.dumps({"error": {"code": "NotFound", "message": "not faked"}})
        status, payload = answer[0], answer[1]
        headers = {"content-type": "application/json"}
        if len(answer) > 2:
            headers.update(answer[2])
        return status, headers, payload if isinstance(payload, str) else json.dumps(payload)

    def _route(self, sent: Sent, request) -> Optional[tuple]:
        path, method = sent.path, sent.method
        host = urlsplit(sent.url).netloc
        online = self._online_route(sent, host)
        if online is not None:
            return online
        if host.endswith("blob.core.windows.net"):
            if method == "HEAD":
                return 404, ""
            if method == "PUT":
                return (200, "") if "comp=metadata" in sent.url else (201, "")
            if method == "GET":
                return 200, self.log_texts.get(path, "")
            return None
        if host.endswith("api.azureml.ms"):
            if path.endswith("/discovery"):
                return 200, {"api": API_HOST, "history": API_HOST}
            match = re.search(r"/runs/([^/]+)/children$", path)
            if match:
                return 200, {"value": self.children.get(match[1], [])}
            match = re.search(r"/runs/([^/]+)/details$", path)
            if match:
                run_id = match[1]
                files = {"user_logs/std_log.txt": f"{BLOB}/logs/{run_id}/std_log.txt?sig=x"} if f"/logs/{run_id}/std_log.txt" in self.log_texts else {}
                return 200, {"runId": run_id, "status": "Completed", "logFiles": files}
            return None
        if not path.startswith(WS_PATH):
            return None
        rest = path[len(WS_PATH):]
        if rest == "":
            return 200, {
                "id": WS_PATH, "name": WORKSPACE, "location": "westeurope", "kind": "Default",
                "properties": {"discoveryUrl": "https://westeurope.api.azureml.ms/discovery", "mlFlowTrackingUri": "azureml://westeurope.api.azureml.ms/mlflow/v1.0" + WS_PATH},
            }
        match = re.fullmatch(r"/datastores/([^/]+)", rest)
        if match and method == "GET":
            return 200, {
                "id": WS_PATH + rest, "name": match[1],
                "properties": {
                    "datastoreType": "AzureBlob", "accountName": "fakestorage", "containerName": "azureml-blobstore",
                    "endpoint": "core.windows.net", "protocol": "https", "credentials": {"credentialsType": "None"},
                    "isDefault": True,
                },
            }
        match = re.fullmatch(r"/datastores/([^/]+)/listSecrets", rest)
        if match and method == "POST":
            return 200, {"secretsType": "Sas", "sasToken": "sv=2024&sig=x"}
        match = re.fullmatch(r"/computes/([^/]+)", rest)
        if match and method == "GET":
            if match[1] not in self.computes:
                return 404, {"error": {"code": "ResourceNotFound", "message": f"compute {match[1]} not found"}}
            return 200, {"id": WS_PATH + rest, "name": match[1], "properties": {"computeType": "AmlCompute", "properties": {"vmSize": "Standard_D4s_v3", "scaleSettings": {"minNodeCount": 0, "maxNodeCount": 4}}}}
        match = re.fullmatch(r"/data/([^/]+)", rest)
        if match and method == "GET":
            versions = self.data_assets.get(unquote(match[1]))
            if not versions:
                return 404, {"error": {"code": "UserError", "message": f"data container {unquote(match[1])} not found"}}
            return 200, {"id": WS_PATH + rest, "name": match[1], "properties": {"latestVersion": versions[-1], "isArchived": False}}
        match = re.fullmatch(r"/data/([^/]+)/versions/([^/]+)", rest)
        if match and method == "GET":
            name, version = unquote(match[1]), unquote(match[2])
            if version not in self.data_assets.get(name, []):
                return 404, {"error": {"code": "UserError", "message": f"data {name} version {version} not found"}}
            return 200, {
                "id": WS_PATH + rest, "name": version,
                "properties": {"dataType": "uri_file", "dataUri": f"azureml://datastores/workspaceblobstore/paths/data/{name}/{version}.jsonl", "isArchived": False},
            }
        match = re.fullmatch(r"/(environments|components|codes|data|models)/([^/]+)/versions/([^/]+)", rest)
        if match and method == "PUT":
            properties = sent.body.get("properties", {}) if isinstance(sent.body, dict) else {}
            return 200, {"id": WS_PATH + rest, "name": match[3], "properties": properties}
        if match and method == "GET":
            kind, name, version = match.groups()
            return 200, {"id": WS_PATH + rest, "name": version, "properties": {"description": f"{kind} {name}"}}
        match = re.fullmatch(r"/codes/([^/]+)/versions", rest)
        if match and method == "GET":
            return 200, {"value": []}
        match = re.fullmatch(r"/(codes|environments)/([^/]+)/versions/([^/]+)/startPendingUpload", rest)
        if match:
            blob = f"{BLOB}/azureml-blobstore/{match[2]}"
            return 200, {"blobReferenceForConsumption": {"blobUri": blob, "credential": {"credentialType": "SAS", "sasUri": blob + "?sig=x"}}}
        match = re.fullmatch(r"/(data|models)/([^/]+)/versions", rest)
        if match and method == "GET":
            return 200, {"value": []}
        match = re.fullmatch(r"/jobs/([^/]+)", rest)
        if match and method == "PUT":
            properties = dict(sent.body.get("properties", {}))
            properties["status"] = "NotStarted"
            properties["services"] = {"Studio": {"endpoint": f"https://ml.azure.com/runs/{match[1]}?wsid={WS_PATH}"}}
            self.jobs[match[1]] = {"id": WS_PATH + rest, "name": match[1], "properties": properties}
            return 200, self.jobs[match[1]]
        if match and method == "GET":
            if match[1] not in self.jobs:
                return 404, {"error": {"code": "UserError", "message": f"job {match[1]} not found"}}
            return 200, self.jobs[match[1]]
        match = re.fullmatch(r"/schedules/([^/]+)", rest)
        if match and method == "PUT":
            properties = dict(sent.body.get("properties", {}))
            properties["provisioningState"] = "Succeeded"
            properties.setdefault("isEnabled", True)  # the service's default
            self.schedules[match[1]] = {"id": WS_PATH + rest, "name": match[1], "properties": properties}
            return 200, self.schedules[match[1]]
        if match and method == "GET":
            if match[1] not in self.schedules:
                return 404, {"error": {"code": "UserError", "message": f"schedule {match[1]} not found"}}
            return 200, self.schedules[match[1]]
        if match and method == "DELETE":
            self.schedules.pop(match[1], None)
            return 200, ""
        if rest == "/schedules" and method == "GET":
            return 200, {"value": list(self.schedules.values())}
        match = re.fullmatch(r"/schedules/([^/]+)/trigger", rest)
        if match and method == "POST":
            return 200, {"submissionId": f"{match[1]}-manual-1", "scheduleActionType": "CreateJob"}
        return None

    # -- managed online endpoints, their deployments, keys and scoring; registered model versions ----------------
    def add_model_versions(self, name: str, *versions: dict) -> None:
        """Register versions of model `name`: {"version": "3", "tags": {...}} each, oldest first."""
        self.models.setdefault(name, []).extend(versions)

    def online_endpoint(self, name: str, auth_mode: str = "Key", traffic: Optional[dict] = None, **deployments: str) -> None:
        """An endpoint that already exists, with `deployments` (deployment name -> model ARM id) and `traffic`."""
        self.endpoints[name] = self._endpoint_resource(name, {"authMode": auth_mode, "traffic": dict(traffic or {})})
        for deployment, model in deployments.items():
            properties = {"model": model, "instanceType": "Standard_DS3_v2", "endpointComputeType": "Managed"}
            body = {"properties": properties, "sku": {"name": "Default", "capacity": 1}}
            self.deployments.setdefault(name, {})[deployment] = self._deployment_resource(name, deployment, body)

    def _endpoint_resource(self, name: str, properties: dict, tags: Optional[dict] = None) -> dict:
        host = f"https://{name}.westeurope.inference.ml.azure.com"
        properties = {**properties, "provisioningState": "Succeeded", "scoringUri": f"{host}/score"}
        return {
            "id": f"{WS_PATH}/onlineEndpoints/{name}", "name": name,
            "type": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints", "location": "westeurope", "kind": "Managed",
            "tags": tags or {}, "identity": {"type": "SystemAssigned"}, "properties": properties,
        }

    def _deployment_resource(self, endpoint: str, name: str, body: dict) -> dict:
        # The service fills in what a PUT left out: default scale settings, and the state once the deployment is up.
        properties = {"scaleSettings": {"scaleType": "Default"}, **body.get("properties", {}), "provisioningState": "Succeeded"}
        return {
            "id": f"{WS_PATH}/onlineEndpoints/{endpoint}/deployments/{name}", "name": name, "location": "westeurope",
            "kind": "Managed", "type": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments",
            "tags": body.get("tags", {}), "sku": body.get("sku", {"name": "Default", "capacity": 1}), "properties": properties,
        }

    def _accepted(self, resource: dict, status: int = 201, failure: Optional[str] = None) -> tuple:
        """An Azure-AsyncOperation to poll, as ARM answers a long-running PUT (201) or DELETE (202). The SDK reads a
        DELETE's Retry-After as whole seconds, so that one waits a second; a PUT's is polled at once."""
        operation = (
            f"{ARM}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.MachineLearningServices/locations/westeurope"
            f"/mfeOperationsStatus/{'failed' if failure else 'op'}-{len(self.requests)}?api-version=2024-04-01"
        )
        if failure:
            self.failed_operations[operation.split("/")[-1].split("?")[0]] = failure
        return status, resource, {"Azure-AsyncOperation": operation, "Retry-After": "1" if status == 202 else "0.001"}

    def _online_route(self, sent: Sent, host: str) -> Optional[tuple]:
        path, method = sent.path, sent.method
        if host.endswith(".inference.ml.azure.com") and path == "/score" and method == "POST":
            deployment = {key.lower(): value for key, value in sent.headers.items()}.get("azureml-model-deployment", "")
            return self.scoring_answers.get(deployment, (200, ["positive"]))
        if "/mfeOperationsStatus/" in path and method == "GET":
            failure = self.failed_operations.get(path.rsplit("/", 1)[1])
            if failure:
                return 200, {"status": "Failed", "error": {"code": "DeploymentFailed", "message": failure}}
            return 200, {"status": "Succeeded"}
        if not path.startswith(WS_PATH):
            return None
        rest = path[len(WS_PATH):]
        match = re.fullmatch(r"/models/([^/]+)/versions", rest)
        if match and method == "GET" and unquote(match[1]) in self.models:
            name = unquote(match[1])
            return 200, {"value": [self._model_version(name, item) for item in self.models[name]]}
        match = re.fullmatch(r"/models/([^/]+)/versions/([^/]+)", rest)
        if match and method == "GET" and unquote(match[1]) in self.models:
            found = [item for item in self.models[unquote(match[1])] if item["version"] == unquote(match[2])]
            if not found:
                return 404, {"error": {"code": "UserError", "message": f"model {match[1]} version {match[2]} not found"}}
            return 200, self._model_version(unquote(match[1]), found[0])
        match = re.fullmatch(r"/onlineEndpoints/([^/]+)(/listKeys|/deployments(?:/([^/]+))?)?", rest)
        if not match:
            return None
        endpoint, tail, deployment = match[1], match[2] or "", match[3]
        if endpoint not in self.endpoints and not (tail == "" and method == "PUT"):
            return 404, {"error": {"code": "UserError", "message": f"Could not find online endpoint {endpoint}"}}
        if tail == "" and method == "GET":
            return 200, self.endpoints[endpoint]
        if tail == "" and method == "PUT":
            properties, tags = dict(sent.body.get("properties", {})), sent.body.get("tags")
            self.endpoints[endpoint] = self._endpoint_resource(endpoint, properties, tags)
            return self._accepted(self.endpoints[endpoint])
        if tail == "/listKeys" and method == "POST":
            return 200, {"primaryKey": self.endpoint_key, "secondaryKey": self.endpoint_key[::-1]}
        deployments = self.deployments.setdefault(endpoint, {})
        if tail == "/deployments" and method == "GET":
            return 200, {"value": list(deployments.values())}
        if deployment is not None and method == "GET":
            if deployment not in deployments:
                return 404, {"error": {"code": "UserError", "message": f"Could not find deployment {deployment}"}}
            return 200, deployments[deployment]
        if deployment is not None and method == "PUT":
            deployments[deployment] = self._deployment_resource(endpoint, deployment, sent.body)
            failure = self.deployment_failures.get(deployment)
            if failure:
                deployments[deployment]["properties"]["provisioningState"] = "Failed"
            return self._accepted(deployments[deployment], failure=failure)
        if deployment is not None and method == "DELETE":
            deployments.pop(deployment, None)
            return self._accepted({}, 202)
        return None

    def _model_version(self, name: str, item: dict) -> dict:
        """A registered MLflow model version, as the register step leaves it (azure/injob.py register_student)."""
        flavors = {
            "transformers": {"data": {"task": "text-generation"}},
            "python_function": {"data": {"loader_module": "mlflow.transformers"}},
        }
        workspace = f"azureml://subscriptions/{SUBSCRIPTION}/resourcegroups/{RESOURCE_GROUP}/workspaces/{WORKSPACE}"
        store = f"{workspace}/datastores/workspaceartifactstore"
        properties = {
            "tags": item.get("tags", {}), "modelType": "mlflow_model", "isArchived": False, "flavors": flavors,
            "modelUri": f"{store}/paths/{name}/{item['version']}",
        }
        return {"id": f"{WS_PATH}/models/{name}/versions/{item['version']}", "name": item["version"], "properties": properties}


def workspace_env(monkeypatch) -> None:
    """The workspace in the environment, as a user (or CI) would set it."""
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION)
    monkeypatch.setenv("AZURE_RESOURCE_GROUP", RESOURCE_GROUP)
    monkeypatch.setenv("AZUREML_WORKSPACE_NAME", WORKSPACE)


@contextmanager
def installed(monkeypatch) -> Iterator[FakeWorkspace]:
    """A FakeWorkspace behind the real SDK for one test: a fake credential, no retries, the AZURE_* variables of the
    fake workspace; any request it does not know fails the test when it ends."""
    import azdistill.azure.workspace as workspace_module

    fake = FakeWorkspace()
    credential = FakeCredential()
    monkeypatch.setattr(workspace_module, "make_credential", lambda *args, **kwargs: credential)
    monkeypatch.setattr(workspace_module, "CLIENT_OPTIONS", {"retry_total": 0})
    workspace_env(monkeypatch)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        fake.install(mock)
        yield fake
    assert not fake.unmatched, f"requests the fake workspace does not know: {fake.unmatched}"
