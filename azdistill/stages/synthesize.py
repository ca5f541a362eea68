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

import logging
import threading
import time
from pathlib import Path
from typing import Optional

from azdistill.config.schema import DistillConfig
from azdistill.console import Progress
from azdistill.data import digests
from azdistill.data.files import AppendLog, atomic_writer, write_json
from azdistill.data.records import count_records, iter_records
from azdistill.errors import StageFailed
from azdistill.stages import state
from azdistill.synthesis.answering import Context, run_batches, run_concurrent
from azdistill.synthesis.journal import Journal, SafeLog
from azdistill.synthesis.outputs import SPLITS, finish_split
from azdistill.synthesis.prompts import check_rationale, check_strategy
from azdistill.teachers.base import Teacher
from azdistill.tracking.tracker import NullTracker

log = logging.getLogger(__name__)


OUTPUTS = ["train.jsonl", "validation.jsonl", "rejected.jsonl", "stats.json"]
# Everything the stage writes into its folder: what a rerun under other inputs or settings removes (nothing else).
OWNED = [*OUTPUTS, "*.journal.jsonl", "*.logprobs.jsonl"]


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
    return digests.fingerprint(
        {
            "inputs": {split: digests.file_digest(getattr(config.data, split)) for split in SPLITS},
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
        if teacher is not None:
            teacher.close()


def _ready_teacher(teacher_factory, config: DistillConfig, out_dir: Path, counts: dict[str, int], fresh: bool = False) -> Teacher:
    """Build the teacher; a billed (hosted) one gets the spend so far (from the journals) and the preflight check.

    The preflight's sample answer is kept (the teacher answers that prompt with it); a run that continues
    makes no sample call.
    """
    teacher = teacher_factory()
    if teacher.budget is None:  # nothing billed (a local or logged teacher): no spend to restore, no endpoint to check
        return teacher
    spent = {} if fresh else {split: Journal.scan(out_dir / f"{split}.journal.jsonl", counts[split]) for split in SPLITS}
    teacher.budget.spent = teacher.budget.cost(
        sum(j.prompt_tokens for j in spent.values()), sum(j.completion_tokens for j in spent.values())
    )
    if not config.synthesis.preflight:
        return teacher
    from azdistill.synthesis.preflight import preflight

    done = sum(j.done + len(j.partials) for j in spent.values())
    report = preflight(config, teacher, counts, done=done, sample=done == 0)
    for line in report.lines:
        log.info("preflight: %s", line)
    report.raise_for_budget()
    if report.sample_completion is not None:
        return _SampleFirst(teacher, report.sample_prompt, report.sample_completion)
    return teacher


class _SampleFirst(Teacher):
    """A hosted teacher that answers the preflight's sample prompt with the answer it already gave (and was paid
    for) instead of asking again; everything else goes to the teacher, whose members it shares (the same budget and
    counters)."""

    mode = "concurrent"

    def __init__(self, teacher: Teacher, prompt: list, completion):
        self._teacher, self._prompt, self._completion = teacher, prompt, completion
        self._lock = threading.Lock()
        self.name, self.batch_size, self.budget, self.stats = teacher.name, teacher.batch_size, teacher.budget, teacher.stats
        self.concurrency, self.timeout_s = teacher.concurrency, teacher.timeout_s

    def close(self) -> None:
        self._teacher.close()

    def complete(self, messages, stop: Optional[threading.Event] = None):
        with self._lock:
            completion, matches = self._completion, self._completion is not None and list(messages) == self._prompt
            if matches:
                self._completion = None
        return completion if matches else self._teacher.complete(messages, stop)


def _synthesize(config: DistillConfig, teacher_factory, tracker: NullTracker, out_dir: Path, fingerprint: str,
                counts: dict[str, int], resumed: bool, teacher: Optional[Teacher]) -> Path:
    """Answer what the journals do not hold yet, write the final files and figures, and judge the share accepted."""
    started = time.monotonic()
    logprobs = config.teacher.hosted and config.synthesis.top_logprobs > 0
    outputs = OUTPUTS + ([f"{split}.logprobs.jsonl" for split in SPLITS] if logprobs else [])
    with tracker.stage("synthesize"):
        teacher = _answer_splits(config, teacher_factory, out_dir, counts, resumed, teacher)
        stats = _finish_splits(config, out_dir, counts, logprobs)
        elapsed = time.monotonic() - started
        _add_run_figures(stats, config, teacher, elapsed)
        write_json(out_dir / "stats.json", stats)
        _warn_about_missing_rationales(stats)
        tracker.log_metrics(_stage_metrics(stats, elapsed))
        tracker.log_artifact(out_dir / "stats.json")
        tracker.log_artifact(out_dir / "rejected.jsonl")
        _check_success(config, out_dir, stats)
        state.finish(out_dir, fingerprint, outputs, stats, stage="synthesize")
    accepted, total = _accepted_of_total(stats)
    log.info(
        "synthesize: %d of %d records accepted (%.0f%%) in %.0f s -> %s",
        accepted, total, 100 * stats["success_ratio"], elapsed, out_dir,
    )
    return out_dir


def _answer_splits(config: DistillConfig, teacher_factory, out_dir: Path, counts: dict[str, int], resumed: bool,
                   teacher: Optional[Teacher]) -> Optional[Teacher]:
    """The teacher answers every record its split's journal does not hold yet; built only if there is such a record.

    Returns the teacher, closed (None if none was needed), whose name and counters go into the stats.
    """
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
            _answer_split(config, split, records, journal_path, done, teacher)
    finally:
        if teacher is not None:
            teacher.close()
    return teacher


def _answer_split(config: DistillConfig, split: str, records: int, journal_path: Path, done: Journal, teacher: Teacher) -> None:
    """One split's missing answers, each finished record appended to the journal: a concurrent teacher from its
    worker threads (through a thread-safe log), any other in batches."""
    numbered = enumerate(iter_records(getattr(config.data, split), config.task.type, config.data.max_records))
    with Progress(records - done.done, f"synthesize {split}", unit="records") as progress, AppendLog(journal_path) as append_log:
        context = Context(config, progress)
        if teacher.mode == "concurrent":
            safe = SafeLog(append_log)
            try:
                run_concurrent(numbered, done, safe, teacher, context)
            finally:
                safe.close()
        else:
            run_batches(numbered, done, append_log, teacher, context)


def _finish_splits(config: DistillConfig, out_dir: Path, counts: dict[str, int], logprobs: bool) -> dict:
    """Each split's final file from its journal, and `rejected.jsonl` for all of them; returns the stats per split."""
    stats: dict = {"splits": {}}
    with atomic_writer(out_dir / "rejected.jsonl") as rejected_out:
        for split, records in counts.items():
            journal_path = out_dir / f"{split}.journal.jsonl"
            stats["splits"][split] = finish_split(split, records, journal_path, out_dir, rejected_out, config, logprobs)
    return stats


def _accepted_of_total(stats: dict) -> tuple[int, int]:
    """How many records were accepted, and how many there were, over all splits."""
    return sum(s["accepted"] for s in stats["splits"].values()), sum(s["records"] for s in stats["splits"].values())


def _add_run_figures(stats: dict, config: DistillConfig, teacher: Optional[Teacher], elapsed: float) -> None:
    """The figures of the whole run: the teacher, the share accepted, the time, the endpoint's counters and the cost."""
    accepted, total = _accepted_of_total(stats)
    prompt_tokens = sum(s["prompt_tokens"] for s in stats["splits"].values())
    completion_tokens = sum(s["completion_tokens"] for s in stats["splits"].values())
    # No teacher when every record was answered already: the config names it.
    name = (teacher.name if teacher is not None else None) or config.teacher.deployment or config.teacher.model
    stats.update(
        teacher=config.teacher.model if config.teacher.kind == "local" else f"{config.teacher.kind}:{name}",
        success_ratio=accepted / total,
        seconds=round(elapsed, 2),
        completion_tokens_per_s=round(completion_tokens / elapsed, 2) if elapsed > 0 else None,
    )
    if teacher is not None and teacher.stats is not None:
        stats["endpoint"] = teacher.stats.as_dict()
    prices = (config.teacher.price_per_million_prompt_tokens, config.teacher.price_per_million_completion_tokens)
    if any(price is not None for price in prices):
        stats["cost"] = round(prompt_tokens * (prices[0] or 0) / 1e6 + completion_tokens * (prices[1] or 0) / 1e6, 6)


def _warn_about_missing_rationales(stats: dict) -> None:
    """Say how many accepted answers train without a rationale although synthesis.keep_rationale keeps one."""
    without_rationale = sum(s.get("trained_without_rationale", 0) for s in stats["splits"].values())
    if without_rationale:
        log.warning(
            "synthesize: %d accepted answers came with no reasoning trace, so synthesis.keep_rationale trains them on "
            "the answer alone (a model that does not reason, or one whose endpoint hides its reasoning, as Azure "
            "OpenAI's o-series do)", without_rationale,
        )


def _stage_metrics(stats: dict, elapsed: float) -> dict:
    """The stats as flat tracker metrics: per split, the endpoint's counters and the cost."""
    metrics = {"success_ratio": stats["success_ratio"], "seconds": elapsed}
    for split, split_stats in stats["splits"].items():
        for key in ("records", "accepted", "rejected", "prompt_tokens", "completion_tokens"):
            metrics[f"{split}_{key}"] = split_stats[key]
    if "endpoint" in stats:
        for key in ("requests", "retries", "throttled", "refused"):
            metrics[f"teacher_{key}"] = stats["endpoint"][key]
    if "cost" in stats:
        metrics["teacher_cost"] = stats["cost"]
    return metrics


def _check_success(config: DistillConfig, out_dir: Path, stats: dict) -> None:
    """Fail the stage when fewer answers passed the checks than synthesis.min_success_ratio, or no training answer did."""
    if stats["success_ratio"] < config.synthesis.min_success_ratio:
        accepted, total = _accepted_of_total(stats)
        top = max(
            ((reason, count) for s in stats["splits"].values() for reason, count in s["rejected_by_reason"].items()),
            key=lambda pair: pair[1],
            default=("", 0),
        )
        raise StageFailed(
            f"synthesize: only {accepted} of {total} teacher answers passed the checks "
            f"({stats['success_ratio']:.0%} < synthesis.min_success_ratio {config.synthesis.min_success_ratio:.0%}); "
            f"most common reason: {top[0]} ({top[1]}x); see {out_dir / 'rejected.jsonl'}"
        )
    if not stats["splits"]["train"]["accepted"]:
        raise StageFailed(
            f"synthesize: no teacher answer to a training prompt passed the checks; see {out_dir / 'rejected.jsonl'}"
        )
