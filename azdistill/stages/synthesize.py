"""Synthesize: the teacher answers every prompt of the train and validation sets.

Single-turn records get one teacher answer. Conversations are regenerated turn by turn: the teacher answers
the first user turn, then the second with its own first answer in the history, and so on. Every answer is
checked (empty, cut off, unparseable label or number); a record with any failed answer goes to
`rejected.jsonl` with its reason. Results are journaled per record, so an interrupted run continues where it
stopped, and the final files are written in input order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from azdistill.config import DistillConfig
from azdistill.data import AppendLog, Record, read_journal, read_records, write_json, write_jsonl
from azdistill.errors import StageFailed
from azdistill.generation import Completion
from azdistill.metrics import parse_label, parse_number
from azdistill.progress import Progress
from azdistill.stages import state
from azdistill.teacher import Teacher
from azdistill.tracking import NullTracker

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
OUTPUTS = ["train.jsonl", "validation.jsonl", "rejected.jsonl", "stats.json"]


def check_answer(completion: Completion, task_type: str, labels: Optional[Sequence[str]]) -> Optional[str]:
    """Why a teacher answer cannot be used as training data, or None if it can."""
    if not completion.text.strip():
        return "empty answer"
    if completion.finish_reason != "stop":
        return f"answer cut off (finish_reason={completion.finish_reason}); raise synthesis.max_new_tokens"
    if task_type == "nli" and parse_label(completion.text, labels or []) is None:
        return f"answer names none or several of the labels {list(labels or [])}"
    if task_type == "math" and parse_number(completion.text) is None:
        return "answer has no number"
    return None


@dataclass
class _Pending:
    index: int
    record: Record
    history: list = field(default_factory=list)  # messages so far, with the teacher's answers
    user_turns: list = field(default_factory=list)  # positions of user messages in record.messages
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _start(index: int, record: Record, system_prompt: Optional[str]) -> _Pending:
    messages = [dict(message) for message in record.messages]
    if system_prompt is not None:
        messages[0] = {"role": "system", "content": system_prompt}
    user_turns = [position for position, message in enumerate(messages) if message["role"] == "user"]
    return _Pending(index=index, record=Record(messages, record.line, record.extra), history=[messages[0]], user_turns=user_turns)


def synthesize_split(
    records: list[Record], teacher: Teacher, config: DistillConfig, journal: AppendLog, done: set[int], split: str
) -> None:
    """Answer every not-yet-done record of one split, journaling each result as soon as its record is complete."""
    task, labels = config.task.type, config.task.labels
    todo = [_start(i, r, config.synthesis.system_prompt) for i, r in enumerate(records) if i not in done]
    rejected_so_far = 0
    with Progress(len(todo), f"synthesize {split}", unit="records") as progress:
        for start in range(0, len(todo), teacher.batch_size):
            chunk = todo[start : start + teacher.batch_size]
            rejected: dict[int, tuple[str, str]] = {}
            turns = max(len(item.user_turns) for item in chunk)
            for turn in range(turns):
                active = [item for item in chunk if turn < len(item.user_turns) and item.index not in rejected]
                if not active:
                    break
                for item in active:
                    item.history.append(item.record.messages[item.user_turns[turn]])
                completions = teacher.answer([list(item.history) for item in active])
                if len(completions) != len(active):
                    raise RuntimeError(f"teacher {teacher.name} returned {len(completions)} answers for {len(active)} prompts")
                for item, completion in zip(active, completions):
                    item.prompt_tokens += completion.prompt_tokens
                    item.completion_tokens += completion.completion_tokens
                    reason = check_answer(completion, task, labels)
                    if reason:
                        where = f"turn {turn + 1}: " if len(item.user_turns) > 1 else ""
                        rejected[item.index] = (where + reason, completion.text)
                    else:
                        item.history.append({"role": "assistant", "content": completion.text})
            for item in chunk:
                row = {
                    "index": item.index,
                    "line": item.record.line,
                    "prompt_tokens": item.prompt_tokens,
                    "completion_tokens": item.completion_tokens,
                }
                if item.index in rejected:
                    reason, answer = rejected[item.index]
                    row.update(status="rejected", reason=reason, answer=answer, messages=item.record.prompt)
                else:
                    row.update(status="ok", messages=item.history)
                journal.append(row)
            rejected_so_far += len(rejected)
            progress.update(len(chunk), rejected=rejected_so_far)


def synthesize(
    config: DistillConfig,
    teacher_factory,
    tracker: NullTracker = NullTracker(),
    force: bool = False,
    out_dir: Optional[Path] = None,
    teacher_identity: Optional[str] = None,
) -> Path:
    """Run the stage; `teacher_factory()` builds the teacher only if there is work for it. Returns the output folder.

    `teacher_identity` (e.g. the digest of a local teacher's folder) makes new weights behind the same name
    invalidate earlier answers.
    """
    out_dir = Path(out_dir or config.stage_dir("synthesize"))
    splits = {split: read_records(getattr(config.data, split), config.task.type, config.data.max_records) for split in SPLITS}
    stage_fingerprint = state.fingerprint(
        {
            "inputs": {split: state.file_digest(getattr(config.data, split)) for split in SPLITS},
            "max_records": config.data.max_records,
            "task": config.task.model_dump(),
            "teacher": config.teacher.model_dump(),
            "teacher_identity": teacher_identity,
            # The success floor judges the answers; it does not change them.
            "synthesis": config.synthesis.model_dump(exclude={"min_success_ratio"}),
        }
    )
    if not force and state.is_done(out_dir, stage_fingerprint):
        log.info("synthesize: inputs and settings unchanged, reusing %s (use --force to rerun)", out_dir)
        return out_dir
    resumed = state.begin(out_dir, stage_fingerprint, force)
    started = time.monotonic()
    with tracker.stage("synthesize"):
        teacher: Optional[Teacher] = None
        stats: dict = {"splits": {}}
        rejected_rows: list[dict] = []
        for split, records in splits.items():
            journal_path = out_dir / f"{split}.journal.jsonl"
            done = {row["index"] for row in read_journal(journal_path)}
            if resumed and done:
                log.info("synthesize %s: continuing, %d of %d records already answered", split, len(done), len(records))
            if len(done) < len(records):
                teacher = teacher or teacher_factory()
                with AppendLog(journal_path) as journal:
                    synthesize_split(records, teacher, config, journal, done, split)
            rows = {row["index"]: row for row in read_journal(journal_path)}
            ordered = [rows[index] for index in range(len(records))]
            accepted = [row for row in ordered if row["status"] == "ok"]
            write_jsonl(out_dir / f"{split}.jsonl", ({"messages": row["messages"]} for row in accepted))
            reasons: dict[str, int] = {}
            for row in ordered:
                if row["status"] != "ok":
                    rejected_rows.append({"split": split, **{k: row[k] for k in ("line", "reason", "answer", "messages")}})
                    key = row["reason"].split(";")[0]
                    reasons[key] = reasons.get(key, 0) + 1
            stats["splits"][split] = {
                "records": len(records),
                "accepted": len(accepted),
                "rejected": len(records) - len(accepted),
                "rejected_by_reason": reasons,
                "prompt_tokens": sum(row["prompt_tokens"] for row in ordered),
                "completion_tokens": sum(row["completion_tokens"] for row in ordered),
            }
        write_jsonl(out_dir / "rejected.jsonl", rejected_rows)
        total = sum(s["records"] for s in stats["splits"].values())
        accepted_total = sum(s["accepted"] for s in stats["splits"].values())
        elapsed = time.monotonic() - started
        completion_tokens = sum(s["completion_tokens"] for s in stats["splits"].values())
        stats.update(
            teacher=config.teacher.model,
            success_ratio=accepted_total / total,
            seconds=round(elapsed, 2),
            completion_tokens_per_s=round(completion_tokens / elapsed, 2) if elapsed > 0 else None,
        )
        write_json(out_dir / "stats.json", stats)
        metrics = {"success_ratio": stats["success_ratio"], "seconds": elapsed}
        for split, split_stats in stats["splits"].items():
            for key in ("records", "accepted", "rejected", "prompt_tokens", "completion_tokens"):
                metrics[f"{split}_{key}"] = split_stats[key]
        tracker.log_metrics(metrics)
        tracker.log_artifact(out_dir / "stats.json")
        tracker.log_artifact(out_dir / "rejected.jsonl")
        if stats["success_ratio"] < config.synthesis.min_success_ratio:
            top = max(
                ((reason, count) for s in stats["splits"].values() for reason, count in s["rejected_by_reason"].items()),
                key=lambda pair: pair[1],
                default=("", 0),
            )
            raise StageFailed(
                f"synthesize: only {accepted_total} of {total} teacher answers passed the checks "
                f"({stats['success_ratio']:.0%} < synthesis.min_success_ratio {config.synthesis.min_success_ratio:.0%}); "
                f"most common reason: {top[0]} ({top[1]}x); see {out_dir / 'rejected.jsonl'}"
            )
        if not stats["splits"]["train"]["accepted"]:
            raise StageFailed(f"synthesize: no teacher answer to a training prompt passed the checks; see {out_dir / 'rejected.jsonl'}")
        state.finish(out_dir, stage_fingerprint, OUTPUTS, stats)
    log.info(
        "synthesize: %d of %d records accepted (%.0f%%) in %.0f s -> %s",
        accepted_total, total, 100 * stats["success_ratio"], elapsed, out_dir,
    )
    return out_dir
