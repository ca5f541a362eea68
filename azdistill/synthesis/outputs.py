"""From the journal to the final files: input order, duplicates dropped, rejected records with their reason."""

from __future__ import annotations

import hashlib
import json
from array import array
from contextlib import ExitStack
from pathlib import Path
from typing import IO

from azdistill.config.schema import DistillConfig
from azdistill.data.files import atomic_writer
from azdistill.synthesis.journal import Journal

SPLITS = ("train", "validation")




def _read_row(handle: IO[bytes], offset: int) -> dict:
    handle.seek(offset)
    return json.loads(handle.readline())


def _example_hash(messages: list) -> int:
    digest = hashlib.blake2b(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


# Up to this many records a dict finds the duplicates (about 100 bytes a record, and no numpy import: 0.13 s, a
# tenth of a small stage's whole time after its last answer); above it, sorted numpy arrays (16 bytes a record).
DICT_DUPLICATE_CHECK_UP_TO = 20_000


def _duplicates(handle: IO[bytes], offsets: array) -> "object":
    """For each record, the index of the earlier record it exactly duplicates, or -1 (memory bounded: a dict of hashes
    for small splits, numpy arrays of 16 bytes a record for large ones; the same answer either way)."""
    if len(offsets) <= DICT_DUPLICATE_CHECK_UP_TO:
        duplicate_of = array("q", [-1]) * len(offsets)
        first_with: dict[int, int] = {}
        for index, offset in enumerate(offsets):
            if offset >= 0:
                row = _read_row(handle, offset)
                if row["status"] == "ok":
                    duplicate_of[index] = first_with.setdefault(_example_hash(row["messages"]), index)
                    if duplicate_of[index] == index:
                        duplicate_of[index] = -1
        return duplicate_of
    import numpy as np

    hashes = np.zeros(len(offsets), dtype=np.uint64)
    for index, offset in enumerate(offsets):
        if offset >= 0:
            row = _read_row(handle, offset)
            if row["status"] == "ok":
                hashes[index] = _example_hash(row["messages"])
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    same = np.concatenate(([False], (ordered[1:] == ordered[:-1]) & (ordered[1:] != 0)))
    run_start = np.maximum.accumulate(np.where(~same, np.arange(len(order)), 0))
    duplicate_of = np.full(len(offsets), -1, dtype=np.int64)
    positions = np.nonzero(same)[0]
    duplicate_of[order[positions]] = order[run_start[positions]]
    return duplicate_of


def finish_split(
    split: str, records: int, journal_path: Path, out_dir: Path, rejected_out: IO[str], config: DistillConfig, logprobs: bool,
    first_augmented: int | None = None,
) -> dict:
    """Write `<split>.jsonl` (and the logprobs sidecar) in input order from the journal; returns the split's stats.

    Records from `first_augmented` on are new prompts the teacher wrote (synthesis.augment): their rejects say split
    "augmented" (their line is one of augmented.jsonl), and the stats count how many were accepted.
    """
    done = Journal.scan(journal_path, records)
    missing = [index for index in range(records) if done.offsets[index] < 0]
    if missing:  # cannot happen unless the journal was edited: never write a set with holes
        raise RuntimeError(f"synthesize {split}: {len(missing)} records have no answer in {journal_path} (e.g. #{missing[0]})")
    reasons: dict[str, int] = {}
    accepted = without_rationale = 0
    rescued: dict[str, int] = {}
    constrained = accepted_augmented = 0
    with ExitStack() as files:
        handle = files.enter_context(journal_path.open("rb"))
        out = files.enter_context(atomic_writer(out_dir / f"{split}.jsonl"))
        sidecar = files.enter_context(atomic_writer(out_dir / f"{split}.logprobs.jsonl")) if logprobs else None
        duplicate_of = _duplicates(handle, done.offsets) if config.synthesis.reject_duplicates else None
        for index in range(records):
            row = _read_row(handle, done.offsets[index])
            if row["status"] == "ok" and duplicate_of is not None and duplicate_of[index] >= 0:
                first = _read_row(handle, done.offsets[int(duplicate_of[index])])
                row = {**row, "status": "rejected", "answer": row["messages"][-1]["content"],
                       "reason": f"exact duplicate of the example from input line {first['line']}",
                       "messages": row["messages"][:-1], "reasoning": (row.get("reasoning") or [None])[-1]}
            augmented = first_augmented is not None and index >= first_augmented
            if row["status"] == "ok":
                accepted_augmented += augmented
                out.write(json.dumps({"messages": row["messages"]}, ensure_ascii=False) + "\n")
                if sidecar is not None:
                    sidecar.write(json.dumps({"row": accepted, "index": index, "line": row["line"], "turns": row.get("logprobs") or []}, ensure_ascii=False) + "\n")
                accepted += 1
                without_rationale += row.get("without_rationale", 0)
                constrained += "label_probs" in row
                if row.get("rescued_by"):
                    rescued[row["rescued_by"]] = rescued.get(row["rescued_by"], 0) + 1
            else:
                rejected = {"split": "augmented" if augmented else split,
                            **{k: row[k] for k in ("line", "reason", "answer", "messages")}}
                if row.get("reasoning"):
                    rejected["reasoning"] = row["reasoning"]
                rejected_out.write(json.dumps(rejected, ensure_ascii=False) + "\n")
                key = row["reason"].split(";")[0].split(" (")[0]
                reasons[key] = reasons.get(key, 0) + 1
    stats = {
        "records": records,
        "accepted": accepted,
        "rejected": records - accepted,
        "rejected_by_reason": reasons,
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
    }
    if constrained or rescued:  # rescued without a label: self-consistency on math answers
        # The reject ledger's other side: answers constrained to one label, and those a measure saved from rejection.
        stats["constrained_labels"] = constrained
        stats["rescued_by"] = rescued
    if first_augmented is not None:
        stats["augmented_accepted"] = accepted_augmented
    if config.synthesis.keep_rationale and config.synthesis.prompt_strategy == "plain":
        stats["trained_without_rationale"] = without_rationale  # answers that came with no reasoning trace
    return stats
