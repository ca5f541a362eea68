"""What every teacher is to the stages, and the outcomes of asking one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from azdistill.data.records import Message
from azdistill.errors import StageFailed
from azdistill.models.generation import Completion


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


class Teacher(Protocol):
    """Answers chat conversations. `batch_size` is how many it prefers to receive at once."""

    name: str
    batch_size: int

    def answer(self, conversations: Sequence[list[Message]]) -> list[Completion]: ...
