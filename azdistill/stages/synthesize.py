"""Synthesize: the teacher answers every prompt of the train and validation sets.

Single-turn records get one teacher answer. Conversations are regenerated turn by turn: the teacher answers
the first user turn, then the second with its own first answer in the history, and so on. Every answer is
checked (empty, cut off, filtered, unparseable label, number or chain-of-thought JSON); a record with any
failed answer goes to `rejected.jsonl` with its reason, and so does an exact duplicate of an earlier example.

Exactly once. Each finished record is appended to a per-split journal (`<split>.journal.jsonl`) as one line,
flushed at once; a conversation also journals each answered turn. A run killed at any moment (even SIGKILL)
and started again reads the journal and asks the teacher only what it had not answered. Hosted teachers are
asked concurrently, so the journal is in completion order; the final files are written in input order by
reading the journal at the offsets of each record, so memory stays flat however long the split is: the
stage streams its input, keeps only the records in flight and 8 bytes per record for the offsets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from array import array
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

from azdistill.config import DistillConfig
from azdistill.data import AppendLog, Record, atomic_writer, write_json
from azdistill.errors import StageFailed, UserError
from azdistill.generation import Completion
from azdistill.metrics import parse_label, parse_number
from azdistill.progress import Progress
from azdistill.prompts import check_rationale, check_strategy, teacher_system_prompt, training_target
from azdistill.stages import state
from azdistill.teacher import Teacher
from azdistill.tracking import NullTracker

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
OUTPUTS = ["train.jsonl", "validation.jsonl", "rejected.jsonl", "stats.json"]
# Everything the stage writes into its folder: what a rerun under other inputs or settings removes (nothing else).
OWNED = [*OUTPUTS, "*.journal.jsonl", "*.logprobs.jsonl"]


# ---------------------------------------------------------------------------------------------------
# Checks


def check_answer(completion: Completion, task_type: str, labels: Optional[Sequence[str]]) -> Optional[str]:
    """Why a teacher answer cannot be used as training data, or None if it can."""
    problem = _check_completion(completion)
    if problem:
        return problem
    return _check_target(completion.text, task_type, labels)


def _check_completion(completion: Completion) -> Optional[str]:
    if completion.finish_reason.startswith("refused: "):
        return completion.finish_reason[len("refused: ") :]
    if completion.finish_reason == "content_filter":
        return "answer removed by the teacher's content filter (finish_reason=content_filter)"
    if not completion.text.strip():
        return "empty answer"
    if completion.finish_reason != "stop":
        return f"answer cut off (finish_reason={completion.finish_reason}); raise synthesis.max_new_tokens"
    return None


def _check_target(text: str, task_type: str, labels: Optional[Sequence[str]]) -> Optional[str]:
    if task_type == "nli" and parse_label(text, labels or []) is None:
        return f"answer names none or several of the labels {list(labels or [])}"
    if task_type == "math" and parse_number(text) is None:
        return "answer has no number"
    return None


def judge(completion: Completion, config: DistillConfig) -> tuple[Optional[str], Optional[str]]:
    """`(training target, None)` for a usable answer, `(None, reason)` for one that is not."""
    problem = _check_completion(completion)
    if problem:
        return None, problem
    synthesis = config.synthesis
    target, problem = training_target(
        completion.text, synthesis.prompt_strategy, config.task.type, config.task.labels,
        synthesis.keep_rationale, synthesis.max_summary_words, completion.reasoning,
    )
    if problem:
        return None, problem
    if synthesis.prompt_strategy == "plain":
        # The answer is checked, not a reasoning trace put in front of it (which may name every label on its way).
        problem = _check_target(completion.text, config.task.type, config.task.labels)
        if problem:
            return None, problem
    return target, None


# ---------------------------------------------------------------------------------------------------
# Streaming input


def iter_records(path: Path, task_type: str, limit: Optional[int] = None) -> Iterator[Record]:
    """Records of a JSONL split one at a time (validated by `count_records` first)."""
    with Path(path).open("rb") as handle:
        count = 0
        for number, raw_bytes in enumerate(handle, start=1):
            if limit is not None and count >= limit:
                return
            raw = raw_bytes.decode("utf-8").rstrip("\r\n")
            if not raw.strip():
                continue
            row = json.loads(raw)
            count += 1
            yield Record(messages=row["messages"], line=number, extra={k: v for k, v in row.items() if k != "messages"})


def count_records(path: Path, task_type: str, limit: Optional[int] = None) -> int:
    """Validate a split line by line without holding it in memory; the one-line errors of `data.check_split`."""
    from azdistill.data import check_split

    return check_split(path, task_type, limit).records


# ---------------------------------------------------------------------------------------------------
# The journal


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


# ---------------------------------------------------------------------------------------------------
# One record in flight


@dataclass
class _Item:
    index: int
    line: int
    messages: list  # the record's messages, system replaced by synthesis.system_prompt if set
    user_turns: list  # positions of user messages in `messages`
    teacher_system: str  # the system message the teacher sees (with the prompt strategy's instructions)
    answers: list = field(default_factory=list)  # training target of each answered turn
    raw_answers: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    reasoning: list = field(default_factory=list)  # a reasoning model's trace for each answered turn, or None
    plain: bool = True  # prompt_strategy plain: the teacher's history holds its answers, never a rationale put before them
    rationale_from_trace: bool = False  # keep_rationale with plain: the trace is the rationale of the target
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rejected: Optional[tuple] = None  # (reason, the answer that failed)
    rejected_reasoning: Optional[str] = None  # the trace of the answer that failed
    retryable: bool = False  # given up on after transient faults: asked again on the next run

    def teacher_prompt(self) -> list[dict]:
        """What the teacher is asked for the next turn: its system message, the turns so far with its own answers."""
        history = [{"role": "system", "content": self.teacher_system}]
        for turn, answer in enumerate(self.raw_answers if self.plain else self.answers):
            history += [self.messages[self.user_turns[turn]], {"role": "assistant", "content": answer}]
        history.append(self.messages[self.user_turns[len(self.answers)]])
        return history

    def training_messages(self) -> list[dict]:
        history = [self.messages[0]]
        for turn, answer in enumerate(self.answers):
            history += [self.messages[self.user_turns[turn]], {"role": "assistant", "content": answer}]
        return history

    @property
    def finished(self) -> bool:
        return len(self.answers) == len(self.user_turns)

    def take(self, completion: Completion, config: DistillConfig) -> Optional[str]:
        """Add the answer to the next turn; returns why it was rejected, or None."""
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        target, reason = judge(completion, config)
        if reason:
            where = f"turn {len(self.answers) + 1}: " if len(self.user_turns) > 1 else ""
            self.rejected = (where + reason, completion.text)
            self.rejected_reasoning = completion.reasoning
            return reason
        self.answers.append(target)
        self.raw_answers.append(completion.text)
        self.reasoning.append(completion.reasoning)
        logprobs = getattr(completion, "logprobs", None)
        if logprobs is not None:
            self.logprobs.append({"turn": len(self.answers), "text": completion.text, "content": logprobs})
        return None

    def row(self) -> dict:
        row = {"index": self.index, "line": self.line, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        if self.rejected:
            reason, answer = self.rejected
            prompt = self.messages if self.messages[-1]["role"] != "assistant" else self.messages[:-1]
            row.update(status="rejected", reason=reason, answer=answer, messages=prompt)
            if self.rejected_reasoning:
                row["reasoning"] = self.rejected_reasoning
            if self.retryable:
                row["retryable"] = True
        else:
            row.update(status="ok", messages=self.training_messages())
            if self.logprobs:
                row["logprobs"] = self.logprobs
            if any(self.reasoning):
                row["reasoning"] = self.reasoning  # one per assistant turn, None where the teacher gave none
            if self.rationale_from_trace and not all(self.reasoning):
                row["without_rationale"] = sum(1 for trace in self.reasoning if not trace)
        return row

    def reject(self, reason: str, retryable: bool = False) -> None:
        where = f"turn {len(self.answers) + 1}: " if len(self.user_turns) > 1 else ""
        self.rejected = (where + reason, "")
        self.retryable = retryable


def _start(record: Record, index: int, config: DistillConfig, partials: Optional[list[dict]] = None) -> _Item:
    messages = [dict(message) for message in record.messages]
    if config.synthesis.system_prompt is not None:
        messages[0] = {"role": "system", "content": config.synthesis.system_prompt}
    user_turns = [position for position, message in enumerate(messages) if message["role"] == "user"]
    system = teacher_system_prompt(
        messages[0]["content"], config.synthesis.prompt_strategy, config.task.type, config.task.labels,
        config.synthesis.density_iterations, config.synthesis.max_summary_words,
    )
    plain = config.synthesis.prompt_strategy == "plain"
    item = _Item(index=index, line=record.line, messages=messages, user_turns=user_turns, teacher_system=system,
                 plain=plain, rationale_from_trace=plain and config.synthesis.keep_rationale)
    for partial in sorted(partials or [], key=lambda row: row["turn"]):
        if partial["turn"] == len(item.answers) + 1:  # resume a conversation after its answered turns
            item.answers.append(partial["answer"])
            item.raw_answers.append(partial.get("raw", partial["answer"]))
            item.reasoning.append(partial.get("reasoning"))
            if partial.get("logprobs") is not None:
                item.logprobs.append(partial["logprobs"])
    return item


# ---------------------------------------------------------------------------------------------------
# Drivers: a local model in batches, a hosted endpoint concurrently, or answers already in the data


class _Context:
    def __init__(self, config: DistillConfig, progress: Progress):
        self.config = config
        self.progress = progress
        self.rejected = 0

    def finished(self, journal, row: dict) -> None:
        journal.append(row)
        self.rejected += row["status"] != "ok"
        self.progress.update(1, rejected=self.rejected)


def _too_long(record: Record, index: int, journal, context: _Context) -> bool:
    """Reject a record whose prompt is past data.max_prompt_chars before any model sees it (a 10 MB prompt would
    make a local teacher allocate gigabytes and a hosted one bill for it)."""
    from azdistill.data import check_prompt_length

    reason = check_prompt_length(record.messages, context.config.data.max_prompt_chars)
    if reason is None:
        return False
    item = _start(record, index, context.config)
    item.reject(reason)
    context.finished(journal, item.row())
    return True


def _run_batches(records: Iterator[tuple[int, Record]], done: Journal, journal, teacher: Teacher, context: _Context) -> None:
    """A local teacher: chunks of `batch_size` records, all turns of a chunk before the next chunk."""
    chunk: list[_Item] = []
    for index, record in records:
        if done.is_done(index):
            continue
        if _too_long(record, index, journal, context):
            continue
        chunk.append(_start(record, index, context.config, done.partials.get(index)))
        if len(chunk) == teacher.batch_size:
            _answer_chunk(chunk, journal, teacher, context)
            chunk = []
    if chunk:
        _answer_chunk(chunk, journal, teacher, context)


def _answer_chunk(chunk: list[_Item], journal, teacher: Teacher, context: _Context) -> None:
    from_record = getattr(teacher, "answers_from_record", False)
    rejected: set[int] = set()
    while True:
        active = [item for item in chunk if not item.finished and item.index not in rejected]
        if not active:
            break
        if from_record:
            completions = [teacher.logged_answer(item.messages, item.user_turns[len(item.answers)]) for item in active]
        else:
            completions = teacher.answer([item.teacher_prompt() for item in active])
        if len(completions) != len(active):
            raise RuntimeError(f"teacher {teacher.name} returned {len(completions)} answers for {len(active)} prompts")
        for item, completion in zip(active, completions):
            if item.take(completion, context.config):
                rejected.add(item.index)
    for item in chunk:
        context.finished(journal, item.row())


def _answer_item(item: _Item, teacher, context: _Context, journal: SafeLog, stop: threading.Event) -> dict:
    """All remaining turns of one record against a hosted teacher (runs in a worker thread)."""
    from azdistill.endpoints import RecordRejected

    while not item.finished:
        try:
            completion = teacher.complete(item.teacher_prompt(), stop)
        except RecordRejected as error:
            item.reject(str(error), retryable=error.retryable)
            break
        if item.take(completion, context.config):
            break
        if not item.finished:  # journal each answered turn of a conversation, so a kill loses at most one turn
            partial = {
                "index": item.index, "partial": True, "turn": len(item.answers), "answer": item.answers[-1],
                "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            }
            if item.raw_answers[-1] != item.answers[-1]:
                partial["raw"] = item.raw_answers[-1]
            if getattr(completion, "logprobs", None) is not None:
                partial["logprobs"] = item.logprobs[-1]
            if item.reasoning[-1]:
                partial["reasoning"] = item.reasoning[-1]
            journal.append(partial)
            # Tokens of journaled turns are counted there; the final row carries only the rest.
            item.prompt_tokens -= completion.prompt_tokens
            item.completion_tokens -= completion.completion_tokens
    return item.row()


def _run_concurrent(records: Iterator[tuple[int, Record]], done: Journal, journal: SafeLog, teacher, context: _Context) -> None:
    """A hosted teacher: `max_concurrency` worker threads, a bounded window of records in flight."""
    stop = threading.Event()
    jobs: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def work() -> None:
        while not stop.is_set():
            item = jobs.get()
            if item is None:
                return
            try:
                results.put((_answer_item(item, teacher, context, journal, stop), None))
            except BaseException as error:  # handed to the main thread, which decides
                results.put((None, error))

    # Daemon threads: a worker blocked in a slow request must not keep a stopped run's process alive.
    workers = [threading.Thread(target=work, name=f"teacher-{n}", daemon=True) for n in range(teacher.concurrency)]
    for worker in workers:
        worker.start()
    window = max(4, 2 * teacher.concurrency)
    in_flight = 0

    def collect(block: bool) -> None:
        nonlocal in_flight
        row, error = results.get() if block else results.get_nowait()
        in_flight -= 1
        if error is not None:
            raise error
        context.finished(journal, row)

    try:
        for index, record in records:
            if done.is_done(index):
                continue
            if _too_long(record, index, journal, context):
                continue
            while in_flight >= window:
                collect(block=True)
            jobs.put(_start(record, index, context.config, done.partials.get(index)))
            in_flight += 1
        while in_flight:
            collect(block=True)
    except BaseException as failure:
        stop.set()
        # Nothing new is sent; requests already sent are paid for, so wait for them (a while) and journal what
        # comes back. What does not come back in time is asked again on the next run.
        while True:
            try:
                jobs.get_nowait()
                in_flight -= 1
            except queue.Empty:
                break
        deadline = time.monotonic() + (2.0 if isinstance(failure, KeyboardInterrupt) else teacher.timeout_s + 1.0)
        while in_flight > 0 and time.monotonic() < deadline:
            try:
                row, error = results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            in_flight -= 1
            if error is None:
                context.finished(journal, row)
        raise
    finally:
        stop.set()
        for _ in workers:
            jobs.put(None)


# ---------------------------------------------------------------------------------------------------
# Final files


def _read_row(handle: IO[bytes], offset: int) -> dict:
    handle.seek(offset)
    return json.loads(handle.readline())


def _example_hash(messages: list) -> int:
    digest = hashlib.blake2b(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def _duplicates(handle: IO[bytes], offsets: array) -> "object":
    """For each record, the index of the earlier record it exactly duplicates, or -1 (numpy, 16 bytes a record)."""
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


def _finish_split(split: str, records: int, journal_path: Path, out_dir: Path, rejected_out: IO[str], config: DistillConfig, logprobs: bool) -> dict:
    """Write `<split>.jsonl` (and the logprobs sidecar) in input order from the journal; returns the split's stats."""
    done = Journal.scan(journal_path, records)
    missing = [index for index in range(records) if done.offsets[index] < 0]
    if missing:  # cannot happen unless the journal was edited: never write a set with holes
        raise RuntimeError(f"synthesize {split}: {len(missing)} records have no answer in {journal_path} (e.g. #{missing[0]})")
    reasons: dict[str, int] = {}
    accepted = without_rationale = 0
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
            if row["status"] == "ok":
                out.write(json.dumps({"messages": row["messages"]}, ensure_ascii=False) + "\n")
                if sidecar is not None:
                    sidecar.write(json.dumps({"row": accepted, "index": index, "line": row["line"], "turns": row.get("logprobs") or []}, ensure_ascii=False) + "\n")
                accepted += 1
                without_rationale += row.get("without_rationale", 0)
            else:
                rejected = {"split": split, **{k: row[k] for k in ("line", "reason", "answer", "messages")}}
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
    if config.synthesis.keep_rationale and config.synthesis.prompt_strategy == "plain":
        stats["trained_without_rationale"] = without_rationale  # answers that came with no reasoning trace
    return stats


# ---------------------------------------------------------------------------------------------------
# The stage


def stage_fingerprint(config: DistillConfig, teacher_identity: Optional[str]) -> str:
    """Everything the answers depend on; operational settings (rate limits, retries, prices, budget) are not."""
    teacher = config.teacher.model_dump(
        exclude={"auth", "timeout_s", "max_concurrency", "requests_per_minute", "tokens_per_minute", "max_retries",
                 "backoff_s", "max_backoff_s", "price_per_million_prompt_tokens", "price_per_million_completion_tokens",
                 "local_copy", "parameters"}
    )
    if config.teacher.kind == "local":  # the fingerprint of earlier local runs stays valid
        teacher = {"kind": "local", "model": config.teacher.model}
    for name, default in (("max_tokens_field", "max_tokens"), ("reasoning_effort", None), ("sampling_parameters", True)):
        if teacher.get(name, default) == default:
            teacher.pop(name, None)  # request settings left at their default do not change earlier fingerprints
    synthesis = config.synthesis.model_dump(exclude={"min_success_ratio", "max_cost", "preflight"})
    for name, default in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("prompt_strategy", "plain"), ("keep_rationale", False),
                          ("density_iterations", 4), ("max_summary_words", 80), ("top_logprobs", 0), ("reject_duplicates", True)):
        if synthesis.get(name) == default:
            synthesis.pop(name)  # settings left at their default do not change earlier fingerprints
    return state.fingerprint(
        {
            "inputs": {split: state.file_digest(getattr(config.data, split)) for split in SPLITS},
            "max_records": config.data.max_records,
            "task": config.task.model_dump(),
            "teacher": teacher,
            "teacher_identity": teacher_identity,
            # The success floor judges the answers; it does not change them.
            "synthesis": synthesis,
        }
    )


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
    check_strategy(config.synthesis.prompt_strategy, config.task.type)
    check_rationale(config.synthesis.keep_rationale, config.synthesis.prompt_strategy, config.teacher.hosted)
    counts = {split: count_records(getattr(config.data, split), config.task.type, config.data.max_records) for split in SPLITS}
    fingerprint = stage_fingerprint(config, teacher_identity)
    if not force and state.is_done(out_dir, fingerprint, "synthesize"):
        log.info("synthesize: inputs and settings unchanged, reusing %s (use --force to rerun)", out_dir)
        return out_dir
    state.check_writable(out_dir, "synthesize")
    teacher = None
    try:
        if state.needs_reset(out_dir, fingerprint, force):
            # Earlier answers go only once the teacher is known to work: its credential, the endpoint, the budget.
            teacher = _ready_teacher(teacher_factory, config, out_dir, counts, fresh=True)
        resumed = state.begin(out_dir, fingerprint, force, "synthesize", OWNED)
        return _synthesize(config, teacher_factory, tracker, out_dir, fingerprint, counts, resumed, teacher)
    finally:
        if teacher is not None and hasattr(teacher, "close"):
            teacher.close()


def _ready_teacher(teacher_factory, config: DistillConfig, out_dir: Path, counts: dict[str, int], fresh: bool = False):
    """Build the teacher; a hosted one gets the spend so far (from the journals) and the preflight check.

    The preflight's sample answer is kept (the teacher answers that prompt with it); a run that continues
    makes no sample call.
    """
    teacher = teacher_factory()
    if not hasattr(teacher, "budget"):
        return teacher
    spent = {} if fresh else {split: Journal.scan(out_dir / f"{split}.journal.jsonl", counts[split]) for split in SPLITS}
    teacher.budget.spent = teacher.budget.cost(
        sum(j.prompt_tokens for j in spent.values()), sum(j.completion_tokens for j in spent.values())
    )
    if not config.synthesis.preflight:
        return teacher
    from azdistill.preflight import preflight

    done = sum(j.done + len(j.partials) for j in spent.values())
    report = preflight(config, teacher, counts, done=done, sample=done == 0)
    for line in report.lines:
        log.info("preflight: %s", line)
    report.raise_for_budget()
    if report.sample_completion is not None:
        return _SampleFirst(teacher, report.sample_prompt, report.sample_completion)
    return teacher


class _SampleFirst:
    """A hosted teacher that answers the preflight's sample prompt with the answer it already gave (and was paid
    for) instead of asking again; everything else goes to the teacher."""

    def __init__(self, teacher, prompt: list, completion):
        self._teacher, self._prompt, self._completion = teacher, prompt, completion
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self._teacher, name)

    def complete(self, messages, stop: Optional[threading.Event] = None):
        with self._lock:
            completion, matches = self._completion, self._completion is not None and list(messages) == self._prompt
            if matches:
                self._completion = None
        return completion if matches else self._teacher.complete(messages, stop)


def _synthesize(config: DistillConfig, teacher_factory, tracker: NullTracker, out_dir: Path, fingerprint: str,
                counts: dict[str, int], resumed: bool, teacher) -> Path:
    started = time.monotonic()
    logprobs = config.teacher.hosted and config.synthesis.top_logprobs > 0
    outputs = OUTPUTS + ([f"{split}.logprobs.jsonl" for split in SPLITS] if logprobs else [])
    with tracker.stage("synthesize"):
        try:
            for split, records in counts.items():
                journal_path = out_dir / f"{split}.journal.jsonl"
                done = Journal.scan(journal_path, records, retry_failed=True)
                if resumed and (done.done or done.partials):
                    log.info("synthesize %s: continuing, %d of %d records already answered", split, done.done, records)
                if done.done == records:
                    continue
                if teacher is None:
                    teacher = _ready_teacher(teacher_factory, config, out_dir, counts)
                records_iter = enumerate(iter_records(getattr(config.data, split), config.task.type, config.data.max_records))
                with Progress(records - done.done, f"synthesize {split}", unit="records") as progress, AppendLog(journal_path) as append_log:
                    context = _Context(config, progress)
                    if hasattr(teacher, "complete"):
                        safe = SafeLog(append_log)
                        try:
                            _run_concurrent(records_iter, done, safe, teacher, context)
                        finally:
                            safe.close()
                    else:
                        _run_batches(records_iter, done, append_log, teacher, context)
        finally:
            if teacher is not None and hasattr(teacher, "close"):
                teacher.close()

        stats: dict = {"splits": {}}
        with atomic_writer(out_dir / "rejected.jsonl") as rejected_out:
            for split, records in counts.items():
                stats["splits"][split] = _finish_split(split, records, out_dir / f"{split}.journal.jsonl", out_dir, rejected_out, config, logprobs)
        total = sum(s["records"] for s in stats["splits"].values())
        accepted_total = sum(s["accepted"] for s in stats["splits"].values())
        elapsed = time.monotonic() - started
        prompt_tokens = sum(s["prompt_tokens"] for s in stats["splits"].values())
        completion_tokens = sum(s["completion_tokens"] for s in stats["splits"].values())
        stats.update(
            teacher=config.teacher.model if config.teacher.kind == "local" else f"{config.teacher.kind}:{getattr(teacher, 'name', None) or config.teacher.deployment or config.teacher.model}",
            success_ratio=accepted_total / total,
            seconds=round(elapsed, 2),
            completion_tokens_per_s=round(completion_tokens / elapsed, 2) if elapsed > 0 else None,
        )
        if teacher is not None and hasattr(teacher, "stats"):
            stats["endpoint"] = teacher.stats.as_dict()
        prices = (config.teacher.price_per_million_prompt_tokens, config.teacher.price_per_million_completion_tokens)
        if any(price is not None for price in prices):
            stats["cost"] = round(prompt_tokens * (prices[0] or 0) / 1e6 + completion_tokens * (prices[1] or 0) / 1e6, 6)
        write_json(out_dir / "stats.json", stats)
        metrics = {"success_ratio": stats["success_ratio"], "seconds": elapsed}
        for split, split_stats in stats["splits"].items():
            for key in ("records", "accepted", "rejected", "prompt_tokens", "completion_tokens"):
                metrics[f"{split}_{key}"] = split_stats[key]
        if "endpoint" in stats:
            for key in ("requests", "retries", "throttled", "refused"):
                metrics[f"teacher_{key}"] = stats["endpoint"][key]
        if "cost" in stats:
            metrics["teacher_cost"] = stats["cost"]
        without_rationale = sum(s.get("trained_without_rationale", 0) for s in stats["splits"].values())
        if without_rationale:
            log.warning(
                "synthesize: %d accepted answers came with no reasoning trace, so synthesis.keep_rationale trains them on "
                "the answer alone (a model that does not reason, or one whose endpoint hides its reasoning, as Azure "
                "OpenAI's o-series do)", without_rationale,
            )
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
        state.finish(out_dir, fingerprint, outputs, stats, stage="synthesize")
    log.info(
        "synthesize: %d of %d records accepted (%.0f%%) in %.0f s -> %s",
        accepted_total, total, 100 * stats["success_ratio"], elapsed, out_dir,
    )
    return out_dir
