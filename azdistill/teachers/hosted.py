"""A chat-completions client for hosted teachers that keeps to the endpoint's limits and survives its faults.

One `EndpointTeacher` serves any OpenAI-style `/chat/completions` endpoint: Azure OpenAI deployments, Azure AI
Foundry serverless (models-as-a-service) endpoints, Azure ML managed online endpoints and OpenAI-compatible
servers such as vLLM. Requests go out from a thread pool through one `AdaptiveRateLimiter`, which

- paces requests (never faster than `requests_per_minute`, and otherwise finds the endpoint's limit itself:
  it speeds up while answers come back and slows down on each 429),
- stops every worker until the time a 429 names in `retry-after-ms` or `Retry-After` has passed,
- keeps a token bucket for `tokens_per_minute`.

Faults that retrying can fix (429, 408, 5xx, timeouts, dropped connections) are retried with exponential
backoff and jitter. Faults it cannot fix are not retried: a 400 from a content filter or a too-long prompt
rejects that record (`RecordRejected`), 401/403/404 stop the run at once (`UserError`). A hard budget
(`Budget`) reserves the worst-case price of each request before sending it, so the spend never passes it.

Label-constrained answers and self-consistency votes (`constrained.CommittingTeacher`) go through the same requests.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from azdistill.data.records import Message
from azdistill.errors import UserError
from azdistill.models.generation import Completion
from azdistill.secrets import redact
from azdistill.teachers.base import EndpointCompletion, RecordRejected, Stopped, TransientError
from azdistill.teachers.constrained import CommittingTeacher, StructuredOutputRefused, commitment, refuses_structured_output
from azdistill.teachers.credentials import Credential
from azdistill.teachers.limits import (
    THROTTLE_RETRY_FACTOR,
    AdaptiveRateLimiter,
    Budget,
    ClientStats,
    estimate_tokens,
    parse_retry_after,
)
from azdistill.teachers.wire import error_detail, read_choice, rejection_reason, unsupported_setting_fix

log = logging.getLogger(__name__)


RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# After this many non-retryable 400s in a row with no answer in between, the settings are wrong, not the records.
MAX_CONSECUTIVE_BAD_REQUESTS = 25


def request_url(kind: str, endpoint: str, deployment: Optional[str], api_version: Optional[str]) -> str:
    """The chat-completions URL of an endpoint of this kind."""
    if endpoint.endswith("/chat/completions"):
        url = endpoint
    elif kind == "azure_openai":
        if api_version == "v1":
            return f"{endpoint}/openai/v1/chat/completions"
        return f"{endpoint}/openai/deployments/{deployment}/chat/completions?api-version={api_version}"
    elif kind == "online_endpoint" and not endpoint.endswith("/v1"):
        url = f"{endpoint}/v1/chat/completions"
    else:
        url = f"{endpoint}/chat/completions"
    if api_version and kind == "serverless":
        url += ("&" if "?" in url else "?") + f"api-version={api_version}"
    return url


class EndpointTeacher(CommittingTeacher):
    """A hosted teacher. `complete()` answers one conversation (thread-safe); `answer()` answers a batch; `choose_one()`
    and `choose()` answer with one of a task's labels."""

    mode = "concurrent"

    def __init__(
        self,
        kind: str,
        endpoint: str,
        credential: Credential,
        model: Optional[str] = None,
        deployment: Optional[str] = None,
        api_version: Optional[str] = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: Optional[int] = None,
        top_logprobs: int = 0,
        max_tokens_field: str = "max_tokens",
        reasoning_effort: Optional[str] = None,
        sampling_parameters: bool = True,
        timeout_s: float = 120.0,
        max_concurrency: int = 32,
        max_retries: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        limiter: Optional[AdaptiveRateLimiter] = None,
        budget: Optional[Budget] = None,
        label_mode: str = "json_schema",
        self_consistency: int = 1,
        vote_task: Optional[str] = None,
        vote_labels: Sequence[str] = (),
    ):
        self.kind = kind
        self.url = request_url(kind, endpoint, deployment, api_version)
        self.name = deployment if kind == "azure_openai" else (model or endpoint)
        self.credential = credential
        self.deployment = deployment
        self.concurrency = max_concurrency
        self.batch_size = max_concurrency
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.limiter = limiter or AdaptiveRateLimiter()
        self.budget = budget or Budget(None, None, None)
        self.stats = ClientStats()
        # Reasoning models (o-series) refuse max_tokens and want max_completion_tokens, which counts their thinking too.
        self.body: dict[str, Any] = {max_tokens_field: max_new_tokens}
        if sampling_parameters:  # o-series answer 400 'Unsupported parameter' to any of these, even at their defaults
            self.body.update(temperature=temperature, top_p=top_p)
            if presence_penalty:
                self.body["presence_penalty"] = presence_penalty
            if frequency_penalty:
                self.body["frequency_penalty"] = frequency_penalty
        if reasoning_effort:
            self.body["reasoning_effort"] = reasoning_effort
        if seed is not None:
            self.body["seed"] = seed
        if kind == "azure_openai" and api_version == "v1":
            self.body["model"] = deployment
        elif kind != "azure_openai" and model and model != "builtin":
            self.body["model"] = model
        if top_logprobs:
            self.body["logprobs"] = True
            self.body["top_logprobs"] = top_logprobs
        self._local = threading.local()
        self._sessions: list = []
        self._sessions_lock = threading.Lock()
        self._bad_requests_in_a_row = 0
        self._prompt_token_ratio = 1.0  # real/estimated prompt tokens, learned from answers
        # For tail hedging: each worker thread's request out (send time), and the recent answers' latencies.
        self._out_since: dict[int, float] = {}
        self._latencies: collections.deque = collections.deque(maxlen=256)
        self.label_mode, self._mode_lock = label_mode, threading.Lock()
        self.self_consistency, self.vote_task, self.vote_labels = self_consistency, vote_task, list(vote_labels)

    # -- plumbing ------------------------------------------------------------------------------------

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests
            from requests.adapters import HTTPAdapter

            session = requests.Session()
            # Our own retry loop decides what to retry; the adapter must not retry behind its back.
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        secret = self.credential.secret()
        if secret:
            if self.kind == "azure_openai" and not self.credential.is_token:
                headers["api-key"] = secret
            else:
                headers["Authorization"] = f"Bearer {secret}"
        if self.kind == "online_endpoint" and self.deployment:
            headers["azureml-model-deployment"] = self.deployment
        return headers

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        ceiling = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # "equal jitter": never zero, never in lockstep
        if retry_after is not None:
            delay = min(max(retry_after, 0.0), self.max_backoff_s * 10) + random.uniform(0, 0.05)
        return delay

    # -- one request -----------------------------------------------------------------------------------

    def request_body(self, messages: Sequence[Message], extra: Optional[dict] = None) -> bytes:
        """The request as sent: the client's body with `extra` keys and the messages (also a batch line's body)."""
        return json.dumps(dict(self.body, **(extra or {}), messages=list(messages)), ensure_ascii=False).encode("utf-8")

    def _send(self, messages: Sequence[Message], extra: Optional[dict] = None) -> list[EndpointCompletion]:
        import requests

        data = self.request_body(messages, extra)
        self.stats.count(requests=1)
        try:
            response = self._session().post(
                self.url, data=data, headers=self.headers(), timeout=(min(10.0, self.timeout_s), self.timeout_s),
            )
        except requests.Timeout:
            raise TransientError(f"no answer within {self.timeout_s:g} s") from None
        except requests.ConnectionError as error:
            raise TransientError(f"connection failed: {redact(type(error).__name__)}") from None
        except requests.exceptions.InvalidHeader as error:
            # requests prints the refused header value through repr(): the key, escaped. No retry can fix it.
            message = redact(str(error))
            raise UserError(self._unsendable_header(message != str(error), message)) from None
        except UnicodeEncodeError as error:
            # http.client encodes headers as Latin-1; its error holds the whole header value in `object`.
            secret = self.credential.secret() or ""
            raise UserError(self._unsendable_header(bool(secret) and secret in str(error.object), "a character outside Latin-1")) from None
        except requests.RequestException as error:
            raise TransientError(f"request failed: {redact(str(error))[:200]}") from None
        return self.read_response(response, extra)

    def read_response(self, response, extra: Optional[dict] = None) -> list[EndpointCompletion]:
        """The answers of a response (status_code, text, headers, json()), or the error its status means: transient
        (429, 5xx, unreadable), the settings' or credential's fault (UserError), or this record's (RecordRejected)."""
        status = response.status_code
        if status == 200:
            return self._parse_choices(response)
        text = redact(response.text or "")[:2000]
        # Again once decoded: a key echoed inside a JSON string is escaped twice (JSON over repr), once after decoding.
        detail = redact(error_detail(text))
        if status == 429:
            raise TransientError("HTTP 429 (rate limited)", parse_retry_after(response.headers), throttled=True)
        if status in RETRYABLE_STATUS or status >= 500:
            raise TransientError(f"HTTP {status}: {detail}"[:300], parse_retry_after(response.headers))
        if status in (401, 403):
            raise UserError(
                f"teacher endpoint {self.url.split('?')[0]} refused the credential from {self.credential.source} "
                f"(HTTP {status}: {detail[:200]}); check teacher.auth and that the identity may call this endpoint"
            )
        if status == 404:
            raise UserError(
                f"teacher endpoint {self.url.split('?')[0]} answered 404 ({detail[:200]}); check teacher.endpoint, "
                f"teacher.deployment / teacher.model and teacher.api_version"
            )
        if extra and "response_format" in extra and refuses_structured_output(status, text):
            raise StructuredOutputRefused(f"HTTP {status}: {detail[:200]}")
        fix = unsupported_setting_fix(text)
        if fix:  # the same for every record: the settings are wrong, not this record
            raise UserError(f"teacher endpoint {self.url.split('?')[0]} refused a request setting (HTTP {status}: {detail[:300]}); {fix}")
        raise RecordRejected(rejection_reason(status, text, detail))

    def _unsendable_header(self, is_credential: bool, detail: str) -> str:
        """The error for a request header the HTTP library refuses to send (never its value)."""
        url = self.url.split("?")[0]
        if is_credential:
            return (
                f"teacher endpoint {url}: the credential from {self.credential.source} cannot go into an HTTP header (it "
                f"holds a line break, a control character or a character outside Latin-1); set it again without it"
            )
        return f"teacher endpoint {url}: a request header cannot be sent ({detail[:200]}); check teacher.deployment"

    def _parse(self, response) -> EndpointCompletion:
        """The first choice of an answer, with the usage of the whole answer."""
        return self._parse_choices(response)[0]

    def _parse_choices(self, response) -> list[EndpointCompletion]:
        """Every choice of an answer (several when `n` asked for them); the usage of all of them is on the first."""
        try:
            data = response.json()
            choices = [read_choice(choice) for choice in data["choices"]]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise TransientError("unreadable answer (not a chat completion)") from None
        if not choices:
            raise TransientError("unreadable answer (no choices)")
        usage = data.get("usage") or {}
        remaining = (getattr(response, "headers", None) or {}).get("x-ratelimit-remaining-requests")
        choices[0].remaining_requests = int(remaining) if remaining and remaining.strip().isdecimal() else None
        choices[0].prompt_tokens = int(usage.get("prompt_tokens") or 0)
        choices[0].completion_tokens = int(usage.get("completion_tokens") or 0)
        return choices


    def _ask(self, messages: Sequence[Message], stop: Optional[threading.Event] = None, extra: Optional[dict] = None,
             choices: int = 1) -> list[EndpointCompletion]:
        """One request (with `extra` body keys; `choices` answers asked of it), retrying what can be retried; every
        answer's usage is on the first. Raises RecordRejected, UserError, BudgetExceeded, Stopped or
        StructuredOutputRefused."""
        estimate = max(1, int(estimate_tokens(messages) * self._prompt_token_ratio))
        field = "max_completion_tokens" if "max_completion_tokens" in self.body else "max_tokens"
        worst = int((extra or {}).get(field, self.max_new_tokens)) * choices  # the most the answers may take
        reserved = self.budget.reserve(estimate, worst)
        faults = throttles = 0
        last_fault = ""
        try:
            while True:
                if stop is not None and stop.is_set():
                    raise Stopped()
                self._out_since.pop(threading.get_ident(), None)  # waiting for its turn is not a slow request
                ticket = self.limiter.acquire(estimate + worst, stop)
                self._out_since[threading.get_ident()] = ticket.sent_at
                try:
                    answers = self._send(messages, extra)
                except TransientError as error:
                    self.limiter.refund(estimate + worst)
                    if error.throttled:
                        throttles += 1
                        self.stats.count(throttled=1)
                        self.limiter.on_throttle(error.retry_after, ticket)
                        if throttles > self.max_retries * THROTTLE_RETRY_FACTOR + THROTTLE_RETRY_FACTOR:
                            raise RecordRejected(f"teacher kept answering 429 (rate limited) {throttles} times; gave up", retryable=True) from None
                        continue  # the limiter holds everyone back until the server's hint has passed
                    self.limiter.on_accepted(ticket)  # a fault after admission still counted against the limit
                    faults += 1
                    last_fault = str(error)
                    self.stats.fault(last_fault.split(":")[0].split(" (")[0])
                    if faults > self.max_retries:
                        raise RecordRejected(f"teacher failed {faults} times in a row; last: {last_fault}", retryable=True) from None
                    self.stats.count(retries=1)
                    delay = self._backoff(faults - 1, error.retry_after)
                    log.debug("teacher fault (%s); retry %d in %.2f s", last_fault, faults, delay)
                    if stop is not None:
                        if stop.wait(delay):
                            raise Stopped() from None
                    else:
                        time.sleep(delay)
                    continue
                except (RecordRejected, StructuredOutputRefused) as refusal:
                    self.limiter.on_accepted(ticket)
                    self.limiter.refund(estimate + worst)
                    if isinstance(refusal, RecordRejected):
                        self._count_bad_request()
                    raise
                with self._sessions_lock:
                    self._bad_requests_in_a_row = 0
                self._latencies.append(time.monotonic() - ticket.sent_at)
                self.limiter.on_accepted(ticket)
                self.limiter.on_success(answers[0].remaining_requests)
                first = answers[0]
                self.limiter.refund(estimate + worst - first.prompt_tokens - first.completion_tokens)
                if first.prompt_tokens:
                    # Learn how our character-based estimate compares with the endpoint's tokenizer.
                    self._prompt_token_ratio = 0.9 * self._prompt_token_ratio + 0.1 * first.prompt_tokens / max(1, estimate_tokens(messages))
                else:
                    first.prompt_tokens = estimate
                self.stats.count(answered=1)
                self.budget.settle(reserved, first.prompt_tokens, first.completion_tokens)
                reserved = 0.0
                return answers
        finally:
            self._out_since.pop(threading.get_ident(), None)
            if reserved:
                self.budget.release(reserved)

    def request_out_since(self, thread: int) -> Optional[float]:
        return self._out_since.get(thread)

    def median_request_s(self) -> Optional[float]:
        latencies = sorted(self._latencies)
        return latencies[len(latencies) // 2] if len(latencies) >= 8 else None

    def _count_bad_request(self) -> None:
        """Count a refused record; too many in a row with no answer between mean the settings are wrong (UserError)."""
        with self._sessions_lock:
            self._bad_requests_in_a_row += 1
            too_many = self._bad_requests_in_a_row >= MAX_CONSECUTIVE_BAD_REQUESTS
        self.stats.count(rejected=1)
        if too_many:
            raise UserError(
                f"the teacher endpoint refused {MAX_CONSECUTIVE_BAD_REQUESTS} requests in a row with no answer in "
                f"between; the settings are likely wrong (run `azdistill preflight` to see one refusal)"
            ) from None

    def answer(self, conversations: Sequence[list[Message]]) -> list[Completion]:
        """The `Teacher` interface: answer a batch concurrently, in order. A refused record gets an empty answer."""
        def one(messages):
            try:
                return self.complete(messages)
            except RecordRejected as error:
                return EndpointCompletion(text="", finish_reason=f"refused: {error}", prompt_tokens=0, completion_tokens=0)

        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(conversations)))) as pool:
            return list(pool.map(one, conversations))


def build_endpoint_teacher(config, credential: Optional[Credential] = None, spent: float = 0.0) -> EndpointTeacher:
    """An `EndpointTeacher` for a config whose teacher is hosted (the credential resolved from teacher.auth)."""
    from azdistill.teachers.credentials import resolve_credential

    teacher, synthesis = config.teacher, config.synthesis
    if credential is None:
        credential = resolve_credential(teacher, getattr(config, "azure", None))
    priced = teacher.price_per_million_prompt_tokens is not None or teacher.price_per_million_completion_tokens is not None
    if synthesis.max_cost is not None and not priced:
        raise UserError("synthesis.max_cost needs teacher.price_per_million_prompt_tokens and teacher.price_per_million_completion_tokens")
    return EndpointTeacher(
        kind=teacher.kind,
        endpoint=teacher.endpoint,
        credential=credential,
        model=teacher.model,
        deployment=teacher.deployment,
        api_version=teacher.api_version,
        max_new_tokens=synthesis.max_new_tokens,
        temperature=synthesis.temperature,
        top_p=synthesis.top_p,
        presence_penalty=synthesis.presence_penalty,
        frequency_penalty=synthesis.frequency_penalty,
        seed=synthesis.seed,
        top_logprobs=synthesis.top_logprobs,
        max_tokens_field=teacher.max_tokens_field,
        reasoning_effort=teacher.reasoning_effort,
        sampling_parameters=teacher.sampling_parameters,
        timeout_s=teacher.timeout_s,
        max_concurrency=teacher.max_concurrency,
        max_retries=teacher.max_retries,
        backoff_s=teacher.backoff_s,
        max_backoff_s=teacher.max_backoff_s,
        limiter=AdaptiveRateLimiter(teacher.requests_per_minute, teacher.tokens_per_minute),
        budget=Budget(teacher.price_per_million_prompt_tokens, teacher.price_per_million_completion_tokens, synthesis.max_cost, spent),
        **commitment(config),
    )
