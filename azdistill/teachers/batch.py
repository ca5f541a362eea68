"""The provider Batch API of a hosted teacher: OpenAI's `/v1/files` + `/v1/batches` and Azure OpenAI's `/openai/files` +
`/openai/batches?api-version=...` (about half the price, answers within 24 h).

`BatchClient` speaks the protocol (upload a JSONL of requests, create a batch, check on it, download its answers, cancel
it) through the hosted client's own plumbing (`hosted.EndpointTeacher`): its requests session, its credential in the
headers, the Azure api-version. Faults retrying can fix (429, 5xx, dropped connections) are retried with backoff,
honouring Retry-After; a refused credential or a wrong URL is a UserError naming what to check. Creating a batch is
never retried blindly: a create whose answer was lost may have created the batch, so the batches are searched for its
input file first (a second batch would be paid twice).

`BatchAnswered` is the same hosted client answering from the batches' output instead of the network: the request body
is built by its `_send` (the online request, to the byte), answers are parsed and HTTP errors mapped as online, and the
label constraints and votes of `CommittingTeacher` run unchanged. A request with no answer yet raises `Unanswered`,
carrying the line that asks it in the next batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

from azdistill.data.files import atomic_writer
from azdistill.data.records import Message
from azdistill.errors import StageFailed, UserError
from azdistill.secrets import redact
from azdistill.teachers.base import EndpointCompletion, RecordRejected, TransientError
from azdistill.teachers.hosted import RETRYABLE_STATUS, EndpointTeacher, request_url
from azdistill.teachers.limits import ClientStats, estimate_tokens, parse_retry_after
from azdistill.teachers.wire import error_detail

log = logging.getLogger(__name__)

COMPLETION_WINDOW = "24h"  # the only window OpenAI and Azure OpenAI take
TERMINAL = ("completed", "failed", "expired", "cancelled")
# The longest wait between two status checks: a batch takes minutes to hours, and Azure asks for at least a minute.
MAX_POLL_S = 300.0
# Status checks that fail in a row (each after its own retries) before the run stops; the batch keeps running.
MAX_POLL_FAILURES = 10
# An uploaded file Azure still processes is checked this many times (1 s, doubling to 30 s) before the run gives up.
FILE_CHECKS = 40


def batch_api(kind: str, endpoint: str, deployment: Optional[str], api_version: Optional[str]) -> tuple[str, str, str]:
    """`(base URL of files and batches, query string of every call, the url of each request line)` of a teacher.

    Azure OpenAI: `<resource>/openai` with `?api-version=`, or `<resource>/openai/v1` for the v1 API; its lines name
    `/chat/completions` (the deployment is the body's model). OpenAI and compatible servers: beside the
    chat-completions URL, lines naming `/v1/chat/completions`.
    """
    if kind == "azure_openai":
        parts = urlsplit(endpoint)
        root = f"{parts.scheme}://{parts.netloc}"  # the batch API lives at the resource, whatever path the endpoint has
        if api_version == "v1":
            return f"{root}/openai/v1", "", "/chat/completions"
        return f"{root}/openai", f"?api-version={api_version}", "/chat/completions"
    chat = request_url(kind, endpoint, deployment, api_version).split("?")[0]
    return chat.removesuffix("/chat/completions"), "", "/v1/chat/completions"


def status_of(batch: dict) -> str:
    """A batch's status in lower case (Azure's preview API answered `Validating`)."""
    return str(batch.get("status") or "").lower()


class BatchClient:
    """The Batch API of a hosted teacher (see the module docstring). `clock` (epoch seconds) and `sleep` are injectable,
    so tests drive the waiting on a fake clock."""

    def __init__(self, teacher: EndpointTeacher, endpoint: str, api_version: Optional[str],
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        self.teacher = teacher
        self.base, self.query, self.line_url = batch_api(teacher.kind, endpoint, teacher.deployment, api_version)
        self.clock, self.sleep = clock, sleep

    # -- plumbing --------------------------------------------------------------------------------------

    def _url(self, path: str, **params: object) -> str:
        query = self.query
        for name, value in params.items():
            query += ("&" if query else "?") + f"{name}={value}"
        return f"{self.base}/{path}{query}"

    def _backoff(self, fault: int, retry_after: Optional[float]) -> float:
        """The online client's back-off (equal jitter from teacher.backoff_s), but a Retry-After is taken as the
        provider gives it, up to the longest poll."""
        if retry_after is not None:
            return min(retry_after, MAX_POLL_S)
        return self.teacher._backoff(fault, None)

    def _call(self, method: str, path: str, what: str, retries: Optional[int] = None, transfer: bool = False,
              params: Optional[dict] = None, **kwargs):
        """One call, retried while the fault is transient (the teacher's max_retries, backoff honouring Retry-After);
        returns the response. A refusal is a UserError; faults past the retries raise TransientError."""
        import requests

        retries = self.teacher.max_retries if retries is None else retries
        # A file of up to 200 MB goes up or comes down: more than one answer's time.
        timeout = (min(10.0, self.teacher.timeout_s), max(self.teacher.timeout_s, 600.0) if transfer else self.teacher.timeout_s)
        url = self._url(path, **(params or {}))
        faults = 0
        while True:
            headers = self.teacher.headers()
            if kwargs.get("stream"):
                headers.pop("Accept", None)  # a file's content is JSONL, not a JSON document
            if "files" in kwargs:
                headers.pop("Content-Type", None)  # requests writes the multipart boundary
                for _, handle, _ in kwargs["files"].values():
                    handle.seek(0)  # a retry sends the whole file again
            try:
                response = self.teacher._session().request(method, url, headers=headers, timeout=timeout, **kwargs)
            except requests.RequestException as error:
                fault, retry_after = f"request failed: {redact(type(error).__name__)}", None
            else:
                status = response.status_code
                if status < 400:
                    return response
                detail = redact(error_detail(redact(response.text or "")[:2000]))
                if status not in RETRYABLE_STATUS and status < 500:
                    raise UserError(self._refusal(what, status, detail))
                fault, retry_after = f"HTTP {status}: {detail}"[:300], parse_retry_after(response.headers)
            faults += 1
            if faults > retries:
                raise TransientError(f"{what}: {fault}", retry_after)
            delay = self._backoff(faults - 1, retry_after)
            log.debug("batch API fault on %s (%s); retry %d in %.1f s", what, fault, faults, delay)
            self.sleep(delay)

    def _refusal(self, what: str, status: int, detail: str) -> str:
        """The one-line error for a call the batch API refuses (never the credential itself)."""
        where = f"the batch API at {self.base}"
        if status in (401, 403):
            return (f"{where} refused the credential from {self.teacher.credential.source} for {what} (HTTP {status}: "
                    f"{detail[:200]}); check teacher.auth and that the identity may use the batch API")
        if status == 404:
            return (f"{where} answered 404 to {what} ({detail[:200]}); synthesis.mode batch needs a provider Batch API: "
                    "Azure OpenAI with a Global Batch deployment in teacher.deployment and teacher.api_version 2024-10-21 or "
                    "later (or v1), or OpenAI's https://api.openai.com/v1")
        return f"{where} refused {what} (HTTP {status}: {detail[:300]})"

    # -- the protocol ------------------------------------------------------------------------------------

    def check(self) -> None:
        """One cheap call (the newest batch), so that a wrong credential or URL stops the run before any work is lost."""
        self._call("GET", "batches", "listing batches", params={"limit": 1})

    def upload(self, path: Path) -> str:
        """Upload a JSONL of requests with purpose batch; returns its file id once the provider has processed it."""
        with Path(path).open("rb") as handle:
            response = self._call("POST", "files", f"uploading {Path(path).name}", transfer=True, data={"purpose": "batch"},
                                  files={"file": (Path(path).name, handle, "application/jsonl")})
        uploaded = response.json()
        wait = 1.0
        for _ in range(FILE_CHECKS):  # Azure answers `pending` and takes the file in a batch once it is `processed`
            if str(uploaded.get("status") or "processed").lower() not in ("pending", "running", "uploaded"):
                break
            self.sleep(wait)
            wait = min(30.0, wait * 2)
            uploaded = self._call("GET", f"files/{uploaded['id']}", "checking the uploaded file").json()
        status = str(uploaded.get("status") or "processed").lower()
        if status == "error":
            raise UserError(f"the batch API at {self.base} could not process {Path(path).name}: "
                            f"{redact(str(uploaded.get('status_details') or 'no details'))[:300]}")
        if status in ("pending", "running"):
            raise StageFailed(f"the batch API at {self.base} still processes {Path(path).name} ({uploaded['id']}); "
                              "run again later")
        return str(uploaded["id"])

    def create(self, input_file_id: str) -> dict:
        """Create the batch of an uploaded file (window 24h); returns the batch. A create whose answer was lost is looked up
        by its input file before it is sent again, so that a batch is never created (and paid) twice."""
        body = {"input_file_id": input_file_id, "endpoint": self.line_url, "completion_window": COMPLETION_WINDOW,
                "metadata": {"created_by": "azdistill synthesize"}}
        faults = 0
        while True:
            try:
                if faults:  # the create before may have made the batch and lost only its answer
                    found = self.find(input_file_id)
                    if found is not None:
                        return found
                return self._call("POST", "batches", "creating the batch", retries=0, json=body).json()
            except TransientError as fault:
                faults += 1
                if faults > self.teacher.max_retries:
                    raise StageFailed(f"synthesize: the batch API at {self.base} did not create the batch of {input_file_id} "
                                      f"({fault}); run again to retry (the file is uploaded)") from None
                self.sleep(self._backoff(faults - 1, fault.retry_after))

    def find(self, input_file_id: str, pages: int = 10) -> Optional[dict]:
        """The newest batch of this input file among the latest `pages` x 100 batches, or None."""
        after = None
        for _ in range(pages):
            params = {"limit": 100, **({"after": after} if after else {})}
            listing = self._call("GET", "batches", "listing batches", params=params).json()
            batches = listing.get("data") or []
            for batch in batches:
                if batch.get("input_file_id") == input_file_id:
                    return batch
            if not listing.get("has_more") or not batches:
                return None
            after = batches[-1].get("id")
        return None

    def retrieve(self, batch_id: str) -> tuple[dict, Optional[float]]:
        """The batch as the provider sees it now, and the Retry-After its answer carried (None if none)."""
        response = self._call("GET", f"batches/{batch_id}", f"checking batch {batch_id}")
        return response.json(), parse_retry_after(response.headers)

    def cancel(self, batch_id: str) -> dict:
        """Ask the provider to stop a batch (it keeps and bills what was answered); returns the batch."""
        return self._call("POST", f"batches/{batch_id}/cancel", f"cancelling batch {batch_id}").json()

    def download(self, file_id: str, path: Path) -> None:
        """A file's content (an output or error file) into `path`, atomically; a dropped download starts again."""
        import requests

        faults = 0
        while True:
            try:
                response = self._call("GET", f"files/{file_id}/content", f"downloading {file_id}", transfer=True, stream=True)
                with atomic_writer(path, "wb") as out:
                    for chunk in response.iter_content(1 << 20):
                        out.write(chunk)
                return
            except requests.RequestException as error:
                faults += 1
                if faults > self.teacher.max_retries:
                    raise StageFailed(f"synthesize: downloading {file_id} from {self.base} failed {faults} times "
                                      f"({redact(type(error).__name__)}); run again to retry") from None
                self.sleep(self._backoff(faults - 1, None))

    def wait(self, batch_id: str, first_wait_s: float, report: Callable[[dict], None]) -> dict:
        """Check on a batch until it ends (completed, failed, expired or cancelled) and return it; `report` sees it after
        each check. The wait between checks starts at `first_wait_s` and doubles up to MAX_POLL_S (or `first_wait_s` if
        longer); a Retry-After is honoured. Checks that keep failing stop the run (the batch keeps running)."""
        wait, failures = first_wait_s, 0
        while True:
            try:
                batch, retry_after = self.retrieve(batch_id)
            except TransientError as fault:
                failures += 1
                if failures >= MAX_POLL_FAILURES:
                    raise StageFailed(f"synthesize: batch {batch_id} could not be checked {failures} times in a row ({fault}); "
                                      "it keeps running at the provider: run again to resume waiting for it") from None
                log.warning("synthesize: batch %s could not be checked (%s); checking again", batch_id, fault)
                retry_after = fault.retry_after
            else:
                failures = 0
                report(batch)
                if status_of(batch) in TERMINAL:
                    return batch
            self.sleep(max(wait, retry_after or 0.0))
            wait = min(max(first_wait_s, MAX_POLL_S), wait * 2)


# -- answers from the batches' output --------------------------------------------------------------------


class Unanswered(Exception):
    """A request no batch has answered yet, or one answered with a fault worth asking again (429, 5xx, expired):
    `line` asks it in the next batch, `reason` says what the last batch answered (None: never asked)."""

    def __init__(self, line: dict, reason: Optional[str]):
        super().__init__(reason or "not asked yet")
        self.line, self.reason = line, reason


class _NoAnswer(Exception):
    """Raised by the stored-answer session: the batches hold no usable answer to this body."""

    def __init__(self, reason: Optional[str]):
        super().__init__(reason or "not asked yet")
        self.reason = reason


def request_id(tag: str, body: bytes) -> str:
    """The `custom_id` of a record's request: the record's tag (split and index) and a digest of the exact body, so a
    record's next request (a fallback, more votes) has its own id and no answer is ever read for another body."""
    return f"{tag}-{hashlib.blake2b(body, digest_size=6).hexdigest()}"


class _StoredResponse:
    """A batch output line's `response` as `EndpointTeacher.read_response` reads an HTTP response."""

    def __init__(self, response: dict):
        self.status_code = int(response["status_code"])
        self._body = response.get("body")
        self.headers: dict = {}  # no Retry-After: a fault is asked again in the next batch, not after a pause
        shown = self._body if self._body is not None else {k: v for k, v in response.items() if k != "status_code"}
        self.text = shown if isinstance(shown, str) else json.dumps(shown, ensure_ascii=False)

    def json(self):
        return json.loads(self._body) if isinstance(self._body, str) else self._body


class BatchAnswered(EndpointTeacher):
    """The hosted client `teacher`, its requests answered from the batches' output (`lookup`: custom_id -> the stored
    output line, or None). `for_record(tag)` names the record asked next; with `final` set (no batch is left this run),
    a request without an answer rejects its record as retryable instead of raising `Unanswered`."""

    def __init__(self, teacher: EndpointTeacher, lookup: Callable[[str], Optional[dict]], line_url: str):
        # The client as the config built it (request body, label mode, votes, budget), so that each batch line is the
        # request online mode sends; build_endpoint_teacher is the one place that turns a config into those settings.
        vars(self).update(vars(teacher))
        self.stats = ClientStats()  # a stored answer read back is no request: the batches' own counts are the figures
        self._lookup = lookup
        self._tag = ""
        self._asked: tuple[str, dict] = ("", {})  # the custom_id and body of the last request asked
        self.line_url = line_url
        # Online, Azure OpenAI's classic API names the deployment in the URL; a batch line names it as the body's model.
        self._line_model = teacher.deployment if teacher.kind == "azure_openai" else None
        self.final = False
        self.batches = 0  # batches collected this run, for the reason of a record left without an answer

    def for_record(self, tag: str) -> None:
        self._tag = tag

    def _send(self, messages: Sequence[Message], extra: Optional[dict] = None) -> list[EndpointCompletion]:
        """The answer the batches' output holds for the request online mode would send, read as online reads an
        HTTP response; nothing reaches the network, and no credential is read."""
        data = self.request_body(messages, extra)
        custom_id = request_id(self._tag, data)
        self._asked = (custom_id, json.loads(data))
        stored = self._lookup(custom_id)
        if stored is None:
            raise _NoAnswer(None)
        response = stored.get("response")
        if not isinstance(response, dict) or "status_code" not in response:
            error = stored.get("error") or {}
            raise _NoAnswer(redact(f"{error.get('code') or 'no answer'}: {error.get('message') or 'no details'}")[:300])
        return self.read_response(_StoredResponse(response), extra)

    def close(self) -> None:
        """Nothing to close: the sessions are the online client's."""

    def _ask(self, messages, stop=None, extra: Optional[dict] = None, choices: int = 1):
        """The stored answer to the request online mode would send (refusals raised as online); raises `Unanswered`
        (or, when `final`, RecordRejected retryable) for a request the batches have not answered usably."""
        try:
            answers = self._send(messages, extra)
        except _NoAnswer as missing:
            raise self._ask_again(missing.reason) from None
        except TransientError as fault:  # a 429 or 5xx line, or an unreadable answer: worth another batch
            raise self._ask_again(str(fault)) from None
        first = answers[0]
        if not first.prompt_tokens:
            first.prompt_tokens = max(1, estimate_tokens(messages))  # as online: the estimate where the endpoint names none
        self.stats.count(answered=1)
        return answers

    def _ask_again(self, reason: Optional[str]) -> Exception:
        custom_id, body = self._asked
        if self.final:
            last = f"last: {reason}" if reason else "this request was never sent"
            return RecordRejected(f"no answer after {self.batches} batches ({last}); asked again on the next run", retryable=True)
        if self._line_model and "model" not in body:
            body = {**body, "model": self._line_model}
        return Unanswered({"custom_id": custom_id, "method": "POST", "url": self.line_url, "body": body}, reason)
