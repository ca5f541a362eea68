"""Asking the teacher: local teachers in batches, hosted teachers concurrently under their rate limits,
conversations turn by turn with the teacher's own earlier answers in the history."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from azdistill.config.schema import DistillConfig, label_method
from azdistill.console import Progress
from azdistill.data.records import Record
from azdistill.models.generation import Completion
from azdistill.synthesis.checks import judge
from azdistill.synthesis.journal import Journal, SafeLog
from azdistill.synthesis.prompts import teacher_system_prompt
from azdistill.teachers.base import Teacher


@dataclass
class Item:
    """A record being answered: its messages, the teacher's answers so far turn by turn, and what they cost."""

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
    label_probs: Optional[dict] = None  # a constrained label's distribution over task.labels (single-turn records)
    rescued_by: Optional[str] = None  # the measure that made a would-be-rejected answer usable (reject ledger)
    confidence: Optional[float] = None  # self-consistency: the share of the sampled answers that voted for this one
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
        if completion.label_probs is not None:
            self.label_probs, self.rescued_by = completion.label_probs, completion.rescued_by
            # The label distribution is the soft target: stored like a hosted teacher's top-k, one entry per label.
            logprobs = label_logprobs(completion.text, completion.label_probs)
        # Self-consistency: the vote share of the answer kept (math answers have no label distribution to carry it).
        self.rescued_by = self.rescued_by or completion.rescued_by
        self.confidence = getattr(completion, "confidence", None)
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
            if self.label_probs is not None:
                row["label_probs"] = self.label_probs
            if self.rescued_by:
                row["rescued_by"] = self.rescued_by
            if self.confidence is not None:
                row["confidence"] = self.confidence
            if self.rationale_from_trace and not all(self.reasoning):
                row["without_rationale"] = sum(1 for trace in self.reasoning if not trace)
        return row

    def reject(self, reason: str, retryable: bool = False) -> None:
        where = f"turn {len(self.answers) + 1}: " if len(self.user_turns) > 1 else ""
        self.rejected = (where + reason, "")
        self.retryable = retryable


def label_logprobs(label: str, probs: dict) -> list[dict]:
    """A constrained label's distribution in the sidecar's top-k form (`training.examples.align_topk`): one entry
    covering the answer (the label), whose candidates are every label with its log-probability. The student
    learns the distribution where a label is one token of its vocabulary."""
    import math

    def logprob(p: float) -> float:
        return math.log(p) if p > 0 else -1e4

    top = [{"token": name, "logprob": logprob(p)} for name, p in sorted(probs.items(), key=lambda pair: -pair[1])]
    return [{"token": label, "logprob": logprob(probs.get(label, 0.0)), "top_logprobs": top}]


def start_item(record: Record, index: int, config: DistillConfig, partials: Optional[list[dict]] = None) -> Item:
    """The record as the teacher will be asked it (`synthesis.system_prompt` and the prompt strategy applied), with the
    turns a killed run had already journaled (`partials`) answered."""
    messages = [dict(message) for message in record.messages]
    if config.synthesis.system_prompt is not None:
        messages[0] = {"role": "system", "content": config.synthesis.system_prompt}
    user_turns = [position for position, message in enumerate(messages) if message["role"] == "user"]
    system = teacher_system_prompt(
        messages[0]["content"], config.synthesis.prompt_strategy, config.task.type, config.task.labels,
        config.synthesis.density_iterations, config.synthesis.max_summary_words,
    )
    plain = config.synthesis.prompt_strategy == "plain"
    item = Item(index=index, line=record.line, messages=messages, user_turns=user_turns, teacher_system=system,
                plain=plain, rationale_from_trace=plain and config.synthesis.keep_rationale)
    for partial in sorted(partials or [], key=lambda row: row["turn"]):
        if partial["turn"] == len(item.answers) + 1:  # resume a conversation after its answered turns
            item.answers.append(partial["answer"])
            item.raw_answers.append(partial.get("raw", partial["answer"]))
            item.reasoning.append(partial.get("reasoning"))
            if partial.get("logprobs") is not None:
                item.logprobs.append(partial["logprobs"])
    return item


# Drivers: a local model in batches, a hosted endpoint concurrently, or answers already in the data


class Context:
    """What the drivers share: the config, the progress bar and the count of rejected records."""

    def __init__(self, config: DistillConfig, progress: Progress):
        self.config = config
        self.progress = progress
        self.rejected = 0
        # The labels the teacher's answers are constrained to (synthesis.label_constraint), or None for free answers.
        self.labels = list(config.task.labels or []) if label_method(config) is not None else None

    def finished(self, journal, row: dict) -> None:
        journal.append(row)
        self.rejected += row["status"] != "ok"
        self.progress.update(1, rejected=self.rejected)


def reject_too_long(record: Record, index: int, journal, context: Context) -> bool:
    """Reject a record whose prompt is past data.max_prompt_chars before any model sees it (a 10 MB prompt would
    make a local teacher allocate gigabytes and a hosted one bill for it)."""
    from azdistill.data.records import check_prompt_length

    reason = check_prompt_length(record.messages, context.config.data.max_prompt_chars)
    if reason is None:
        return False
    item = start_item(record, index, context.config)
    item.reject(reason)
    context.finished(journal, item.row())
    return True


def run_batches(records: Iterator[tuple[int, Record]], done: Journal, journal, teacher: Teacher, context: Context) -> None:
    """A batched or logged teacher: chunks of `batch_size` records, all turns of a chunk before the next chunk."""
    chunk: list[Item] = []
    for index, record in records:
        if done.is_done(index):
            continue
        if reject_too_long(record, index, journal, context):
            continue
        chunk.append(start_item(record, index, context.config, done.partials.get(index)))
        if len(chunk) == teacher.batch_size:
            _answer_chunk(chunk, journal, teacher, context)
            chunk = []
    if chunk:
        _answer_chunk(chunk, journal, teacher, context)


def _answer_chunk(chunk: list[Item], journal, teacher: Teacher, context: Context) -> None:
    """Turn by turn, the next turn of every record of the chunk still going; then each record to the journal."""
    rejected: set[int] = set()
    while True:
        active = [item for item in chunk if not item.finished and item.index not in rejected]
        if not active:
            break
        if teacher.mode == "logged":
            completions = [teacher.logged_answer(item.messages, item.user_turns[len(item.answers)]) for item in active]
        elif context.labels is not None:
            completions = teacher.choose([item.teacher_prompt() for item in active], context.labels)
        else:
            completions = teacher.answer([item.teacher_prompt() for item in active])
        if len(completions) != len(active):
            raise RuntimeError(f"teacher {teacher.name} returned {len(completions)} answers for {len(active)} prompts")
        for item, completion in zip(active, completions):
            if item.take(completion, context.config):
                rejected.add(item.index)
    for item in chunk:
        context.finished(journal, item.row())


def _answer_item(item: Item, teacher: Teacher, context: Context, journal: SafeLog, stop: threading.Event) -> dict:
    """All remaining turns of one record against a hosted teacher (runs in a worker thread)."""
    from azdistill.teachers.base import RecordRejected

    while not item.finished:
        try:
            if context.labels is not None:
                completion = teacher.choose_one(item.teacher_prompt(), context.labels, stop)
            else:
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


# Tail hedging: once every record has been handed out and a worker is idle, a record whose request went out more than
# HEDGE_AFTER_MEDIANS times the teacher's median request time ago (and at least HEDGE_MIN_S) is asked again by an idle
# worker, and the first answer wins. A hung request (one the endpoint will never answer, waiting out
# teacher.timeout_s) or one sleeping out a back-off would otherwise hold the whole stage at its end (Dean and Barroso,
# "The Tail at Scale", 2013: hedged requests). Only the last records are hedged, at most once each, and only while
# their request is out (not while they wait for their turn under the rate limit): a few extra requests a stage.
HEDGE_AFTER_MEDIANS = 4.0
HEDGE_MIN_S = 0.2
# How often the main thread looks for records to hedge while it waits for the last answers.
HEDGE_CHECK_S = 0.05


@dataclass
class Stream:
    """One split's records for the concurrent driver: what is still to be answered, and where its answers go."""

    records: Iterator[tuple[int, Record]]
    done: Journal
    journal: SafeLog
    context: Context

    def start(self, record: Record, index: int) -> Item:
        """The record's item as this run starts it (from its journaled partial turns, if any): a hedge starts so too."""
        return start_item(record, index, self.context.config, self.done.partials.get(index))


@dataclass(eq=False)  # compared by identity: list.remove must find this job, not an equal one
class _Job:
    stream: Stream
    item: Item
    hedge: bool = False
    thread: Optional[int] = None  # the worker thread answering it
    # The record, from which a hedge starts afresh (`item` changes while its answer is taken); None where no hedge
    # may start: more than one turn left (a hedge would journal a partial turn twice), or a hedge itself.
    record: Optional[Record] = None
    hedged: bool = False


def run_concurrent(streams: list[Stream], teacher: Teacher, clock=time.monotonic) -> None:
    """A concurrent (hosted) teacher: `max_concurrency` worker threads, a bounded window of records in flight.

    The splits go through one pool one after another without waiting between them (the next split's first records
    go out while the previous split's last answers are on their way), and the last records are hedged (above).
    """
    pool = _Pool(teacher, clock)
    window = max(4, 2 * teacher.concurrency)
    try:
        for stream in streams:
            for index, record in stream.records:
                if stream.done.is_done(index):
                    continue
                if reject_too_long(record, index, stream.journal, stream.context):
                    continue
                while len(pool.pending) >= window:
                    pool.collect(timeout=None)
                item = stream.start(record, index)
                pool.submit(_Job(stream, item, record=record if len(item.user_turns) - len(item.answers) == 1 else None))
        while pool.pending:
            try:
                pool.collect(timeout=HEDGE_CHECK_S)
            except queue.Empty:
                pool.hedge_the_tail()
    except BaseException as failure:
        pool.wind_down(failure)
        raise
    finally:
        pool.close()


class _Pool:
    """The worker threads of run_concurrent and the records they hold: each record's jobs (the record, and its hedge)."""

    def __init__(self, teacher: Teacher, clock):
        self.teacher, self.clock = teacher, clock
        self.stop = threading.Event()
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.pending: dict[tuple[int, int], list[_Job]] = {}  # (stream, record index) -> its jobs
        self.busy = 0  # workers answering a record
        self._busy_lock = threading.Lock()
        self.hedged = 0
        # Daemon threads: a worker blocked in a slow request must not keep a stopped run's process alive.
        self.workers = [threading.Thread(target=self._work, name=f"teacher-{n}", daemon=True) for n in range(teacher.concurrency)]
        for worker in self.workers:
            worker.start()

    def _work(self) -> None:
        while not self.stop.is_set():
            job = self.jobs.get()
            if job is None:
                return
            job.thread = threading.get_ident()
            with self._busy_lock:
                self.busy += 1
            try:
                row = _answer_item(job.item, self.teacher, job.stream.context, job.stream.journal, self.stop)
                outcome = (job, row, None)
            except BaseException as error:  # handed to the main thread, which decides
                outcome = (job, None, error)
            finally:
                # Done with this job before it is handed over: the thread's next request is not this record's, so
                # hedge_the_tail must not take it for one still out (and hedge a record already answered).
                job.thread = None
                with self._busy_lock:
                    self.busy -= 1
            self.results.put(outcome)

    def submit(self, job: _Job) -> None:
        self.pending.setdefault((id(job.stream), job.item.index), []).append(job)
        self.jobs.put(job)

    def collect(self, timeout: Optional[float]) -> None:
        """Journal the next record answered (raises queue.Empty after `timeout`); a hedged record's second answer is
        dropped, and an error raised unless the record's other copy may still answer."""
        job, row, error = self.results.get(timeout=timeout)
        key = (id(job.stream), job.item.index)
        copies = self.pending.get(key)
        if copies is None:
            self._count_second_answer(job, row, error)  # the other copy of a hedged record answered first
            return
        given_up = error is None and row.get("retryable")  # its faults ran out; the other copy may still answer
        if (error is not None and not _is_fatal(error) or given_up) and len(copies) > 1:
            copies.remove(job)
            return
        del self.pending[key]  # answered, or failed with no other copy left (nothing more will come for it)
        if error is not None:
            raise error
        job.stream.context.finished(job.stream.journal, row)

    def hedge_the_tail(self) -> None:
        """Ask again the records whose request has been out far longer than the teacher's requests take, while
        workers are idle (only single-turn records, or a conversation's last turn: no partial turn journaled twice)."""
        median = self.teacher.median_request_s()
        if median is None:
            return
        threshold, now = max(HEDGE_MIN_S, HEDGE_AFTER_MEDIANS * median), self.clock()
        with self._busy_lock:
            idle = self.teacher.concurrency - self.busy - self.jobs.qsize()
        for copies in list(self.pending.values()):
            if idle <= 0:
                return
            first = copies[0]
            out_since = self.teacher.request_out_since(first.thread) if first.thread is not None else None
            if len(copies) == 1 and not first.hedged and first.record is not None and out_since is not None \
                    and now - out_since > threshold:
                first.hedged = True
                self.submit(_Job(first.stream, first.stream.start(first.record, first.item.index), hedge=True))
                self.hedged += 1
                idle -= 1

    def wind_down(self, failure: BaseException) -> None:
        """After a failure: nothing new is sent; requests already sent are paid for, so wait for them (a while) and
        journal what comes back. What does not come back in time is asked again on the next run."""
        self.stop.set()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            copies = self.pending.get((id(job.stream), job.item.index), []) if job is not None else []
            if job in copies:
                copies.remove(job)
                if not copies:
                    del self.pending[(id(job.stream), job.item.index)]
        deadline = time.monotonic() + (2.0 if isinstance(failure, KeyboardInterrupt) else self.teacher.timeout_s + 1.0)
        while self.pending and time.monotonic() < deadline:
            try:
                job, row, error = self.results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            key = (id(job.stream), job.item.index)
            copies = self.pending.get(key)
            if copies is None:
                self._count_second_answer(job, row, error)
                continue
            if error is None:
                del self.pending[key]
                job.stream.context.finished(job.stream.journal, row)
            else:  # this copy stopped (or failed); another may still bring an answer that was paid for
                copies.remove(job)
                if not copies:
                    del self.pending[key]

    def _count_second_answer(self, job: _Job, row: Optional[dict], error: Optional[BaseException]) -> None:
        """The copy of a hedged record that answered second: its answer is dropped, but the endpoint billed it."""
        if (job.hedge or job.hedged) and error is None and row is not None:
            self.teacher.stats.count(hedge_prompt_tokens=row.get("prompt_tokens", 0),
                                     hedge_completion_tokens=row.get("completion_tokens", 0))

    def close(self) -> None:
        self.stop.set()
        for _ in self.workers:
            self.jobs.put(None)
        while True:  # second answers already back but not collected (a copy still out is not waited for)
            try:
                job, row, error = self.results.get_nowait()
            except queue.Empty:
                break
            self._count_second_answer(job, row, error)
        if self.hedged:
            self.teacher.stats.count(hedged=self.hedged)


def _is_fatal(error: BaseException) -> bool:
    """An error that stops the stage whichever copy of a record raised it (a wrong key, the budget, a bug)."""
    from azdistill.errors import UserError
    from azdistill.teachers.base import BudgetExceeded

    return isinstance(error, (UserError, BudgetExceeded)) or not isinstance(error, Exception)
