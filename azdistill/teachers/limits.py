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

# The window over which the limiter counts the requests the endpoint admitted, to measure its limit when it says 429.
# Azure OpenAI evaluates a deployment's requests-per-minute over 1 s (and 10 s) windows.
ACCEPTED_WINDOW_S = 1.0
# A request waiting for its turn re-reads the pace at least this often.
MAX_NAP_S = 0.05
# At most one slow-down per throttling episode: the 429s of requests already in flight are one event.
THROTTLE_EPISODE_S = 1.0
# 429s are the endpoint pacing us, not failing; they are waited out this many times more often than faults.
THROTTLE_RETRY_FACTOR = 20
# Below the measured limit by this share: the slack for the time between our clock and the endpoint's admission.
LIMIT_MARGIN = 0.01
# After a 429 the pace holds this long, then probes upwards (a limit can rise), faster the longer no 429 comes:
# 5% a second at first, twice that every PROBE_DOUBLING_S (a doubled limit is found in about 4 s). Each probe that
# finds the same limit again doubles the hold, up to PROBE_MAX_HOLD_S: a steady limit costs a 429 or two a while.
PROBE_HOLD_S = 3.0
PROBE_MAX_HOLD_S = 12.0
PROBE_GAIN_PER_S = 0.05
PROBE_DOUBLING_S = 1.0
PROBE_MAX_GAIN_PER_S = 0.5
# Headroom the endpoint reports (x-ratelimit-remaining-requests), as a share of a window's worth of our pace, that
# ends a hold at once: the limit is shared and its other clients stopped, or it was raised.
HEADROOM_SHARE = 0.25
# How far the header's votes go either way (at 429s: did it read as headroom?): three readings turn them.
REMAINING_VOTES_CAP = 3
SEND_RATE_SMOOTHING_S = 0.25


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




class Ticket:
    """One request's turn: when it was sent, and what the endpoint made of it (pending, admitted or throttled)."""

    __slots__ = ("sent_at", "state")

    def __init__(self, sent_at: float):
        self.sent_at, self.state = sent_at, "pending"


class AdaptiveRateLimiter:
    """Shared by all workers: paces requests, honours the server's retry hints, and keeps to token budgets.

    Without a configured request budget it starts at `initial_rate` requests/s and adds two per answer (slow
    start: about 7x a second) until the first 429. A 429 means the endpoint's limit was reached, and the
    requests it had admitted in the window before the refused one was sent measure that limit: each request's
    send time is kept with what became of it (a fault after admission, such as a 500 or a timeout, still took
    a slot; a 429 did not), so the measure counts what the endpoint counted, not when the answers came back.
    The pace drops to just under the measure (`margin` for the gap between our clock and the endpoint's), at
    most once per throttling episode and never below half of what was sent at once. After `probe_hold_s` without
    a 429 it probes upwards, by 5% a second at first and twice as fast every `probe_doubling_s` without one, so a
    limit that rises is found and one that falls (or is shared with other clients) costs one 429 and a new
    measure; a probe that only finds the same limit again eases off at its first 429 and waits twice as long
    before the next one (up to 12 s). Headroom the endpoint reports right after a 429's pause is our own pause,
    not capacity freed, and does not raise the pace.
    A configured `requests_per_minute` caps the rate, `margin` under it as under a limit found from 429s: paced
    at the quota exactly, a request that reaches the endpoint's window a little early is refused, and shards that
    share the quota (each paced at its share) meet the limit together, every second.
    """

    def __init__(
        self,
        requests_per_minute: Optional[float] = None,
        tokens_per_minute: Optional[float] = None,
        initial_rate: float = 16.0,
        margin: float = LIMIT_MARGIN,
        min_rate: float = 0.05,
        probe_hold_s: float = PROBE_HOLD_S,
        probe_doubling_s: float = PROBE_DOUBLING_S,
        clock=time.monotonic,
        sleep=time.sleep,
    ):
        self._lock = threading.Lock()
        self._gate = threading.Lock()  # requests waiting for their turn queue here
        # Injectable together, so tests drive the pacing on a fake clock instead of the wall clock.
        self._clock, self._sleep = clock, sleep
        # A configured budget is the deployment's quota: pace just under it from the start; otherwise find the limit.
        # (Exactly at it, 4 shards at their shares drew 20 429s for 1,000 answers on the bench: docs/benchmarks.md.)
        self.max_rate = requests_per_minute / 60.0 * (1.0 - margin) if requests_per_minute else math.inf
        self.rate = self.max_rate if requests_per_minute else initial_rate
        self.slow_start = requests_per_minute is None
        self.margin, self.min_rate = margin, min_rate
        self.probe_hold_s, self.probe_doubling_s = probe_hold_s, probe_doubling_s
        self._next_at = 0.0
        self.blocked_until = 0.0
        self._last_decrease = -math.inf
        self._last_edge_throttle = -math.inf
        self._probed = False  # whether probing raised the pace since the last throttling episode
        self._probe_from = clock() + probe_hold_s  # (slow start comes first unless a request budget is configured)
        self._hold = probe_hold_s
        self._grown_at: Optional[float] = None
        self.tokens_per_s = tokens_per_minute / 60.0 if tokens_per_minute else None
        # Azure evaluates token budgets over short windows; a bucket of 10 seconds' worth allows small bursts.
        self._token_capacity = (tokens_per_minute / 6.0) if tokens_per_minute else 0.0
        self._tokens = self._token_capacity
        self._tokens_at = clock()
        self.throttled = 0
        self.initial_rate = initial_rate
        self._send_rate, self._sent_rate_at = initial_rate, None  # requests really sent per second (smoothed)
        self._headroom_at = -math.inf  # when reported headroom last raised the pace
        self._last_remaining: Optional[int] = None  # x-ratelimit-remaining-requests of the last answer (None once used)
        # Whether that header tracks the limit that throttles us: at each 429, the last answer's figure votes for it
        # (it read as no headroom) or against it (it read as headroom, the figure the rule below would act on).
        self._remaining_votes = 0
        self.measured_limit: Optional[float] = None  # the limit as the last throttling episode measured it, per second
        # The recent requests' tickets, oldest first: what the endpoint's window held when it said 429.
        self._sent: collections.deque = collections.deque()

    def acquire(self, tokens: int = 0, stop: Optional[threading.Event] = None) -> Ticket:
        """Wait for this request's turn (and its tokens); returns its ticket when it may be sent.

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
                            # Slots follow the schedule, not the moment a late thread woke: a nap or a busy
                            # interpreter oversleeps by a millisecond or more, which at 40/s would lose 4% of the
                            # slots. Only a pace left idle for more than a slot starts again from now.
                            interval = 1.0 / self.rate
                            self._next_at = (self._next_at if now - self._next_at <= interval else now) + interval
                            ticket = Ticket(now)
                            self._sent.append(ticket)
                            # 3 windows: a 429 that comes back a window after it was sent still sees the window
                            # before it whole.
                            while self._sent and self._sent[0].sent_at < now - 3 * ACCEPTED_WINDOW_S:
                                self._sent.popleft()
                            # What is really sent, smoothed over a quarter of a second (bounds the pace: _bounded;
                            # quick enough to follow the slow start, which grows the pace 1.6x in that time).
                            if self._sent_rate_at is not None and now > self._sent_rate_at:
                                weight = math.exp(-(now - self._sent_rate_at) / SEND_RATE_SMOOTHING_S)
                                instant = 1.0 / (now - self._sent_rate_at)
                                self._send_rate = weight * self._send_rate + (1.0 - weight) * instant
                            self._sent_rate_at = now
                            return ticket
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

    def on_accepted(self, ticket: Ticket) -> None:
        """The endpoint took the request against its limit (an answer, or a fault after admission)."""
        ticket.state = "admitted"

    def on_success(self, remaining: Optional[int] = None) -> None:
        """An answer; `remaining` is the endpoint's `x-ratelimit-remaining-requests` with it, where it sends one."""
        with self._lock:
            self._last_remaining = remaining
            if self.slow_start:
                # +2 per answer: the pace grows by e^2 a second, from 16/s to a 40/s limit in half a second.
                self.rate = self._bounded(self.rate + 2.0)
                return
            now = self._clock()
            grown_at, self._grown_at = self._grown_at, now
            # (Not within a window of a 429's pause: the headroom then is our own pause, not capacity freed.)
            if self._remaining_votes > 0 and remaining is not None and now >= self._headroom_at + ACCEPTED_WINDOW_S \
                    and now >= self.blocked_until + ACCEPTED_WINDOW_S and self._is_headroom(remaining):
                # The endpoint says a good part of its limit is unused (other clients of a shared limit stopped, or
                # it was raised): take up half of it at once (once a window: the figure lags our own new requests),
                # and probe from now rather than after the hold.
                # At most doubled: a per-minute figure from a fresh minute would otherwise read as a huge headroom.
                self.rate = self._bounded(self.rate + min(self.rate, 0.5 * remaining / ACCEPTED_WINDOW_S))
                self._headroom_at = now
                if now < self._probe_from:
                    self._probe_from, self._hold, grown_at = now, self.probe_hold_s, now
            if grown_at is None or now < self._probe_from:
                return
            # Probing: the gain doubles every probe_doubling_s without a 429, from PROBE_GAIN_PER_S (capped before
            # the power: hours without a 429, as under a configured budget, would overflow it).
            doublings = min(20.0, (now - self._probe_from) / self.probe_doubling_s)
            gain = min(PROBE_MAX_GAIN_PER_S, PROBE_GAIN_PER_S * 2 ** doublings)
            probed = self._bounded(self.rate * (1.0 + gain * (now - max(grown_at, self._probe_from))))
            self._probed = self._probed or probed > self.rate
            self.rate = probed

    def _is_headroom(self, remaining: int) -> bool:
        """Whether the endpoint's reported headroom is a good part of a window's worth of our pace."""
        return remaining >= max(4.0, HEADROOM_SHARE * self.rate * ACCEPTED_WINDOW_S)

    def _bounded(self, rate: float) -> float:
        """`rate` within the configured budget and, when the pace is not what holds the requests back (fewer are
        sent than it allows: the workers are busy), within twice what is really sent: a pace that nothing tests
        would otherwise grow without bound, and come down only by half per throttling episode."""
        return min(self.max_rate, rate, max(self.rate, self.initial_rate, 2.0 * self._send_rate))

    def on_throttle(self, retry_after: Optional[float], ticket: Ticket) -> None:
        """A 429: everyone waits until the server's hint (or a short pause), and the pace drops once per episode
        to just under what the endpoint had admitted in the window before this request."""
        with self._lock:
            now = self._clock()
            self.throttled += 1
            ticket.state = "throttled"
            # Trust x-ratelimit-remaining-requests as a measure of headroom only while it mostly says there is none
            # when a 429 comes: a per-minute budget (OpenAI's) can read large while a shorter window throttles. Mostly:
            # on a limit shared with other clients (shards), they can fill the window between our last answer and the
            # 429, so one reading of headroom there is no proof. Each answer's figure votes once (a 429's companions
            # in the same episode see the same figure), and the votes are capped so that evidence can turn them.
            if self._last_remaining is not None:
                vote = -1 if self._is_headroom(self._last_remaining) else 1
                self._remaining_votes = max(-REMAINING_VOTES_CAP, min(REMAINING_VOTES_CAP, self._remaining_votes + vote))
                self._last_remaining = None
            pause = retry_after if retry_after is not None else min(2.0, 2.0 / self.rate) * random.uniform(0.5, 1.0)
            self.blocked_until = max(self.blocked_until, now + pause)
            self._probe_from = max(self._probe_from, now + self._hold)
            # Requests already in flight when the limit was hit all come back 429: one decrease for all of them.
            if now - self._last_decrease < max(THROTTLE_EPISODE_S, 4.0 / self.rate):
                return
            self._last_decrease = now
            self.slow_start = False
            measured = self._peak_admitted(ticket.sent_at) / ACCEPTED_WINDOW_S
            if measured:
                self.measured_limit = measured
            probed, self._probed = self._probed, False
            if measured and measured >= self.rate * (1.0 - 3 * self.margin):
                # The measure is the pace itself: we are at the limit, not over it. Once, a request reached the
                # endpoint's window a little early (hold the pace: lowering it each time would ratchet it down a
                # request a second); again within probe_hold_s, the limit is just under our pace or shared with
                # other clients: ease off by the margin. A probe that finds the limit eases off at once (held, it
                # would only draw the next 429).
                if probed or now - self._last_edge_throttle < self.probe_hold_s:
                    self.rate = max(self.min_rate, min(self.rate, measured) * (1.0 - self.margin))
                    # The probe found the same limit: probe less often.
                    self._hold = min(PROBE_MAX_HOLD_S, self._hold * 2)
                    self._probe_from = now + self._hold
                self._last_edge_throttle = now
                return
            self._hold = self.probe_hold_s
            # Over the limit: just under the measure; never below half of what was really sent at once (the slow
            # start's pace runs ahead of the requests sent: half of it can still be over the limit).
            target = measured * (1.0 - self.margin) if measured else self.rate * 0.5
            self.rate = max(self.min_rate, min(self.rate, self._send_rate) * 0.5, min(self.rate, target))

    def _peak_admitted(self, before: float) -> int:
        """The most requests the endpoint admitted from us in any window that ended in the window before `before`:
        its limit when we were pacing at it (each window ending at one of our sends, by send time; a 429 did not
        count, a pending request almost always will)."""
        sent = [ticket.sent_at for ticket in self._sent if ticket.state != "throttled" and ticket.sent_at <= before]
        peak, first = 0, 0
        for last, sent_at in enumerate(sent):
            while sent[first] <= sent_at - ACCEPTED_WINDOW_S:
                first += 1
            if sent_at > before - ACCEPTED_WINDOW_S:
                peak = max(peak, last - first + 1)
        return peak


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
    hedged: int = 0  # records asked a second time at the end of a stage (synthesis/answering.py)
    # What the endpoint billed for the copy of a hedged record that answered second (its answer is dropped).
    hedge_prompt_tokens: int = 0
    hedge_completion_tokens: int = 0
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
            "hedged": self.hedged, "hedge_prompt_tokens": self.hedge_prompt_tokens,
            "hedge_completion_tokens": self.hedge_completion_tokens,
        }
