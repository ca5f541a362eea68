"""synthesis.mode batch: the records the journals lack are asked through the provider's Batch API, and every answer
goes through the checks online answers go through, into the same journals.

A run alternates two steps until nothing is left to ask:

- a pass over the splits in input order: each record not journaled yet is asked of `teacher.batch.BatchAnswered`, the
  hosted client answering from the batches' output. A record whose requests all have answers is judged exactly as online
  (`answering._answer_item`: Item.take, Item.reject) and journaled; a record with a request not answered yet puts that
  request (its `custom_id` is the split, the record's index and a digest of the body) into the next batch's JSONL;
- the batch: the JSONL uploaded (purpose batch), the batch created, and waited for; its output and error files are
  appended to `batch.answers.jsonl`, where the next pass reads them.

A record needs a second batch when its first one answered 429 or 5xx, expired before reaching it, or its answer asks for
more (the label constraint falling back to log-probabilities, votes the endpoint returned too few of). Each run submits at
most 1 + synthesis.batch_retries rounds of batches; a record still without an answer after them is rejected as retryable,
so the next run asks it again.

State. `batch.json` holds the provider's ids of every batch (input file, batch, when submitted, how many requests, its
status), written atomically after the upload and again after the create, before any waiting. A run that was stopped (Ctrl-C,
SIGKILL, a crash) finds the batch there and waits for it again: nothing is submitted, or paid, twice; one stopped between the
upload and the create finds its batch by the input file. The key is never written: it goes in headers only.

Exactly once: every record is journaled once, from the answers whatever batch brought them, and the final files are written
from the journals in input order as online (outputs.finish_split).
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from azdistill.config.schema import DistillConfig
from azdistill.console import Progress
from azdistill.data.files import AppendLog, write_json
from azdistill.data.records import Record
from azdistill.errors import StageFailed, UserError
from azdistill.secrets import redact
from azdistill.synthesis.answering import Context, _answer_item, reject_too_long, start_item
from azdistill.synthesis.journal import Journal
from azdistill.teachers.base import BudgetExceeded, TransientError
from azdistill.teachers.batch import BatchAnswered, BatchClient, Unanswered, status_of
from azdistill.teachers.hosted import EndpointTeacher
from azdistill.teachers.limits import Budget, estimate_tokens

log = logging.getLogger(__name__)

STATE = "batch.json"
ANSWERS = "batch.answers.jsonl"
# What one batch may hold: OpenAI takes 50,000 requests and 200 MB per input file (Azure OpenAI 100,000 and 200 MB).
MAX_REQUESTS = 50_000
MAX_BYTES = 190 * 1024 * 1024


def batch_budget(config: DistillConfig) -> Budget:
    """The teacher's budget at batch prices (teacher.batch_price_ratio of the online prices), capped by synthesis.max_cost."""
    teacher, ratio = config.teacher, config.teacher.batch_price_ratio
    prices = [price * ratio if price is not None else None
              for price in (teacher.price_per_million_prompt_tokens, teacher.price_per_million_completion_tokens)]
    return Budget(prices[0], prices[1], config.synthesis.max_cost)


def client_for(config: DistillConfig, teacher: EndpointTeacher, clock: Callable[[], float] = time.time,
               sleep: Callable[[float], None] = time.sleep) -> BatchClient:
    """The Batch API of the config's hosted teacher, through that teacher's session and credential."""
    return BatchClient(teacher, config.teacher.endpoint, config.teacher.api_version, clock, sleep)


def read_state(out_dir: Path) -> dict:
    """`batch.json` of a stage folder (no batches when there is none)."""
    path = Path(out_dir) / STATE
    if not path.is_file():
        return {"batches": []}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path}: not valid JSON; it holds the ids of batches paid for: restore it, or run "
                        "`azdistill synthesize --force` to start over (submitting every record again)") from None
    return state if isinstance(state.get("batches"), list) else {"batches": []}


def summary(out_dir: Path) -> Optional[dict]:
    """The batches of a stage folder for stats.json: ids, statuses and request counts; None when there were none."""
    batches = read_state(out_dir)["batches"]
    if not batches:
        return None
    counts = [batch.get("request_counts") or {} for batch in batches]
    return {
        "batches": [{key: batch.get(key) for key in ("batch_id", "input_file_id", "submitted_at", "requests", "status")}
                    for batch in batches],
        "requests": sum(batch.get("requests", 0) for batch in batches),
        "completed": sum(int(count.get("completed") or 0) for count in counts),
        "failed": sum(int(count.get("failed") or 0) for count in counts),
    }


def cancel_open(out_dir: Path, teacher: EndpointTeacher, config: DistillConfig) -> None:
    """Cancel the batches a stage folder still waits for, before its earlier work is removed (--force, or other inputs or
    settings): their answers would be thrown away, and the provider bills what it answers."""
    client = client_for(config, teacher)
    state = read_state(out_dir)
    for entry in state["batches"]:
        if not entry.get("batch_id") or entry.get("collected"):
            continue
        try:
            client.cancel(entry["batch_id"])
        except (UserError, TransientError) as error:  # e.g. the batch is at an endpoint the config no longer names
            log.warning("synthesize: batch %s could not be cancelled (%s); it may still run and be billed", entry["batch_id"],
                        error)
            continue
        entry.update(status="cancelled", collected=True)
        write_json(out_dir / STATE, state)
        log.info("synthesize: batch %s cancelled: its answers would not be used", entry["batch_id"])


class AnswerStore:
    """Every line the batches answered (their output and error files), appended as downloaded with the batch's id; read
    back by custom_id, the latest line winning (a follow-up batch's answer after the fault it replaces)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._log = AppendLog(self.path)  # drops a torn last line of a killed run
        self._offsets: dict[str, int] = {}
        with self.path.open("rb") as handle:
            offset = 0
            for raw in handle:
                self._offsets[json.loads(raw)["custom_id"]] = offset
                offset += len(raw)
        self._reader = self.path.open("rb")
        self._lock = threading.Lock()

    def add(self, batch_id: str, downloaded: Path) -> int:
        """Append the lines of a downloaded output or error file; returns how many."""
        count = 0
        with downloaded.open("rb") as handle:
            for raw in handle:
                if not raw.strip():
                    continue
                line = json.loads(raw)
                offset = self.path.stat().st_size
                self._log.append({"batch": batch_id, "custom_id": line.get("custom_id"), "response": line.get("response"),
                                  "error": line.get("error")})
                self._offsets[str(line.get("custom_id"))] = offset
                count += 1
        return count

    def latest(self, custom_id: str) -> Optional[dict]:
        offset = self._offsets.get(custom_id)
        if offset is None:
            return None
        with self._lock:
            self._reader.seek(offset)
            return json.loads(self._reader.readline())

    def close(self) -> None:
        self._log.close()
        self._reader.close()


class _RequestFiles:
    """The lines of the next round, written to `batch.<n>.input.jsonl` as the pass finds them: a new file (another batch)
    past what one batch may hold. Counts the worst-case tokens of the lines, for the budget."""

    def __init__(self, out_dir: Path, first_number: int, max_new_tokens: int):
        self.out_dir, self.number, self.max_new_tokens = Path(out_dir), first_number, max_new_tokens
        self.files: list[dict] = []  # {"file", "requests"}
        self.prompt_tokens = self.completion_tokens = 0
        self.again: dict[str, int] = {}  # why requests are asked again: the last batch's answer, counted
        self._handle = None
        self._bytes = 0

    def add(self, line: dict, reason: Optional[str]) -> None:
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        if self._handle is None or self.files[-1]["requests"] >= MAX_REQUESTS or self._bytes + len(data) > MAX_BYTES:
            self._open()
        self._handle.write(data)
        self._bytes += len(data)
        self.files[-1]["requests"] += 1
        body = line["body"]
        self.prompt_tokens += estimate_tokens(body["messages"])
        longest = body.get("max_completion_tokens") or body.get("max_tokens") or self.max_new_tokens
        self.completion_tokens += int(longest) * int(body.get("n") or 1)
        if reason:
            key = reason.split(":")[0].split(" (")[0]
            self.again[key] = self.again.get(key, 0) + 1

    def _open(self) -> None:
        self.close()
        name = f"batch.{self.number + len(self.files)}.input.jsonl"
        self._handle = (self.out_dir / name).open("wb")
        self._bytes = 0
        self.files.append({"file": name, "requests": 0})

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def answer_splits(config: DistillConfig, out_dir: Path, counts: dict[str, int], split_records: Callable[[str], Iterator[Record]],
                  ready: Callable[[], EndpointTeacher], clock: Callable[[], float] = time.time,
                  sleep: Callable[[float], None] = time.sleep) -> None:
    """Answer every record the splits' journals lack through the provider's Batch API (see the module docstring).

    `split_records(split)` gives a split's records in input order; `ready()` builds the hosted teacher, called only when
    there is something to ask or a batch to wait for. `clock` (epoch seconds) and `sleep` are injectable for tests.
    """
    out_dir = Path(out_dir)
    if all(Journal.scan(out_dir / f"{split}.journal.jsonl", total, retry_failed=True).done == total
           for split, total in counts.items()):
        if any(not entry.get("collected") for entry in read_state(out_dir)["batches"]):
            cancel_open(out_dir, ready(), config)  # answered meanwhile (in online mode): nothing is left to wait for
        return
    state = read_state(out_dir)
    teacher = ready()
    if not isinstance(teacher, EndpointTeacher):
        raise UserError(f"synthesis.mode batch needs a hosted teacher's client, and the teacher {teacher.name} is not one: "
                        "use teacher.kind azure_openai or openai-compatible, or synthesis.mode online")
    client = client_for(config, teacher, clock, sleep)
    store = AnswerStore(out_dir / ANSWERS)
    replay = BatchAnswered(teacher, store.latest, client.line_url)
    rounds, cancelled = 0, None
    try:
        while True:
            waiting = [entry for entry in state["batches"] if not entry.get("collected")]
            if waiting:
                for entry in waiting:
                    status = _collect(client, entry, state, out_dir, store, config, clock)
                    cancelled = entry["batch_id"] if status == "cancelled" else cancelled
                rounds += 1
            # After 1 + batch_retries rounds a request still without an answer rejects its record (retryable).
            replay.final = rounds > config.synthesis.batch_retries
            replay.batches = sum(1 for entry in state["batches"] if entry.get("collected"))
            requests = _answer_pass(config, out_dir, counts, split_records, replay, len(state["batches"]) + 1)
            if not requests.files:
                return
            if cancelled is not None:
                raise StageFailed(
                    f"synthesize: batch {cancelled} was cancelled at the provider; its answers are kept and "
                    f"{sum(f['requests'] for f in requests.files)} requests are still to ask: run again to submit them"
                )
            _check_budget(teacher, out_dir, counts, requests)
            _submit(client, requests, state, out_dir, clock)
    except KeyboardInterrupt:
        waiting = [entry["batch_id"] for entry in state["batches"] if entry.get("batch_id") and not entry.get("collected")]
        if waiting:
            log.warning("synthesize: stopped; batch %s keeps running at the provider, and the next `azdistill run` (or "
                        "synthesize) waits for it again instead of submitting anything", ", ".join(waiting))
        raise
    finally:
        store.close()


def _answer_pass(config: DistillConfig, out_dir: Path, counts: dict[str, int], split_records: Callable[[str], Iterator[Record]],
                 replay: BatchAnswered, first_number: int) -> _RequestFiles:
    """Journal every record the batches have answered (judged as online); returns the requests still to ask."""
    requests = _RequestFiles(out_dir, first_number, config.synthesis.max_new_tokens)
    never = threading.Event()  # one thread, and nothing to stop: every answer is already here
    try:
        for split, total in counts.items():
            journal_path = out_dir / f"{split}.journal.jsonl"
            done = Journal.scan(journal_path, total, retry_failed=True)
            if done.done == total:
                continue
            progress = Progress(total - done.done, f"synthesize {split}", unit="records")
            with progress, AppendLog(journal_path) as journal:
                context = Context(config, progress)
                for index, record in enumerate(split_records(split)):
                    if done.is_done(index) or reject_too_long(record, index, journal, context):
                        continue
                    item = start_item(record, index, config)
                    if len(item.user_turns) != 1:
                        raise UserError(f"{getattr(config.data, split)}:{record.line}: a conversation of {len(item.user_turns)} "
                                        "user turns, which synthesis.mode batch cannot answer (each turn needs the answer "
                                        "to the one before): use synthesis.mode online")
                    replay.for_record(f"{split}-{index}")
                    try:
                        row = _answer_item(item, replay, context, journal, never)
                    except Unanswered as pending:
                        requests.add(pending.line, pending.reason)
                        continue
                    context.finished(journal, row)
    finally:
        requests.close()
    if requests.again:
        log.info("synthesize: asking again in a new batch: %s",
                 ", ".join(f"{count} x {reason}" for reason, count in sorted(requests.again.items())))
    return requests


def _check_budget(teacher: EndpointTeacher, out_dir: Path, counts: dict[str, int], requests: _RequestFiles) -> None:
    """Refuse to submit a batch whose worst case (every answer as long as max_new_tokens) could take the spend past
    synthesis.max_cost: a batch cannot be stopped halfway once submitted."""
    budget = teacher.budget
    if budget is None or budget.max_cost is None:
        return
    journals = [Journal.scan(out_dir / f"{split}.journal.jsonl", total) for split, total in counts.items()]
    spent = budget.cost(sum(j.prompt_tokens for j in journals), sum(j.completion_tokens for j in journals))
    worst = budget.cost(requests.prompt_tokens, requests.completion_tokens)
    if spent + worst > budget.max_cost:
        asked = sum(f["requests"] for f in requests.files)
        raise BudgetExceeded(
            f"synthesize: the next batch of {asked} requests could cost up to {worst:.4g} at batch prices (every answer as "
            f"long as synthesis.max_new_tokens), with {spent:.4g} spent, past synthesis.max_cost {budget.max_cost:g}; what "
            "was answered is kept: raise synthesis.max_cost (or lower data.max_records) and run again to continue"
        )


def _now(clock: Callable[[], float]) -> str:
    return datetime.datetime.fromtimestamp(clock(), datetime.timezone.utc).isoformat(timespec="seconds")


def _submit(client: BatchClient, requests: _RequestFiles, state: dict, out_dir: Path, clock: Callable[[], float]) -> None:
    """Upload each request file and create its batch, writing the provider's ids to batch.json after each step."""
    for request_file in requests.files:
        entry = {"file": request_file["file"], "requests": request_file["requests"], "submitted_at": _now(clock)}
        entry["input_file_id"] = client.upload(out_dir / request_file["file"])
        state["batches"].append(entry)
        write_json(out_dir / STATE, state)  # a run stopped before the create finds its batch by this file
        batch = client.create(entry["input_file_id"])
        entry.update(batch_id=batch["id"], status=status_of(batch))
        write_json(out_dir / STATE, state)
        log.info("synthesize: batch %s submitted with %d requests (%s); answers come within 24 h, and a stopped run "
                 "waits for it again when started again", batch["id"], entry["requests"], entry["file"])


def _collect(client: BatchClient, entry: dict, state: dict, out_dir: Path, store: AnswerStore, config: DistillConfig,
             clock: Callable[[], float]) -> str:
    """Wait for one batch and keep what it answered (output and error files); returns its final status. A batch the
    provider failed (its input did not validate) is a UserError with the provider's reasons."""
    path = out_dir / STATE
    if not entry.get("batch_id"):  # stopped between the upload and the create: the create may have happened
        batch = client.find(entry["input_file_id"]) or client.create(entry["input_file_id"])
        entry.update(batch_id=batch["id"], status=status_of(batch))
        write_json(path, state)
    started = _parse_time(entry.get("submitted_at"))

    def report(batch: dict) -> None:
        counts = batch.get("request_counts") or {}
        waited = f", {_duration(clock() - started)} since submitted" if started is not None else ""
        log.info("synthesize: batch %s %s: %d of %d requests answered, %d failed%s", entry["batch_id"], status_of(batch),
                 int(counts.get("completed") or 0), int(counts.get("total") or entry.get("requests") or 0),
                 int(counts.get("failed") or 0), waited)

    batch = client.wait(entry["batch_id"], config.synthesis.batch_poll_s, report)
    status = status_of(batch)
    entry.update(status=status, request_counts=batch.get("request_counts"),
                 output_file_id=batch.get("output_file_id"), error_file_id=batch.get("error_file_id"))
    if status == "failed":
        entry["collected"] = True
        write_json(path, state)
        raise UserError(f"synthesize: the provider refused batch {entry['batch_id']} ({entry['file']}): {_errors(batch)}")
    download = out_dir / ".batch.download.tmp"
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key):
            client.download(batch[key], download)
            store.add(entry["batch_id"], download)
            download.unlink()
    entry["collected"] = True
    write_json(path, state)
    if status in ("expired", "cancelled"):
        log.warning("synthesize: batch %s %s with %s; the answered requests are kept", entry["batch_id"], status,
                    _counts_text(batch))
    return status


def _errors(batch: dict) -> str:
    """The provider's reasons for failing a batch, on one line (the first five, with their line of the input file)."""
    data = ((batch.get("errors") or {}).get("data") or []) if isinstance(batch.get("errors"), dict) else []
    shown = []
    for error in data[:5]:
        where = f"line {error['line']}: " if error.get("line") is not None else ""
        shown.append(f"{where}{error.get('code') or 'error'}: {error.get('message') or 'no details'}")
    more = f" (and {len(data) - 5} more)" if len(data) > 5 else ""
    return redact("; ".join(shown) + more if shown else "no reason given")[:1000]


def _counts_text(batch: dict) -> str:
    counts = batch.get("request_counts") or {}
    return f"{int(counts.get('completed') or 0)} of {int(counts.get('total') or 0)} requests answered"


def _parse_time(text: Optional[str]) -> Optional[float]:
    try:
        return datetime.datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    minutes = max(0, int(seconds)) // 60
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
