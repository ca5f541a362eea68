"""Checking a whole split as it streams: one-line errors, a report of every bad line, warnings for small
splits and repeated prompts."""

from __future__ import annotations

import hashlib
import json
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


def _prompt_digest(record: Record) -> int:
    text = json.dumps(record.prompt, ensure_ascii=False, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def check_split(
    path: Path, task_type: str, limit: Optional[int] = None, max_prompt_chars: Optional[int] = None, report: Optional[Path] = None
) -> SplitSummary:
    """Validate a split line by line without holding its records (what `validate` runs); the errors are those of
    `stream_records`.

    Every line is checked, also past `limit`. Memory grows only by one 64-bit hash per distinct prompt, to count
    repeated prompts (about 100 bytes a record, where holding the records takes over 1 KB).
    """
    path = Path(path)
    summary = SplitSummary(path)
    prompts: set[int] = set()
    first_repeated: Optional[int] = None
    for record in stream_records(path, task_type, limit, max_prompt_chars, report):
        summary.records += 1
        summary.with_reference += record.reference is not None
        digest = _prompt_digest(record)
        if digest not in prompts:
            prompts.add(digest)
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
