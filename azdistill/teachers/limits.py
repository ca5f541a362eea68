"""Staying inside what a hosted teacher allows: an adaptive rate limiter (requests and tokens per minute,
Retry-After), a hard budget, and the client's counters."""

from __future__ import annotations

import collections
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from azdistill.data.records import Message
from azdistill.teachers.base import BudgetExceeded, Stopped

# How far back the limiter counts requests the endpoint accepted, to measure its limit when it says 429.
ACCEPTED_WINDOW_S = 1.0
# A request waiting for its turn re-reads the pace at least this often.
MAX_NAP_S = 0.05
# At most one slow-down per throttling episode: the 429s of requests already in flight are one event.
THROTTLE_EPISODE_S = 1.0
# 429s are the endpoint pacing us, not failing; they are waited out this many times more often than faults.
THROTTLE_RETRY_FACTOR = 20


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
