"""Checking a whole split as it streams: one-line errors, a report of every bad line, warnings for small
splits and repeated prompts."""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from azdistill.data.records import Record, scan_records, stream_records

# Azure ML's distillation refuses smaller sets; fewer records rarely make a useful student.
AZURE_MINIMUM_RECORDS = {"math": 40}
AZURE_MINIMUM_DEFAULT = 65

MAX_DUPLICATE_LINES = 5  # line numbers named in the duplicate-prompt warning


@dataclass
class SplitSummary:
    """What `check_split` found in a valid split, counting the records used (the first `limit`)."""

    path: Path
    records: int = 0
    with_reference: int = 0
    duplicates: int = 0  # records whose prompt repeats an earlier record's
    duplicate_lines: list[int] = field(default_factory=list)  # the first MAX_DUPLICATE_LINES of them
    first_duplicate_of: Optional[int] = None  # the line the first duplicate repeats


class DigestSet:
    """A set of 64-bit digests in one flat array of 8-byte slots (open addressing, at most half full): 16 to 32 bytes
    a distinct prompt (48 for a moment as it grows), where a Python `set` of ints takes about 80 (an int object and a
    slot each) and twice that as it grows."""

    def __init__(self) -> None:
        self._slots = array("Q", [0]) * 1024  # a power of two; 0 marks an empty slot
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, digest: int) -> bool:
        """Add `digest` (0 <= digest < 2**64); returns whether it was new."""
        digest = digest or 1  # 0 is the empty slot: digest 0 counts as 1 (a false repeat once in 2**63 prompts)
        slots = self._slots
        mask = len(slots) - 1
        index = digest & mask
        while slots[index]:
            if slots[index] == digest:
                return False
            index = (index + 1) & mask
        slots[index] = digest
        self._size += 1
        if 2 * self._size > len(slots):
            self._grow()
        return True

    def _grow(self) -> None:
        old, self._slots, self._size = self._slots, array("Q", [0]) * (2 * len(self._slots)), 0
        for digest in old:
            if digest:
                self.add(digest)


def _prompt_digest(record: Record) -> int:
    text = json.dumps(record.prompt, ensure_ascii=False, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def check_split(
    path: Path, task_type: str, limit: Optional[int] = None, max_prompt_chars: Optional[int] = None, report: Optional[Path] = None
) -> SplitSummary:
    """Validate a split line by line without holding its records (what `validate` runs); the errors are those of
    `stream_records`.

    Every line is checked, also past `limit`. Memory grows only by one 64-bit hash per distinct prompt, to count
    repeated prompts (at most 48 bytes a record in a `DigestSet`, where holding the records takes over 1 KB).
    """
    path = Path(path)
    summary = SplitSummary(path)
    prompts = DigestSet()
    first_repeated: Optional[int] = None
    for record in stream_records(path, task_type, limit, max_prompt_chars, report):
        summary.records += 1
        summary.with_reference += record.reference is not None
        digest = _prompt_digest(record)
        if prompts.add(digest):
            continue
        summary.duplicates += 1
        if len(summary.duplicate_lines) < MAX_DUPLICATE_LINES:
            summary.duplicate_lines.append(record.line)
        if first_repeated is None:
            first_repeated = digest
    if first_repeated is not None:  # a second pass, up to that prompt's first line, rather than a line per prompt held
        summary.first_duplicate_of = next(
            item.line for item in scan_records(path, task_type) if isinstance(item, Record) and _prompt_digest(item) == first_repeated
        )
    return summary


def split_warnings(summary: SplitSummary, task_type: str) -> list[str]:
    """What `validate` warns about in a valid split, one line each: repeated prompts, and fewer records than Azure
    ML's distillation accepts (too few for a useful student, locally as well)."""

    warnings = []
    if summary.duplicates == 1:
        warnings.append(
            f"{summary.path}: 1 record repeats an earlier prompt: line {summary.duplicate_lines[0]} repeats line "
            f"{summary.first_duplicate_of}; remove the copy unless it is meant to weigh more"
        )
    elif summary.duplicates:
        lines = ", ".join(str(line) for line in summary.duplicate_lines)
        first = "first at" if summary.duplicates > len(summary.duplicate_lines) else "at"
        warnings.append(
            f"{summary.path}: {summary.duplicates} records repeat an earlier prompt, {first} lines {lines} (line "
            f"{summary.duplicate_lines[0]} repeats line {summary.first_duplicate_of}); remove the copies unless they are "
            "meant to weigh more"
        )
    minimum = AZURE_MINIMUM_RECORDS.get(task_type, AZURE_MINIMUM_DEFAULT)
    if summary.records < minimum:
        warnings.append(
            f"{summary.path}: {summary.records} record{'s' if summary.records != 1 else ''}, fewer than the {minimum} per "
            f"split that Azure ML's distillation requires for task {task_type}; the student may learn little"
        )
    return warnings
