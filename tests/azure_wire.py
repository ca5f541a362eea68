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
from dataclasses import dataclass, field
from typing import Any, Optional
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
        sent = Sent(request.method, request.url, parts.path, parse_qs(parts.query), body)
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


def workspace_env(monkeypatch) -> None:
    """The workspace in the environment, as a user (or CI) would set it."""
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION)
    monkeypatch.setenv("AZURE_RESOURCE_GROUP", RESOURCE_GROUP)
    monkeypatch.setenv("AZUREML_WORKSPACE_NAME", WORKSPACE)
