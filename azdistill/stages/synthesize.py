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

Augmentation (synthesis.augment > 0) comes first: the teacher writes new prompts from the training prompts
(`synthesis.augment`, its own journal), the kept ones go to `augmented.jsonl`, and they are answered as more records of
the train split, after the original ones (the same journal, checks and label constraint), so `train.jsonl` holds the
original records first and the new ones after them. A rerun reads the augmentation journal and asks for no prompt twice.
With synthesis.augment_method perturb the new prompts are perturbed copies of the training prompts instead
(synthesis/perturb.py), made from the data and the seed alone, so there is no writing and no journal for them.

With synthesis.mode batch the records go to the provider's Batch API instead of one request each (synthesis/batch.py):
the same request bodies, checks, journals and final files, about half the price, answers within 24 h.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator, Optional

from azdistill.config.schema import DistillConfig, label_method
from azdistill.console import Progress
from azdistill.data import digests
from azdistill.data.files import AppendLog, atomic_writer, iter_jsonl, write_json, write_jsonl
from azdistill.data.records import Record, check_prompt_length, count_records, iter_records
from azdistill.errors import StageFailed
from azdistill.stages import state
from azdistill.synthesis import augment, perturb
from azdistill.synthesis.answering import Context, Stream, run_batches, run_concurrent
from azdistill.synthesis.journal import Journal, SafeLog
from azdistill.synthesis.outputs import SPLITS, finish_split
from azdistill.synthesis.prompts import check_rationale, check_strategy
from azdistill.teachers.base import Teacher
from azdistill.tracking.tracker import NullTracker

log = logging.getLogger(__name__)


OUTPUTS = ["train.jsonl", "validation.jsonl", "rejected.jsonl", "stats.json"]
# Everything the stage writes into its folder: what a rerun under other inputs or settings removes (nothing else).
OWNED = [*OUTPUTS, "augmented.jsonl", "*.journal.jsonl", "*.logprobs.jsonl", "batch.json", "batch.*.jsonl", ".batch.*"]
AUGMENT_JOURNAL = "augment.journal.jsonl"


def stage_fingerprint(config: DistillConfig, teacher_identity: Optional[str]) -> str:
    """Everything the answers depend on; operational settings (rate limits, retries, prices, budget) are not."""
    teacher = config.teacher.model_dump(
        exclude={"auth", "timeout_s", "max_concurrency", "requests_per_minute", "tokens_per_minute", "max_retries",
                 "backoff_s", "max_backoff_s", "price_per_million_prompt_tokens", "price_per_million_completion_tokens",
                 "local_copy", "parameters", "batch_price_ratio"}
    )
    if config.teacher.kind == "local":  # the fingerprint of earlier local runs stays valid
        teacher = {"kind": "local", "model": config.teacher.model}
    for name, default in (("max_tokens_field", "max_tokens"), ("reasoning_effort", None), ("sampling_parameters", True)):
        if teacher.get(name, default) == default:
            teacher.pop(name, None)  # request settings left at their default do not change earlier fingerprints
    # How the answers are asked (online or through a provider's Batch API) does not change them.
    synthesis = config.synthesis.model_dump(
        exclude={"min_success_ratio", "max_cost", "preflight", "mode", "batch_poll_s", "batch_retries"}
    )
    for name, default in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("prompt_strategy", "plain"), ("keep_rationale", False),
                          ("density_iterations", 4), ("max_summary_words", 80), ("top_logprobs", 0), ("reject_duplicates", True),
                          ("self_consistency", 1)):
        if synthesis.get(name) == default:
            synthesis.pop(name)  # settings left at their default do not change earlier fingerprints
    # What the constraint resolves to: none leaves the answers (and earlier fingerprints) as they were.
    synthesis.pop("label_constraint")
    if label_method(config) is not None:
        synthesis["label_constraint"] = label_method(config)
    inputs = {split: digests.file_digest(getattr(config.data, split)) for split in SPLITS}
    if config.synthesis.augment:
        inputs["test"] = digests.file_digest(config.data.test)  # the new prompts are decontaminated against it
    else:  # no augmentation: earlier fingerprints stay valid
        synthesis.pop("augment")
        synthesis.pop("augment_max_similarity")
    if synthesis.get("augment_method") in ("write", None) or "augment" not in synthesis:
        synthesis.pop("augment_method", None)  # the default, or no augmentation: earlier fingerprints stay valid
    return digests.fingerprint(
        {
            "inputs": inputs,
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
            if config.synthesis.mode == "batch":
                from azdistill.synthesis.batch import cancel_open

                cancel_open(out_dir, teacher, config)
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
    batch = config.synthesis.mode == "batch"
    if batch:
        from azdistill.synthesis.batch import batch_budget, client_for

        # A Global Batch deployment answers no online request, so there is no sample call: one call to the Batch API checks
        # the credential and the URL instead, and the spend and estimate are at batch prices.
        client_for(config, teacher).check()
        teacher.budget = batch_budget(config)
    spent = {} if fresh else {split: Journal.scan(out_dir / f"{split}.journal.jsonl", counts[split]) for split in SPLITS}
    writing = {} if fresh else augment.read_journal(out_dir / AUGMENT_JOURNAL)  # new prompts written are paid for too
    teacher.budget.spent = teacher.budget.cost(
        sum(j.prompt_tokens for j in spent.values()) + sum(row.get("prompt_tokens", 0) for row in writing.values()),
        sum(j.completion_tokens for j in spent.values()) + sum(row.get("completion_tokens", 0) for row in writing.values()),
    )
    if not config.synthesis.preflight:
        return teacher
    from azdistill.synthesis.preflight import preflight

    done = sum(j.done + len(j.partials) for j in spent.values())
    report = preflight(config, teacher, counts, done=done, sample=done == 0 and not batch)
    for line in report.lines:
        if batch and line.startswith("sample call:"):
            line = ("sample call: none (synthesis.mode batch: a batch deployment answers no online request; the Batch API "
                    "answered)")
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

    def request_out_since(self, thread: int) -> Optional[float]:
        return self._teacher.request_out_since(thread)

    def median_request_s(self) -> Optional[float]:
        return self._teacher.median_request_s()

    def complete(self, messages, stop: Optional[threading.Event] = None):
        with self._lock:
            completion, matches = self._completion, self._completion is not None and list(messages) == self._prompt
            if matches:
                self._completion = None
        return completion if matches else self._teacher.complete(messages, stop)

    def choose_one(self, messages, labels, stop: Optional[threading.Event] = None):
        # The preflight's sample call was constrained the same way (synthesis.label_constraint), so it is this answer.
        with self._lock:
            completion, matches = self._completion, self._completion is not None and list(messages) == self._prompt
            if matches:
                self._completion = None
        return completion if matches else self._teacher.choose_one(messages, labels, stop)


def _synthesize(config: DistillConfig, teacher_factory, tracker: NullTracker, out_dir: Path, fingerprint: str,
                counts: dict[str, int], resumed: bool, teacher: Optional[Teacher]) -> Path:
    """Answer what the journals do not hold yet, write the final files and figures, and judge the share accepted."""
    started = time.monotonic()
    # The sidecar holds a hosted teacher's top log-probabilities, or the label distribution of a constrained label.
    logprobs = (config.teacher.hosted and config.synthesis.top_logprobs > 0) or label_method(config) is not None
    outputs = OUTPUTS + ([f"{split}.logprobs.jsonl" for split in SPLITS] if logprobs else [])
    outputs += ["augmented.jsonl"] if config.synthesis.augment else []
    with tracker.stage("synthesize"):
        teacher, augmented = _augment_train(config, teacher_factory, out_dir, counts, teacher)
        # The new prompts are more records of the train split, after the original ones.
        totals = {**counts, "train": counts["train"] + (augmented["kept"] if augmented else 0)}
        if config.synthesis.mode == "batch":
            teacher = _answer_splits_by_batch(config, teacher_factory, out_dir, totals, teacher)
        else:
            teacher = _answer_splits(config, teacher_factory, out_dir, totals, resumed, teacher)
        stats = _finish_splits(config, out_dir, totals, logprobs, counts["train"] if augmented else None)
        if augmented:
            stats["augmented"] = {**augmented, "accepted": stats["splits"]["train"].pop("augmented_accepted")}
        elapsed = time.monotonic() - started
        _add_run_figures(stats, config, teacher, elapsed, out_dir)
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


def _augment_train(config: DistillConfig, teacher_factory, out_dir: Path, counts: dict[str, int],
                   teacher: Optional[Teacher]) -> tuple[Optional[Teacher], Optional[dict]]:
    """synthesis.augment: the teacher writes new prompts for the training records its journal lacks, and the kept
    ones are written to `augmented.jsonl`; returns the teacher (built only if it had prompts to write) and the
    augmentation's stats, None when synthesis.augment is 0.

    Which prompts are kept is decided from the journal every time (no teacher needed), so a rerun writes the same file.
    """
    if not config.synthesis.augment:
        return teacher, None
    journal_path = out_dir / AUGMENT_JOURNAL
    examples = list(iter_records(config.data.train, config.task.type, config.data.max_records))
    # A prompt past data.max_prompt_chars is rejected unasked, so it is no example either.
    usable = [(index, record) for index, record in enumerate(examples)
              if check_prompt_length(record.messages, config.data.max_prompt_chars) is None]
    if config.synthesis.augment_method == "perturb":  # made here, a pure function of the data: nothing to journal
        made = perturb.perturbed_prompts([record for _, record in usable], config.synthesis.augment, config.synthesis.seed)
        journal = {index: {**made[position], "index": index} for position, (index, _) in enumerate(usable)}
        log.info("synthesize: %d perturbed copies of each of %d training prompts", config.synthesis.augment, len(usable))
    else:
        journal = augment.read_journal(journal_path)
    built = None
    try:
        if config.synthesis.augment_method == "write" and any(index not in journal for index, _ in usable):
            if teacher is None:
                teacher = built = _ready_teacher(teacher_factory, config, out_dir, counts)
            log.info("synthesize: the teacher writes %d new prompts for each of %d training prompts",
                     config.synthesis.augment, sum(index not in journal for index, _ in usable))
            augment.write_new_prompts(usable, config.synthesis.augment, teacher, journal_path, config.synthesis.seed)
            journal = augment.read_journal(journal_path)
    except BaseException:
        if built is not None:
            built.close()
        raise
    # Every prompt already in training (train and validation) and every held-out one, as the new ones are compared.
    known = [augment.user_text(record) for split in SPLITS
             for record in iter_records(getattr(config.data, split), config.task.type, config.data.max_records)]
    test = [augment.user_text(record) for record in iter_records(config.data.test, config.task.type)]
    choice = augment.choose_new_prompts(journal, examples, known, test, config.synthesis.augment_max_similarity,
                                        perturbed=config.synthesis.augment_method == "perturb")
    write_jsonl(out_dir / "augmented.jsonl", augment.new_records(choice))
    stats = augment.choice_stats(choice, journal, config.synthesis.augment)
    log.info("synthesize: %d of %d new prompts kept (%d duplicates, %d near duplicates, %d too close to a test prompt, "
             "%d unusable)", stats["kept"], stats["asked"], stats["dropped_duplicate"], stats["dropped_similar"],
             stats["dropped_contaminated"], stats["dropped_unusable"])
    return teacher, stats


def _split_records(config: DistillConfig, split: str, out_dir: Path) -> Iterator[Record]:
    """The records of a split as the teacher answers them: the train split's new prompts (augmented.jsonl) follow its
    original records, numbered by their line in that file."""
    records = iter_records(getattr(config.data, split), config.task.type, config.data.max_records)
    if split != "train" or not config.synthesis.augment:
        return records
    written = (Record(messages=row["messages"], line=line, extra={"augmented_from": row["augmented_from"]})
               for line, row in enumerate(iter_jsonl(out_dir / "augmented.jsonl"), start=1))
    return itertools.chain(records, written)


def _answer_splits(config: DistillConfig, teacher_factory, out_dir: Path, counts: dict[str, int], resumed: bool,
                   teacher: Optional[Teacher]) -> Optional[Teacher]:
    """The teacher answers every record its split's journal does not hold yet; built only if there is such a record.

    Returns the teacher, closed (None if none was needed), whose name and counters go into the stats.
    """
    try:
        missing: dict[str, Journal] = {}
        for split, records in counts.items():
            done = Journal.scan(out_dir / f"{split}.journal.jsonl", records, retry_failed=True)
            if resumed and (done.done or done.partials):
                log.info("synthesize %s: continuing, %d of %d records already answered", split, done.done, records)
            if done.done < records:
                missing[split] = done
        if missing:
            teacher = teacher or _ready_teacher(teacher_factory, config, out_dir, counts)
            if teacher.mode == "concurrent":
                _answer_splits_concurrently(config, missing, counts, teacher, out_dir)
            else:
                for split, done in missing.items():
                    _answer_split(config, split, counts[split], done, teacher, out_dir)
    finally:
        if teacher is not None:
            teacher.close()
    return teacher


def _answer_splits_by_batch(config: DistillConfig, teacher_factory, out_dir: Path, counts: dict[str, int],
                            teacher: Optional[Teacher]) -> Optional[Teacher]:
    """synthesis.mode batch: what the journals lack is asked through the provider's Batch API (synthesis/batch.py); the
    teacher is built only if there is such a record or a batch to wait for. Returns it, closed (None if none was needed)."""
    from azdistill.synthesis import batch

    def ready() -> Teacher:
        nonlocal teacher
        if teacher is None:
            teacher = _ready_teacher(teacher_factory, config, out_dir, counts)
        return teacher

    try:
        batch.answer_splits(config, out_dir, counts, lambda split: _split_records(config, split, out_dir), ready)
    finally:
        if teacher is not None:
            teacher.close()
    return teacher


def _answer_split(config: DistillConfig, split: str, records: int, done: Journal, teacher: Teacher, out_dir: Path) -> None:
    """One split's missing answers from a batched (local) teacher, each finished record appended to the journal."""
    numbered = enumerate(_split_records(config, split, out_dir))
    with Progress(records - done.done, f"synthesize {split}", unit="records") as progress, \
            AppendLog(out_dir / f"{split}.journal.jsonl") as append_log:
        run_batches(numbered, done, append_log, teacher, Context(config, progress))


def _answer_splits_concurrently(config: DistillConfig, missing: dict[str, Journal], counts: dict[str, int], teacher: Teacher,
                                out_dir: Path) -> None:
    """The splits' missing answers from a concurrent (hosted) teacher, through one pool of workers: the next split's
    records go out while the last answers of the one before are on their way (a wait between splits would leave
    the endpoint's limit unused for as long as its slowest record takes). Each split's answers go to its own
    journal, through a thread-safe log."""
    remaining = sum(counts[split] - done.done for split, done in missing.items())
    with ExitStack() as stack:
        progress = stack.enter_context(Progress(remaining, f"synthesize {'+'.join(missing)}", unit="records"))
        context = Context(config, progress)
        streams = []
        for split, done in missing.items():
            safe = SafeLog(stack.enter_context(AppendLog(out_dir / f"{split}.journal.jsonl")))
            stack.callback(safe.close)
            streams.append(Stream(enumerate(_split_records(config, split, out_dir)), done, safe, context))
        run_concurrent(streams, teacher)


def _finish_splits(config: DistillConfig, out_dir: Path, counts: dict[str, int], logprobs: bool,
                   first_augmented: Optional[int]) -> dict:
    """Each split's final file from its journal, and `rejected.jsonl` for all of them; returns the stats per split.
    The train split's records from `first_augmented` on are the new prompts of synthesis.augment."""
    stats: dict = {"splits": {}}
    with atomic_writer(out_dir / "rejected.jsonl") as rejected_out:
        for split, records in counts.items():
            journal_path = out_dir / f"{split}.journal.jsonl"
            stats["splits"][split] = finish_split(split, records, journal_path, out_dir, rejected_out, config, logprobs,
                                                  first_augmented if split == "train" else None)
    return stats


def _accepted_of_total(stats: dict) -> tuple[int, int]:
    """How many records were accepted, and how many there were, over all splits."""
    return sum(s["accepted"] for s in stats["splits"].values()), sum(s["records"] for s in stats["splits"].values())


def _add_run_figures(stats: dict, config: DistillConfig, teacher: Optional[Teacher], elapsed: float, out_dir: Path) -> None:
    """The figures of the whole run: the teacher, the share accepted, the time, the endpoint's counters and the cost."""
    accepted, total = _accepted_of_total(stats)
    # Writing new prompts (synthesis.augment) is paid for like answering.
    writing = stats.get("augmented", {})
    prompt_tokens = sum(s["prompt_tokens"] for s in stats["splits"].values()) + writing.get("prompt_tokens", 0)
    completion_tokens = sum(s["completion_tokens"] for s in stats["splits"].values()) + writing.get("completion_tokens", 0)
    # No teacher when every record was answered already: the config names it.
    name = (teacher.name if teacher is not None else None) or config.teacher.deployment or config.teacher.model
    stats.update(
        teacher=config.teacher.model if config.teacher.kind == "local" else f"{config.teacher.kind}:{name}",
        success_ratio=accepted / total,
        seconds=round(elapsed, 2),
        completion_tokens_per_s=round(completion_tokens / elapsed, 2) if elapsed > 0 else None,
    )
    stats["mode"] = config.synthesis.mode
    if config.synthesis.mode == "batch":
        from azdistill.synthesis.batch import summary

        stats["batch"] = summary(out_dir)  # the provider's ids and counts; the online client's counters stay at 0
    elif teacher is not None and teacher.stats is not None:
        stats["endpoint"] = teacher.stats.as_dict()
        # The endpoint bills both copies of a hedged record: the second answer is dropped, but it costs.
        prompt_tokens += stats["endpoint"]["hedge_prompt_tokens"]
        completion_tokens += stats["endpoint"]["hedge_completion_tokens"]
    prices = (config.teacher.price_per_million_prompt_tokens, config.teacher.price_per_million_completion_tokens)
    if any(price is not None for price in prices):
        cost = prompt_tokens * (prices[0] or 0) / 1e6 + completion_tokens * (prices[1] or 0) / 1e6
        # Batch requests are billed at teacher.batch_price_ratio of the online prices.
        stats["cost"] = round(cost * (config.teacher.batch_price_ratio if config.synthesis.mode == "batch" else 1.0), 6)


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
    for key in ("asked", "kept", "accepted"):
        if "augmented" in stats:
            metrics[f"augmented_{key}"] = stats["augmented"][key]
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
