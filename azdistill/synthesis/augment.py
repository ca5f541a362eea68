"""Prompt augmentation: the teacher writes new training prompts from the training prompts, and those that repeat a
prompt already kept or come too close to a test prompt are dropped (synthesis.augment).

Writing is exactly-once like answering: every training prompt's new prompts are one flushed line of
`augment.journal.jsonl` (the raw texts the teacher wrote), so a killed run asks only for the prompts of the examples
the journal lacks. Choosing which new prompts to keep is a pure function of that journal, the splits and the
settings, so a rerun chooses exactly what the first run chose without asking the teacher anything.

Near duplicates are found by the Jaccard similarity of shingle sets (Broder's resemblance, the measure MinHash
near-duplicate detection estimates), with character 5-grams of the lower-cased words as shingles. Prompts are a
sentence or a paragraph, and word trigrams are too coarse there: one word changed in an eight-word review removes
half its trigrams (Jaccard 0.43, kept at the default 0.6), while its character 5-gram Jaccard is 0.65 (dropped);
on the bundled sentiment sample no two of the 240 distinct training reviews come above 0.28, and a review reworded
with its words reordered lands at 0.53-0.59. The similarity is computed exactly through an inverted index
(augmentation is meant for small data, where MinHash's approximation would save nothing).
"""

from __future__ import annotations

import re
import threading
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

from azdistill.data.files import AppendLog, iter_jsonl
from azdistill.data.records import Record
from azdistill.models.generation import Completion
from azdistill.teachers.base import RecordRejected, Teacher

# Local teachers write at this temperature whatever synthesis.temperature is: greedy decoding (the demo's
# temperature 0) would write the same prompt for every variant, and all but one would be dropped as duplicates;
# well above 1 a small model drifts into incoherent text. Nucleus sampling cuts the unlikely tail.
WRITING_TEMPERATURE = 0.8
WRITING_TOP_P = 0.95
# A field label at the start of a line, as in "Review: ...", "Premise: ...\nHypothesis: ...".
FIELD = re.compile(r"^([A-Z][A-Za-z ]{0,24}):[ \t]*", re.MULTILINE)
# Lines a teacher adds after the input although asked not to: the answer, the label, an explanation.
TRAILER = re.compile(r"^\s*(answer|label|labels|sentiment|solution|summary|output|explanation|note|category)\s*:", re.I)
# What a teacher may put before the input: "New input 2:", "Variant 3 -", "Example:".
LEAD_IN = re.compile(r"^\s*(?:new\s+)?(?:input|example|prompt|variant)(?:\s*(?:number|no\.|#)?\s*\d+)?\s*[:.\-]\s*", re.I)
PREAMBLE = re.compile(r"^\s*(?:here(?:'s| is)|sure|certainly)\b[^\n]*:\s*\n", re.I)
QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u00ab": "\u00bb", "`": "`"}


# ---------------------------------------------------------------------------------------------------
# Asking the teacher


def writing_prompt(example: Record, variant: int) -> list[dict]:
    """What the teacher is asked for the `variant`-th new prompt from a training record: the record's system message
    says what the inputs are for, its user message is the example. The variant number makes the requests differ for
    a teacher that decodes greedily; a sampling teacher differs anyway."""
    system, user = example.messages[0]["content"], example.messages[1]["content"]
    fields = [name for name in FIELD.findall(user)]
    keep_format = f" Keep its format: the same labelled parts ({', '.join(name + ':' for name in fields)})." if fields else ""
    instruction = (
        "You write new inputs for a dataset. Each input is given to a model with this instruction:\n"
        f"{system}\n\n"
        f"Write one new input in the style of the example, on a different subject.{keep_format} Reply with the input "
        "only: no quotes, no answer, no label, no explanation."
    )
    return [{"role": "system", "content": instruction},
            {"role": "user", "content": f"Example input:\n{user}\n\nNew input number {variant}:"}]


@dataclass
class Written:
    """The new prompts written from one training record (its index in the train split), as the journal keeps them."""

    index: int
    texts: list  # the raw text of each variant; None where the teacher refused or was cut off
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def row(self) -> dict:
        return {"index": self.index, "texts": self.texts,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    def take(self, completion: Optional[Completion]) -> None:
        """Add one variant: a cut-off text is half a prompt, so it counts as none."""
        if completion is None:
            self.texts.append(None)
            return
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        self.texts.append(completion.text if completion.finish_reason != "length" else None)


def read_journal(path: Path) -> dict[int, dict]:
    """The finished rows of an augmentation journal by training record index (a torn last line is not finished)."""
    return {row["index"]: row for row in iter_jsonl(path)} if Path(path).exists() else {}


def write_new_prompts(examples: Iterable[tuple[int, Record]], per_example: int, teacher: Teacher, journal_path: Path,
                      seed: int) -> None:
    """The teacher writes `per_example` new prompts for every example the journal does not hold yet; each example's
    prompts are one journal line. A batched teacher gets whole examples per batch, a concurrent one an example per
    worker."""
    done = read_journal(journal_path)
    todo = [(index, record) for index, record in examples if index not in done]
    if not todo:
        return
    with AppendLog(journal_path) as journal:
        if teacher.mode == "concurrent":
            _write_concurrently(todo, per_example, teacher, journal)
        else:
            _write_in_batches(todo, per_example, teacher, journal, seed)


def _write_in_batches(todo: list, per_example: int, teacher: Teacher, journal: AppendLog, seed: int) -> None:
    """Whole examples per batch (at least one), so each example's line is written once its variants are back."""
    per_batch = max(1, teacher.batch_size // per_example)
    for start in range(0, len(todo), per_batch):
        chunk = todo[start:start + per_batch]
        conversations = [writing_prompt(record, variant) for _, record in chunk for variant in range(1, per_example + 1)]
        # Seeded per batch by its first example, so a resumed run writes what an uninterrupted one would have.
        completions = _sample(teacher, conversations, seed + chunk[0][0])
        if len(completions) != len(conversations):
            raise RuntimeError(f"teacher {teacher.name} returned {len(completions)} answers for {len(conversations)} prompts")
        for position, (index, _) in enumerate(chunk):
            written = Written(index, [])
            for completion in completions[position * per_example:(position + 1) * per_example]:
                written.take(completion)
            journal.append(written.row())


def _sample(teacher: Teacher, conversations: list, seed: int) -> list[Completion]:
    """A batched teacher's free answers; a local model samples at WRITING_TEMPERATURE from `seed` (its own
    synthesis.temperature is for answers), any other batched teacher answers as it always does."""
    from azdistill.teachers.local import LocalTeacher

    if not isinstance(teacher, LocalTeacher):
        return teacher.answer(conversations)
    import torch

    from azdistill.models.generation import generate_batch

    torch.manual_seed(seed)
    longest = max(len(conversation[-1]["content"]) for conversation in conversations)
    # Room for a new prompt twice as long as the example (about 4 characters a token), whatever the answers' limit.
    settings = replace(teacher.settings, temperature=WRITING_TEMPERATURE, top_p=WRITING_TOP_P,
                       max_new_tokens=min(1024, longest // 2 + 32))
    return generate_batch(teacher.model, teacher.tokenizer, conversations, settings)


def _write_concurrently(todo: list, per_example: int, teacher: Teacher, journal: AppendLog) -> None:
    """A hosted teacher: `concurrency` examples at once, each example's variants asked one after the other; the
    journal is written from this thread only, as examples finish."""
    stop = threading.Event()

    def write(index: int, record: Record) -> Written:
        written = Written(index, [])
        for variant in range(1, per_example + 1):
            try:
                written.take(teacher.complete(writing_prompt(record, variant), stop))
            except RecordRejected:  # refused (content filter) or given up on: no prompt from this variant
                written.take(None)
        return written

    with ThreadPoolExecutor(max_workers=teacher.concurrency, thread_name_prefix="augment") as pool:
        pending = {pool.submit(write, index, record) for index, record in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    journal.append(future.result().row())
        except BaseException:
            stop.set()  # requests not yet sent are not sent; the examples already written stay in the journal
            for future in pending:
                future.cancel()
            raise


# ---------------------------------------------------------------------------------------------------
# Cleaning what the teacher wrote


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] in QUOTES and text[-1] == QUOTES[text[0]]:
        return text[1:-1].strip()
    return text


def clean_prompt(text: Optional[str], example: str) -> Optional[str]:
    """The new prompt in the example's format, or None when the text is no usable prompt.

    Cut: a preamble ("Here is a new input:"), a lead-in ("New input 2:"), surrounding quotes, and the answer or
    label a teacher adds after the input. Format: the example's field labels ("Review: ", "Premise: ... Hypothesis: ")
    are kept or restored: a single-field example's label is put back where the teacher left it out (replacing any
    other label it used), a multi-field prompt must have all the example's fields in order, and a prompt whose
    example has no field loses a label the teacher invented.
    """
    if text is None:
        return None
    text = LEAD_IN.sub("", PREAMBLE.sub("", text.strip(), count=1), count=1)
    lines = _unquote(text).splitlines()
    cut = next((n for n, line in enumerate(lines) if n > 0 and TRAILER.match(line) and not _is_field(line, example)), len(lines))
    text = "\n".join(lines[:cut]).strip()
    fields = FIELD.findall(example)
    if len(fields) == 1 and example.startswith(f"{fields[0]}:"):
        own = re.match(rf"{re.escape(fields[0])}:\s*", text, re.I)  # the example's label, in any case
        body = text[own.end():] if own else FIELD.sub("", text, count=1)
        text = f"{fields[0]}: {_unquote(body)}" if _unquote(body) else ""
    elif len(fields) > 1:
        if FIELD.findall(text)[:len(fields)] != fields:
            return None
    elif FIELD.match(text):
        text = _unquote(FIELD.sub("", text, count=1))
    text = text.strip()
    return text if text and FIELD.sub("", text).strip() else None


def _is_field(line: str, example: str) -> bool:
    match = FIELD.match(line)
    return match is not None and match.group(1) in FIELD.findall(example)


# ---------------------------------------------------------------------------------------------------
# Choosing what to keep


def normalise(text: str) -> str:
    """What makes two prompts the same one: case and spacing do not count."""
    return " ".join(text.lower().split())


def shingles(text: str, width: int = 5) -> frozenset:
    """The character `width`-grams of a prompt's lower-cased words joined by single spaces (punctuation and the field
    labels every prompt of a split shares left out); a shorter prompt is one shingle."""
    words = " ".join(re.findall(r"\w+", FIELD.sub("", text).lower()))
    return frozenset(words[start:start + width] for start in range(max(1, len(words) - width + 1))) if words else frozenset()


class SimilarityIndex:
    """Prompts by their shingles, for the highest Jaccard similarity of a new prompt to any of them."""

    def __init__(self, texts: Iterable[str] = ()):
        self._sizes: list[int] = []
        self._postings: dict = defaultdict(list)
        self._exact: set[str] = set()
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        shingled = shingles(text)
        for shingle in shingled:
            self._postings[shingle].append(len(self._sizes))
        self._sizes.append(len(shingled))
        self._exact.add(normalise(text))

    def holds(self, text: str) -> bool:
        """Whether an exact duplicate (ignoring case and spacing) is in the index."""
        return normalise(text) in self._exact

    def most_similar(self, text: str) -> float:
        """The highest Jaccard similarity between the prompt's shingles and those of any prompt in the index."""
        shingled = shingles(text)
        shared = Counter(member for shingle in shingled for member in self._postings.get(shingle, ()))
        return max((count / (len(shingled) + self._sizes[member] - count) for member, count in shared.items()), default=0.0)


@dataclass
class Choice:
    """The new prompts kept, each with the input line of the training record it was written from, and the counts."""

    kept: list = field(default_factory=list)  # (user message, Record it was written from)
    asked: int = 0
    dropped: Counter = field(default_factory=Counter)


def choose_new_prompts(journal: dict[int, dict], examples: Sequence[Record], known: Iterable[str], test: Iterable[str],
                       max_similarity: float, perturbed: bool = False) -> Choice:
    """Keep each new prompt, in the order written, unless it is unusable, an exact or near duplicate of a known
    prompt (train, validation, a new one kept before it), or contaminated (an exact or near copy of a test prompt);
    near means a character 5-gram Jaccard similarity above `max_similarity`. Perturbed prompts (`perturbed`) are
    near copies of their example by design and already in its format: only exact duplicates and contamination drop
    them."""
    kept, held_out, choice = SimilarityIndex(known), SimilarityIndex(test), Choice()
    for index, example in enumerate(examples):
        texts = journal.get(index, {}).get("texts", [])
        for raw in texts:
            choice.asked += 1
            prompt = raw if perturbed else clean_prompt(raw, example.messages[1]["content"])
            if prompt is None:
                reason = "unusable"
            elif held_out.holds(prompt) or held_out.most_similar(prompt) > max_similarity:
                reason = "contaminated"
            elif kept.holds(prompt):
                reason = "duplicate"
            elif not perturbed and kept.most_similar(prompt) > max_similarity:
                reason = "similar"
            else:
                kept.add(prompt)
                choice.kept.append((prompt, example))
                continue
            choice.dropped[reason] += 1
    return choice


def user_text(record: Record) -> str:
    """A single-turn record's prompt as compared for duplicates: its user message."""
    return "\n".join(message["content"] for message in record.messages if message["role"] == "user")


def new_records(choice: Choice) -> list[dict]:
    """The lines of `augmented.jsonl`: the example's system message and the new user message, and the input line of
    the training record it was written from."""
    return [{"messages": [example.messages[0], {"role": "user", "content": prompt}], "augmented_from": example.line}
            for prompt, example in choice.kept]


def choice_stats(choice: Choice, journal: dict[int, dict], per_example: int) -> dict:
    """stats.json 'augmented': what was asked, kept and dropped (by reason), and what writing cost in tokens."""
    return {
        "per_prompt": per_example,
        "asked": choice.asked,
        "kept": len(choice.kept),
        **{f"dropped_{reason}": choice.dropped.get(reason, 0) for reason in ("duplicate", "similar", "contaminated", "unusable")},
        "prompt_tokens": sum(row.get("prompt_tokens", 0) for row in journal.values()),
        "completion_tokens": sum(row.get("completion_tokens", 0) for row in journal.values()),
    }
