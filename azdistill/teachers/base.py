"""What every teacher is to the stages, and the outcomes of asking one."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from azdistill.data.records import Message
from azdistill.errors import StageFailed
from azdistill.models.generation import Completion


@dataclass
class EndpointCompletion(Completion):
    """A hosted teacher's answer: the completion plus the top-k log-probabilities of its tokens, if returned."""

    logprobs: Optional[list] = None
    remaining_requests: Optional[int] = None  # the answer's x-ratelimit-remaining-requests (headroom), if sent


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


# How the synthesize stage asks a teacher (its `mode`):
# - "batched": `answer(conversations)` answers a batch of conversations at once (a model in this process);
# - "concurrent": `complete(messages, stop)` answers one conversation and is thread-safe; the stage calls it from
#   `concurrency` threads at once (a hosted endpoint);
# - "logged": `logged_answer(messages, user_position)` is the answer already in the record; nothing is asked.
AnswerMode = Literal["batched", "concurrent", "logged"]


class Teacher:
    """What every teacher is to the stages: a name, how it answers (`mode`), what it bills and counts, and `close()`.

    The defaults are those of a teacher that bills nothing, keeps no client counters and holds nothing to close; a
    teacher sets `mode` and provides the method that mode calls.
    """

    name: str
    batch_size: int  # how many conversations it prefers to receive at once
    mode: AnswerMode = "batched"
    # A hosted teacher's `limits.Budget` (the spend so far and the cap); None when nothing is billed. Typed loosely
    # because limits.py imports this module.
    budget: Optional[Any] = None
    stats: Optional[Any] = None  # a hosted teacher's `limits.ClientStats` (requests, retries, ...); None without a client
    # A concurrent teacher's: how many conversations it answers at once, and how long one request may take (what a
    # stopping run waits for the answers already paid for).
    concurrency: int
    timeout_s: float

    def answer(self, conversations: Sequence[list[Message]]) -> list[Completion]:
        """A batched teacher's answers to a batch of conversations, in order."""
        raise NotImplementedError(f"teacher {self.name} ({self.mode}) does not answer batches of conversations")

    def complete(self, messages: Sequence[Message], stop: Optional[threading.Event] = None) -> Completion:
        """A concurrent teacher's answer to one conversation (thread-safe); `stop` set means send nothing more."""
        raise NotImplementedError(f"teacher {self.name} ({self.mode}) does not answer one conversation at a time")

    def choose(self, conversations: Sequence[list[Message]], labels: Sequence[str]) -> list[Completion]:
        """A batched teacher's answers constrained to one of `labels` each (`synthesis.label_constraint`, and LLM judges'
        verdicts): `text` is the chosen label, `label_probs` the teacher's probability of every label."""
        raise NotImplementedError(f"teacher {self.name} ({self.mode}) cannot be constrained to labels in batches")

    def choose_one(self, messages: Sequence[Message], labels: Sequence[str], stop: Optional[threading.Event] = None) -> Completion:
        """A concurrent teacher's answer to one conversation constrained to one of `labels` (thread-safe); as `choose`."""
        raise NotImplementedError(f"teacher {self.name} ({self.mode}) cannot be constrained to labels one at a time")

    def logged_answer(self, messages: Sequence[Message], user_position: int) -> Completion:
        """A logged teacher's answer: the assistant turn after the user turn at `user_position` in the record."""
        raise NotImplementedError(f"teacher {self.name} ({self.mode}) has no logged answers")

    def request_out_since(self, thread: int) -> Optional[float]:
        """When the request the worker thread `thread` waits on (or backs off after) went out (time.monotonic), or None
        while it waits for its turn or when the teacher does not say: what tail hedging reads (synthesis/answering.py)."""
        return None

    def median_request_s(self) -> Optional[float]:
        """The median seconds the teacher's recent answered requests took, once it has seen enough of them; or None."""
        return None

    def close(self) -> None:
        """Let go of what the teacher holds (a hosted one's connections); nothing by default."""
