"""The per-split journal that makes synthesis exactly-once: every finished record is one flushed line, read
back on a rerun so the teacher is asked only what it has not answered."""

from __future__ import annotations

import json
import logging
import threading
from array import array
from pathlib import Path

from azdistill.data.files import AppendLog

log = logging.getLogger(__name__)


class Journal:
    """What an append-only journal holds: per record the byte offset of its final row (last one wins, -1 if
    none), the answered turns of conversations left unfinished, and the tokens spent so far."""

    def __init__(self, path: Path, records: int):
        self.path = Path(path)
        self.offsets = array("q", [-1]) * records
        self.partials: dict[int, list[dict]] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.done = 0

    @classmethod
    def scan(cls, path: Path, records: int, retry_failed: bool = False) -> "Journal":
        """Read a journal; `retry_failed` leaves records given up on after transient faults to be asked again."""
        journal = cls(path, records)
        if not journal.path.exists():
            return journal
        with journal.path.open("rb") as handle:
            offset = 0
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break  # a torn last line from a killed writer: that record was not finished
                row = json.loads(raw)
                index = row["index"]
                journal.prompt_tokens += row.get("prompt_tokens", 0)
                journal.completion_tokens += row.get("completion_tokens", 0)
                if 0 <= index < records:
                    if row.get("partial"):
                        journal.partials.setdefault(index, []).append(row)
                    elif retry_failed and row.get("retryable"):
                        journal.offsets[index] = -1
                        journal.partials.pop(index, None)
                    else:
                        journal.offsets[index] = offset
                        journal.partials.pop(index, None)
                offset += len(raw)
        journal.done = sum(1 for value in journal.offsets if value >= 0)
        return journal

    def is_done(self, index: int) -> bool:
        return self.offsets[index] >= 0


class SafeLog:
    """An `AppendLog` that several threads may append to, and that refuses writes once closed."""

    def __init__(self, log: AppendLog):
        self._log = log
        self._lock = threading.Lock()
        self.closed = False

    def append(self, row: dict) -> None:
        with self._lock:
            if self.closed:
                return
            self._log.append(row)

    def close(self) -> None:
        with self._lock:
            self.closed = True
