"""The smoke test a new online deployment passes before it takes traffic: held-out prompts of data.test sent to that
deployment alone, each answered with non-empty text.

The registered student is an MLflow `transformers` model saved for the text-generation task (azure/injob.py
`package_model`), so Azure ML serves it with its own MLflow scoring script (no-code deployment). That script takes
`{"input_data": [...strings...], "params": {...}}`: a list of strings goes to the model's pyfunc as is, and MLflow's
text-generation pyfunc accepts strings only (no chat messages). Each prompt is therefore the text of the record's
last user turn, and the answer comes back as a JSON list with one generated text per input string.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from azdistill.config.schema import DistillConfig
from azdistill.data.records import Record, read_records
from azdistill.errors import UserError

log = logging.getLogger("azdistill")

# Enough tokens to see the deployment generate, few enough that a CPU instance answers quickly.
SMOKE_MAX_NEW_TOKENS = 32


def smoke_prompts(config: DistillConfig, wanted: int) -> list[str]:
    """The first `wanted` held-out prompts of data.test (the whole split is checked, as every stage checks it).

    A split with fewer prompts than `wanted` gives a warning naming both numbers, and the test uses what there is.
    """
    path = Path(config.data.test)
    if not path.is_file():
        raise UserError(f"data.test: {path} does not exist; the smoke test of a new deployment sends its held-out prompts")
    records = read_records(path, config.task.type, wanted)
    if len(records) < wanted:
        log.warning(
            "azure.deployment.smoke_prompts is %d, but data.test (%s) holds %d prompts: the smoke test sends those %d",
            wanted, path, len(records), len(records),
        )
    return [prompt_text(record) for record in records]


def prompt_text(record: Record) -> str:
    """The text a text-generation model is asked: the prompt's last user turn."""
    return next(message["content"] for message in reversed(record.prompt) if message["role"] == "user")


def request_payload(prompt: str) -> dict[str, Any]:
    """One scoring request for Azure ML's MLflow scoring script (see the module docstring)."""
    return {"input_data": [prompt], "params": {"max_new_tokens": SMOKE_MAX_NEW_TOKENS}}


def answer_texts(raw: Any) -> list[str]:
    """The generated texts in a scoring response: a JSON list of strings (or of {"generated_text": ...} records, or one
    string); the response may arrive as JSON inside a JSON string."""
    value = raw
    for _ in range(2):  # the scoring server may serialize the script's JSON result once more
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError:
                break
    if isinstance(value, dict):
        value = value.get("predictions", value.get("output", [value]))
    if not isinstance(value, list):
        value = [value]
    texts = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("generated_text", next((part for part in item.values() if isinstance(part, str)), ""))
        if isinstance(item, list) and item:
            item = item[0]
        texts.append(item if isinstance(item, str) else "")
    return texts


@dataclass
class SmokeResult:
    """What the smoke test saw: one answer per prompt, and what went wrong with those that failed."""

    deployment: str
    answers: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.answers) and not self.failures


@contextmanager
def _invoke_headers_restored() -> Iterator[None]:
    """Put back the SDK's shared request headers after invoking an endpoint.

    azure-ai-ml 1.35's `OnlineEndpointOperations.invoke` adds the endpoint's key (`Authorization: Bearer ...`) and the
    deployment's name to `EndpointInvokeFields.DEFAULT_HEADER`, a dict shared by the whole process, instead of to a
    copy of it; restoring it keeps the key out of every later request the process makes.
    """
    from azure.ai.ml.constants._endpoint import EndpointInvokeFields

    saved = dict(EndpointInvokeFields.DEFAULT_HEADER)
    try:
        yield
    finally:
        EndpointInvokeFields.DEFAULT_HEADER.clear()
        EndpointInvokeFields.DEFAULT_HEADER.update(saved)


def run_smoke_test(client: Any, endpoint: str, deployment: str, prompts: list[str]) -> SmokeResult:
    """Send each prompt to `deployment` of `endpoint` only (the SDK sets the azureml-model-deployment header, so the
    endpoint's traffic split does not apply); every call must answer with non-empty text."""
    from azure.ai.ml.exceptions import MlException
    from azure.core.exceptions import AzureError

    result = SmokeResult(deployment)
    with tempfile.TemporaryDirectory(prefix="azdistill-smoke-") as folder, _invoke_headers_restored():
        request_file = Path(folder) / "request.json"
        for number, prompt in enumerate(prompts, start=1):
            request_file.write_text(json.dumps(request_payload(prompt)), encoding="utf-8")
            try:
                raw = client.online_endpoints.invoke(
                    endpoint_name=endpoint, deployment_name=deployment, request_file=str(request_file)
                )
            except (AzureError, MlException) as error:  # MlException: an error answer whose body is not JSON
                result.failures.append(f"prompt {number}: {_failure(error)}")
                continue
            texts = answer_texts(raw)
            answer = texts[0].strip() if texts else ""
            if not answer:
                result.failures.append(f"prompt {number}: empty answer")
            result.answers.append(answer)
    return result


def _failure(error: Exception) -> str:
    """`HTTP 500: <the service's first line>` for a failed scoring call."""
    status = getattr(error, "status_code", None) or getattr(getattr(error, "response", None), "status_code", None)
    first_line = (str(getattr(error, "message", "") or error).strip().splitlines() or [""])[0][:200]
    return f"HTTP {status}: {first_line}" if status else f"{type(error).__name__}: {first_line}"
