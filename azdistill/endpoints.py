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
"""

from __future__ import annotations

import collections
import json
import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from azdistill.data import Message
from azdistill.errors import StageFailed, UserError
from azdistill.generation import Completion
from azdistill.secrets import Credential, redact

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# How far back the limiter counts requests the endpoint accepted, to measure its limit when it says 429.
ACCEPTED_WINDOW_S = 1.0
# A request waiting for its turn re-reads the pace at least this often.
MAX_NAP_S = 0.05
# At most one slow-down per throttling episode: the 429s of requests already in flight are one event.
THROTTLE_EPISODE_S = 1.0
# 429s are the endpoint pacing us, not failing; they are waited out this many times more often than faults.
THROTTLE_RETRY_FACTOR = 20
# After this many non-retryable 400s in a row with no answer in between, the settings are wrong, not the records.
MAX_CONSECUTIVE_BAD_REQUESTS = 25


@dataclass
class EndpointCompletion(Completion):
    """A hosted teacher's answer: the completion plus the top-k log-probabilities of its tokens, if returned."""

    logprobs: Optional[list] = None


class RecordRejected(Exception):
    """The endpoint refused this record for a reason that retrying cannot change (content filter, too long).

    `retryable` marks a record given up on after repeated transient faults: a later resume asks for it again.
    """

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class Stopped(Exception):
    """The run is stopping (another worker hit a fatal error); this request was not sent."""


class BudgetExceeded(StageFailed):
    """Sending the next request could take the spend past synthesis.max_cost."""


class TransientError(Exception):
    """A fault worth retrying: 429, 5xx, timeout, dropped connection, unreadable answer."""

    def __init__(self, message: str, retry_after: Optional[float] = None, throttled: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.throttled = throttled


def parse_retry_after(headers: Any, now=time.time) -> Optional[float]:
    """Seconds to wait as the server asks: `retry-after-ms` (Azure OpenAI) wins over `Retry-After` (seconds or an HTTP date,
    counted from `now()`)."""
    value = headers.get("retry-after-ms") or headers.get("x-ms-retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now())
            except (TypeError, ValueError):
                return None
    return None


def estimate_tokens(messages: Sequence[Message]) -> int:
    """A rough prompt size before the endpoint tells us the real one: ~4 characters a token, plus per-message overhead."""
    return sum(len(message["content"]) // 4 + 4 for message in messages) + 3


# ---------------------------------------------------------------------------------------------------
# Rate limiting


class AdaptiveRateLimiter:
    """Shared by all workers: paces requests, honours the server's retry hints, and keeps to token budgets.

    Without a configured request budget it starts at `initial_rate` requests/s and doubles each second (slow
    start) until the first 429. A 429 means the endpoint's limit was reached, so the rate the endpoint was
    accepting over the last second is a measurement of that limit: the pace drops to just under it (and at
    least by the factor `decrease`, at most once per throttling episode). While answers come back the pace
    creeps up again by `increase` of itself per second, like TCP's congestion avoidance, so a limit that
    rises is found too. A configured `requests_per_minute` caps the rate.
    """

    def __init__(
        self,
        requests_per_minute: Optional[float] = None,
        tokens_per_minute: Optional[float] = None,
        initial_rate: float = 16.0,
        decrease: float = 0.97,
        increase: float = 0.04,
        min_rate: float = 0.05,
        clock=time.monotonic,
        sleep=time.sleep,
    ):
        self._lock = threading.Lock()
        self._gate = threading.Lock()  # requests waiting for their turn queue here
        # Injectable together, so tests drive the pacing on a fake clock instead of the wall clock.
        self._clock, self._sleep = clock, sleep
        self.max_rate = requests_per_minute / 60.0 if requests_per_minute else math.inf
        # A configured budget is the deployment's quota: pace at it from the start; otherwise find the limit.
        self.rate = self.max_rate if requests_per_minute else initial_rate
        self.slow_start = requests_per_minute is None
        self.decrease, self.increase, self.min_rate = decrease, increase, min_rate
        self._next_at = 0.0
        self.blocked_until = 0.0
        self._last_decrease = -math.inf
        self.tokens_per_s = tokens_per_minute / 60.0 if tokens_per_minute else None
        # Azure evaluates token budgets over short windows; a bucket of 10 seconds' worth allows small bursts.
        self._token_capacity = (tokens_per_minute / 6.0) if tokens_per_minute else 0.0
        self._tokens = self._token_capacity
        self._tokens_at = clock()
        self.throttled = 0
        # When the endpoint accepted (answered with anything but 429) each recent request: the measured limit.
        self._accepted: collections.deque = collections.deque()

    def acquire(self, tokens: int = 0, stop: Optional[threading.Event] = None) -> None:
        """Wait for this request's turn (and its tokens); returns when it may be sent.

        Waiting requests queue at a gate; only the one at the head waits for the clock, and it computes its
        slot from the current pace, so a change of pace (or a 429's pause) applies to the very next request
        rather than after slots handed out in advance at the old pace.
        """
        while not self._gate.acquire(timeout=0.1):
            if stop is not None and stop.is_set():
                raise Stopped()
        try:
            while True:
                if stop is not None and stop.is_set():
                    raise Stopped()
                with self._lock:
                    now = self._clock()
                    ready_at = max(self._next_at, self.blocked_until)
                    if now >= ready_at:
                        wait = self._take_tokens(tokens, now)
                        if wait <= 0:
                            self._next_at = max(self._next_at, now) + 1.0 / self.rate
                            return
                    else:
                        wait = ready_at - now
                # Short naps: the pace or a pause may change while we wait.
                nap = min(wait, MAX_NAP_S)
                if stop is not None:
                    if stop.wait(nap):
                        raise Stopped()
                else:
                    self._sleep(nap)
        finally:
            self._gate.release()

    def _take_tokens(self, tokens: int, now: float) -> float:
        if not self.tokens_per_s or not tokens:
            return 0.0
        self._tokens = min(self._token_capacity, self._tokens + (now - self._tokens_at) * self.tokens_per_s)
        self._tokens_at = now
        needed = min(tokens, self._token_capacity)  # a request bigger than the bucket waits for a full bucket
        if self._tokens >= needed:
            self._tokens -= tokens
            return 0.0
        return (needed - self._tokens) / self.tokens_per_s

    def _refund_locked(self, tokens: int) -> None:
        if self.tokens_per_s:
            self._tokens = min(self._token_capacity, self._tokens + tokens)

    def refund(self, tokens: int) -> None:
        """Give back tokens reserved but not used (the answer was shorter than max_new_tokens, or not sent)."""
        if tokens > 0 and self.tokens_per_s:
            with self._lock:
                self._refund_locked(tokens)

    def on_accepted(self) -> None:
        """The endpoint took a request against its limit (an answer, or a fault after admission)."""
        with self._lock:
            now = self._clock()
            self._accepted.append(now)
            while self._accepted and self._accepted[0] < now - ACCEPTED_WINDOW_S:
                self._accepted.popleft()

    def on_success(self) -> None:
        with self._lock:
            if self.slow_start:
                self.rate = min(self.max_rate, self.rate + 1.0)  # +1 per answer: doubles once per second
            else:
                self.rate = min(self.max_rate, self.rate + self.increase * max(1.0, self.rate) / self.rate)

    def on_throttle(self, retry_after: Optional[float]) -> None:
        """A 429: everyone waits until the server's hint (or a short pause), and the pace drops once per episode."""
        with self._lock:
            now = self._clock()
            self.throttled += 1
            pause = retry_after if retry_after is not None else min(2.0, 2.0 / self.rate) * random.uniform(0.5, 1.0)
            self.blocked_until = max(self.blocked_until, now + pause)
            # Requests already in flight when the limit was hit all come back 429: one decrease for all of them.
            if now - self._last_decrease >= max(THROTTLE_EPISODE_S, 4.0 / self.rate):
                self._last_decrease = now
                self.slow_start = False
                while self._accepted and self._accepted[0] < now - ACCEPTED_WINDOW_S:
                    self._accepted.popleft()
                measured = len(self._accepted) / ACCEPTED_WINDOW_S
                # Just under what the endpoint was taking; never up, never below half at once.
                target = min(self.rate * self.decrease, measured * 0.97) if measured else self.rate * 0.5
                self.rate = max(self.min_rate, self.rate * 0.5, target)


# ---------------------------------------------------------------------------------------------------
# Budget


class Budget:
    """Tracks the teacher spend and refuses a request whose worst case could take it past the cap."""

    def __init__(self, prompt_price: Optional[float], completion_price: Optional[float], max_cost: Optional[float], spent: float = 0.0):
        self.prompt_price = (prompt_price or 0.0) / 1e6
        self.completion_price = (completion_price or 0.0) / 1e6
        self.max_cost = max_cost
        self.spent = spent
        self.reserved = 0.0
        self._lock = threading.Lock()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.prompt_price + completion_tokens * self.completion_price

    def reserve(self, prompt_tokens: int, max_completion_tokens: int) -> float:
        worst = self.cost(prompt_tokens, max_completion_tokens)
        with self._lock:
            if self.max_cost is not None and self.spent + self.reserved + worst > self.max_cost:
                raise BudgetExceeded(
                    f"synthesize: stopped before the teacher spend could pass synthesis.max_cost {self.max_cost:g} "
                    f"(spent {self.spent:.4g}, {self.reserved:.4g} reserved by requests in flight, next request up to "
                    f"{worst:.4g}); what was answered is kept: raise synthesis.max_cost and run again to continue"
                )
            self.reserved += worst
        return worst

    def settle(self, reserved: float, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.reserved -= reserved
            self.spent += self.cost(prompt_tokens, completion_tokens)

    def release(self, reserved: float) -> None:
        with self._lock:
            self.reserved -= reserved


# ---------------------------------------------------------------------------------------------------
# The client


@dataclass
class ClientStats:
    requests: int = 0
    answered: int = 0
    retries: int = 0
    throttled: int = 0
    transient: dict = field(default_factory=dict)  # kind of fault -> count
    rejected: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, **changes: int) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, getattr(self, name) + value)

    def fault(self, kind: str) -> None:
        with self._lock:
            self.transient[kind] = self.transient.get(kind, 0) + 1

    def as_dict(self) -> dict:
        return {
            "requests": self.requests, "answered": self.answered, "retries": self.retries,
            "throttled": self.throttled, "transient_faults": dict(self.transient), "refused": self.rejected,
        }


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


class EndpointTeacher:
    """A hosted teacher. `complete()` answers one conversation (thread-safe); `answer()` answers a batch."""

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

    def _send(self, messages: Sequence[Message]) -> EndpointCompletion:
        import requests

        body = dict(self.body, messages=list(messages))
        self.stats.count(requests=1)
        try:
            response = self._session().post(
                self.url, data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                headers=self.headers(), timeout=(min(10.0, self.timeout_s), self.timeout_s),
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
        status = response.status_code
        if status == 200:
            return self._parse(response)
        text = redact(response.text or "")[:2000]
        # Again once decoded: a key echoed inside a JSON string is escaped twice (JSON over repr), once after decoding.
        detail = redact(_error_detail(text))
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
        fix = _unsupported_setting_fix(text)
        if fix:  # the same for every record: the settings are wrong, not this record
            raise UserError(f"teacher endpoint {self.url.split('?')[0]} refused a request setting (HTTP {status}: {detail[:300]}); {fix}")
        raise RecordRejected(_rejection_reason(status, text, detail))

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
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise TransientError("unreadable answer (not a chat completion)") from None
        content = message.get("content")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        answer, thought = split_think_block(content or "")
        # DeepSeek and vLLM's reasoning parser return the thinking as reasoning_content; newer vLLM, Ollama and
        # OpenRouter as reasoning (vLLM sent both, alike, while it renamed the field). R1 served without a reasoning
        # parser leaves it in the content as <think>...</think>.
        traces = [message.get("reasoning_content"), message.get("reasoning"), thought]
        traces = [trace.strip() for trace in traces if isinstance(trace, str) and trace.strip()]
        reasoning = "\n\n".join(dict.fromkeys(traces)) or None
        usage = data.get("usage") or {}
        logprobs = None
        if isinstance(choice.get("logprobs"), dict) and choice["logprobs"].get("content"):
            logprobs = [
                {
                    "token": entry.get("token"),
                    "logprob": entry.get("logprob"),
                    "top_logprobs": [{"token": top.get("token"), "logprob": top.get("logprob")} for top in entry.get("top_logprobs") or []],
                }
                for entry in choice["logprobs"]["content"]
            ]
        return EndpointCompletion(
            text=answer.strip(),
            finish_reason=choice.get("finish_reason") or "unknown",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            reasoning=reasoning,
            logprobs=logprobs,
        )

    def complete(self, messages: Sequence[Message], stop: Optional[threading.Event] = None) -> EndpointCompletion:
        """Answer one conversation, retrying what can be retried. Raises RecordRejected, UserError, BudgetExceeded or Stopped."""
        estimate = max(1, int(estimate_tokens(messages) * self._prompt_token_ratio))
        reserved = self.budget.reserve(estimate, self.max_new_tokens)
        faults = throttles = 0
        last_fault = ""
        try:
            while True:
                if stop is not None and stop.is_set():
                    raise Stopped()
                self.limiter.acquire(estimate + self.max_new_tokens, stop)
                try:
                    completion = self._send(messages)
                except TransientError as error:
                    self.limiter.refund(estimate + self.max_new_tokens)
                    if error.throttled:
                        throttles += 1
                        self.stats.count(throttled=1)
                        self.limiter.on_throttle(error.retry_after)
                        if throttles > self.max_retries * THROTTLE_RETRY_FACTOR + THROTTLE_RETRY_FACTOR:
                            raise RecordRejected(f"teacher kept answering 429 (rate limited) {throttles} times; gave up", retryable=True) from None
                        continue  # the limiter holds everyone back until the server's hint has passed
                    self.limiter.on_accepted()  # a fault after admission still counted against the limit
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
                except RecordRejected:
                    self.limiter.on_accepted()
                    self.limiter.refund(estimate + self.max_new_tokens)
                    with self._sessions_lock:
                        self._bad_requests_in_a_row += 1
                        too_many = self._bad_requests_in_a_row >= MAX_CONSECUTIVE_BAD_REQUESTS
                    self.stats.count(rejected=1)
                    if too_many:
                        raise UserError(
                            f"the teacher endpoint refused {MAX_CONSECUTIVE_BAD_REQUESTS} requests in a row with no answer in "
                            f"between; the settings are likely wrong (run `azdistill preflight` to see one refusal)"
                        ) from None
                    raise
                with self._sessions_lock:
                    self._bad_requests_in_a_row = 0
                self.limiter.on_accepted()
                self.limiter.on_success()
                used = completion.prompt_tokens + completion.completion_tokens
                self.limiter.refund(estimate + self.max_new_tokens - used)
                if completion.prompt_tokens:
                    # Learn how our character-based estimate compares with the endpoint's tokenizer.
                    self._prompt_token_ratio = 0.9 * self._prompt_token_ratio + 0.1 * (completion.prompt_tokens / max(1, estimate_tokens(messages)))
                else:
                    completion.prompt_tokens = estimate
                self.stats.count(answered=1)
                self.budget.settle(reserved, completion.prompt_tokens, completion.completion_tokens)
                reserved = 0.0
                return completion
        finally:
            if reserved:
                self.budget.release(reserved)

    def answer(self, conversations: Sequence[list[Message]]) -> list[Completion]:
        """The `Teacher` interface: answer a batch concurrently, in order. A refused record gets an empty answer."""
        def one(messages):
            try:
                return self.complete(messages)
            except RecordRejected as error:
                return EndpointCompletion(text="", finish_reason=f"refused: {error}", prompt_tokens=0, completion_tokens=0)

        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(conversations)))) as pool:
            return list(pool.map(one, conversations))


def split_think_block(content: str) -> tuple[str, Optional[str]]:
    """`(answer, thinking)` of an answer that starts with a `<think>...</think>` block, else `(content, None)`.

    A block never closed (the answer was cut off while thinking) is all thinking. An answer holding only the closing
    tag is thinking up to it: R1's newer chat templates open the `<think>` in the prompt, so the model never writes it.
    """
    stripped = content.lstrip()
    if stripped.startswith("<think>"):
        thought, closed, answer = stripped[len("<think>") :].partition("</think>")
        return (answer, thought) if closed else ("", thought)
    if "<think>" not in content and "</think>" in content:
        thought, _, answer = content.partition("</think>")
        return answer, thought
    return content, None


def _error_detail(text: str) -> str:
    """The message of an OpenAI-style error body (`{"error": {"code", "message"}}`), else the start of the body."""
    try:
        data = json.loads(text)
        error = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
            if message:
                return f"{code}: {message}" if code else str(message)
        elif isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:300] or "no details"


def _unsupported_setting_fix(text: str) -> Optional[str]:
    """How to fix a request key the model refuses (OpenAI's `unsupported_parameter` / `unsupported_value`), else None."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return None
    if not isinstance(error, dict) or error.get("code") not in ("unsupported_parameter", "unsupported_value"):
        return None
    param = str(error.get("param") or "")
    if param == "max_tokens":
        return "set teacher.max_tokens_field: max_completion_tokens (reasoning models need it)"
    if param in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        return "set teacher.sampling_parameters: false (reasoning models take no sampling parameters)"
    if param == "reasoning_effort":
        return "remove teacher.reasoning_effort or pick a level this model supports"
    if param in ("logprobs", "top_logprobs"):
        return "set synthesis.top_logprobs: 0 (this model returns no log-probabilities)"
    return "check the teacher and synthesis settings against what this model supports"


def _rejection_reason(status: int, text: str, detail: str) -> str:
    try:
        error = json.loads(text).get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    code = str(error.get("code") or "") if isinstance(error, dict) else ""
    inner = error.get("innererror") or {} if isinstance(error, dict) else {}
    if code == "content_filter" or "content_filter" in text or "ResponsibleAIPolicyViolation" in text:
        results = inner.get("content_filter_result") or {}
        categories = sorted(name for name, verdict in results.items() if isinstance(verdict, dict) and verdict.get("filtered"))
        return "content filter rejected the prompt" + (f" ({', '.join(categories)})" if categories else "")
    if code == "context_length_exceeded" or "maximum context length" in text:
        return "prompt too long for the teacher (context_length_exceeded); shorten it or lower synthesis.max_new_tokens"
    return f"teacher refused the request (HTTP {status}: {detail[:300]})"


def build_endpoint_teacher(config, credential: Optional[Credential] = None, spent: float = 0.0) -> EndpointTeacher:
    """An `EndpointTeacher` for a config whose teacher is hosted (the credential resolved from teacher.auth)."""
    from azdistill.secrets import resolve_credential

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
    )
