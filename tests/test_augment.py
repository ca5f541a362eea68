"""Prompt augmentation (synthesis.augment): cleaning and near-duplicate measures with known answers, and the
synthesize stage on temporary JSONL with a scripted teacher that writes new prompts and answers them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import line_of

from azdistill.cli import cli
from azdistill.config.schema import DistillConfig
from azdistill.models.generation import Completion
from azdistill.stages.synthesize import synthesize
from azdistill.synthesis.augment import SimilarityIndex, clean_prompt, shingles
from azdistill.teachers.base import RecordRejected, Teacher

SYSTEM = "Classify the sentiment of the review. Answer with one word: positive or negative."
NLI = {"type": "nli", "labels": ["positive", "negative"]}
TEST_PROMPT = "Review: The desk lamp flickers every evening."

# What the teacher writes for each training prompt, variant by variant, and why each is kept or dropped.
WRITES = {
    "Review: good 1": [
        "review:   GOOD 1",  # an exact duplicate of a training prompt (case and spacing do not count)
        TEST_PROMPT,  # a copy of a test prompt: contaminated
        "Here is a new input:\n\"Good socks, warm and soft.\"",  # kept, as "Review: Good socks, warm and soft."
        "Review: My desk lamp flickers every evening!",  # a near copy of the test prompt (0.85): contaminated
    ],
    "Review: bad 2": [
        "Review: good socks - warm and soft",  # a near duplicate of the new prompt kept before it
        "",  # nothing usable
        "Bad kettle, it broke on day one.\nSentiment: negative",  # kept, as "Review: Bad kettle, it broke on day one."
        "Review: unsure about this chair",  # kept; answered like any other prompt
    ],
}


class WritingTeacher(Teacher):
    """A batched teacher that writes new prompts from WRITES (free generation) and answers label tasks by
    `choose` (the label constraint), or freely by `answer` when the constraint is off; it counts every call."""

    name = "scripted"

    def __init__(self, batch_size: int = 4, interrupt_answers: bool = False, interrupt_writing_after: int | None = None):
        self.batch_size = batch_size
        self.interrupt_answers, self.interrupt_writing_after = interrupt_answers, interrupt_writing_after
        self.written: list[str] = []  # the example of every writing request
        self.answered: list[str] = []  # the user message of every prompt answered (by answer or choose)
        self.chose = 0

    def answer(self, conversations):
        if "You write new inputs" in conversations[0][0]["content"]:
            return [self._write(conversation) for conversation in conversations]
        return [_free_answer(self._answering(conversation)) for conversation in conversations]

    def choose(self, conversations, labels):
        self.chose += 1
        answers = []
        for conversation in conversations:
            label = "positive" if "good" in self._answering(conversation).lower() else "negative"
            answers.append(Completion(label, "stop", 10, 1, label_probs={name: 0.9 if name == label else 0.1 for name in labels}))
        return answers

    def _write(self, conversation) -> Completion:
        if self.interrupt_writing_after is not None and len(self.written) >= self.interrupt_writing_after:
            raise KeyboardInterrupt  # Ctrl-C while the teacher writes prompts
        example = conversation[-1]["content"].split("Example input:\n")[1].split("\n\n")[0]
        variant = int(conversation[-1]["content"].rsplit("number ", 1)[1].rstrip(":"))
        self.written.append(example)
        return Completion(WRITES[example][variant - 1], "stop", 20, 8)

    def _answering(self, conversation) -> str:
        if self.interrupt_answers:
            raise KeyboardInterrupt  # killed after augmented.jsonl is written, before any answer
        self.answered.append(conversation[-1]["content"])
        return conversation[-1]["content"]


def _free_answer(prompt: str) -> Completion:
    if "unsure" in prompt:
        return Completion("It could be positive or negative.", "stop", 10, 6)
    return Completion("positive" if "good" in prompt.lower() else "negative", "stop", 10, 1)


def record(user: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}


def make_config(tmp_path: Path, **synthesis) -> DistillConfig:
    splits = {"train": ["Review: good 1", "Review: bad 2"], "validation": ["Review: good v"], "test": [TEST_PROMPT]}
    for split, users in splits.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(record(user)) + "\n" for user in users))
    return DistillConfig.model_validate({
        "name": "t", "workdir": str(tmp_path / "work"), "task": NLI,
        "data": {split: str(tmp_path / f"{split}.jsonl") for split in splits},
        "synthesis": {"min_success_ratio": 0.0, "augment": 4, **synthesis},
        "tracking": {"enabled": False},
    })


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


KEPT = ["Review: Good socks, warm and soft.", "Review: Bad kettle, it broke on day one.", "Review: unsure about this chair"]


# ---------------------------------------------------------------------------------------------------
# Pure parts


@pytest.mark.parametrize("written, example, expected", [
    ('"Warm socks."', "Review: Holes in socks.", "Review: Warm socks."),
    ("Review: 'Warm socks.'\nSentiment: positive", "Review: Holes in socks.", "Review: Warm socks."),
    ("Sure, here is one:\nProduct review: Warm socks.", "Review: Holes in socks.", "Review: Warm socks."),
    ("New input 2: Premise: A dog runs.\nHypothesis: An animal moves.\nLabel: entailment",
     "Premise: A girl laughs.\nHypothesis: She is sad.", "Premise: A dog runs.\nHypothesis: An animal moves."),
    ("Premise: A dog runs.", "Premise: A girl laughs.\nHypothesis: She is sad.", None),  # a field missing
    ("Problem: 12 rolls on 3 plates. How many on each?\nAnswer: 4", "18 muffins on 2 plates. How many?",
     "12 rolls on 3 plates. How many on each?"),
    ("Review:", "Review: Holes in socks.", None),
    (None, "Review: Holes in socks.", None),  # refused or cut off
])
def test_a_written_prompt_is_cleaned_into_the_examples_format(written, example, expected):
    assert clean_prompt(written, example) == expected


def test_similarity_is_the_jaccard_index_of_character_5_grams():
    assert shingles("abcdef") == {"abcde", "bcdef"}
    assert shingles("Review: ABC, d!") == {"abc d"}  # field label, case and punctuation left out
    index = SimilarityIndex(["abcdef", "xyz uvw"])
    assert index.most_similar("abcdeg") == pytest.approx(1 / 3)  # {abcde} shared of {abcde, bcdef, bcdeg}
    assert index.most_similar("Abcdef!") == 1.0 and index.most_similar("nothing alike") == 0.0
    assert index.holds("XYZ   uvw") and not index.holds("xyz uvw.")


# ---------------------------------------------------------------------------------------------------
# The stage


def test_new_prompts_are_deduplicated_decontaminated_and_answered_after_the_originals(tmp_path):
    config = make_config(tmp_path)
    teacher = WritingTeacher()
    out = synthesize(config, lambda: teacher)

    assert teacher.written == ["Review: good 1"] * 4 + ["Review: bad 2"] * 4
    assert teacher.chose and "Review: unsure about this chair" in teacher.answered  # the label constraint, as for train
    augmented = read(out / "augmented.jsonl")
    assert [row["messages"][1]["content"] for row in augmented] == KEPT
    assert [row["augmented_from"] for row in augmented] == [1, 2, 2]
    assert all(row["messages"][0] == {"role": "system", "content": SYSTEM} for row in augmented)

    train = read(out / "train.jsonl")
    assert [row["messages"][1]["content"] for row in train] == ["Review: good 1", "Review: bad 2", *KEPT]
    assert [row["messages"][2]["content"] for row in train] == ["positive", "negative", "positive", "negative", "negative"]
    sidecar = read(out / "train.logprobs.jsonl")
    assert [row["row"] for row in sidecar] == [0, 1, 2, 3, 4] and sidecar[2]["turns"][0]["content"][0]["token"] == "positive"
    assert TEST_PROMPT not in (out / "train.jsonl").read_text() and TEST_PROMPT not in (out / "validation.jsonl").read_text()

    stats = json.loads((out / "stats.json").read_text())
    assert stats["augmented"] == {
        "per_prompt": 4, "asked": 8, "kept": 3, "dropped_duplicate": 1, "dropped_similar": 1, "dropped_contaminated": 2,
        "dropped_unusable": 1, "prompt_tokens": 160, "completion_tokens": 64, "accepted": 3,
    }
    assert stats["splits"]["train"]["records"] == 5 and stats["splits"]["train"]["accepted"] == 5


def test_a_rejected_answer_to_a_new_prompt_is_in_the_ledger_under_augmented(tmp_path):
    config = make_config(tmp_path, label_constraint="off")
    out = synthesize(config, lambda: WritingTeacher())
    rejected = read(out / "rejected.jsonl")
    assert [(row["split"], row["line"], row["messages"][1]["content"]) for row in rejected] == [
        ("augmented", 3, "Review: unsure about this chair")
    ]
    assert json.loads((out / "stats.json").read_text())["augmented"]["accepted"] == 2


def test_a_rerun_asks_nothing_and_changed_augment_settings_redo_the_prompts(tmp_path):
    config = make_config(tmp_path)
    synthesize(config, lambda: WritingTeacher())

    def must_not_build():
        raise AssertionError("the teacher was built although nothing changed")

    synthesize(config, must_not_build)
    fewer = config.model_copy(update={"synthesis": config.synthesis.model_copy(update={"augment": 2})})
    again = WritingTeacher()
    out = synthesize(fewer, lambda: again)
    assert len(again.written) == 4  # the fingerprint holds the augment settings
    # Variants 1 and 2 only: the near duplicate is kept now, as no prompt like it was kept before it.
    assert [row["messages"][1]["content"] for row in read(out / "augmented.jsonl")] == ["Review: good socks - warm and soft"]

    (tmp_path / "test.jsonl").write_text(json.dumps(record("Review: Good socks, warm and soft.")) + "\n")
    other = WritingTeacher()
    out = synthesize(fewer, lambda: other)
    assert len(other.written) == 4  # another test split: the prompts are decontaminated against it afresh
    assert [row["messages"][1]["content"] for row in read(out / "augmented.jsonl")] == [TEST_PROMPT]  # no test prompt now
    assert json.loads((out / "stats.json").read_text())["augmented"]["dropped_contaminated"] == 1


def test_a_run_killed_after_the_prompts_were_written_answers_them_without_writing_again(tmp_path):
    config = make_config(tmp_path)
    first = WritingTeacher(interrupt_answers=True)
    with pytest.raises(KeyboardInterrupt):
        synthesize(config, lambda: first)
    out = config.stage_dir("synthesize")
    written = (out / "augmented.jsonl").read_text()
    assert len(first.written) == 8 and not (out / "train.jsonl").exists()

    second = WritingTeacher()
    synthesize(config, lambda: second)
    assert second.written == [] and (out / "augmented.jsonl").read_text() == written
    assert [row["messages"][1]["content"] for row in read(out / "train.jsonl")][2:] == KEPT


def test_a_run_killed_while_writing_asks_only_for_the_examples_not_yet_written(tmp_path):
    config = make_config(tmp_path, batch_size=4)  # one example (its 4 variants) per batch
    with pytest.raises(KeyboardInterrupt):
        synthesize(config, lambda: WritingTeacher(batch_size=4, interrupt_writing_after=4))
    second = WritingTeacher(batch_size=4)
    out = synthesize(config, lambda: second)
    assert second.written == ["Review: bad 2"] * 4
    assert [row["messages"][1]["content"] for row in read(out / "augmented.jsonl")] == KEPT


class ConcurrentWriter(WritingTeacher):
    """The same scripted teacher asked one conversation at a time from worker threads, as a hosted one is; the
    endpoint refuses to write from the example "Review: bad 2" (a content filter)."""

    mode, concurrency, timeout_s = "concurrent", 2, 1.0

    def complete(self, messages, stop=None):
        if "You write new inputs" in messages[0]["content"] and "Example input:\nReview: bad 2" in messages[-1]["content"]:
            raise RecordRejected("content filter")
        return self.answer([messages])[0]


def test_a_concurrent_teacher_writes_from_worker_threads_and_a_refusal_counts_as_unusable(tmp_path):
    config = make_config(tmp_path, label_constraint="off")
    out = synthesize(config, lambda: ConcurrentWriter())
    assert [row["messages"][1]["content"] for row in read(out / "augmented.jsonl")] == ["Review: Good socks, warm and soft."]
    stats = json.loads((out / "stats.json").read_text())["augmented"]
    assert (stats["asked"], stats["kept"], stats["dropped_unusable"], stats["accepted"]) == (8, 1, 4, 1)


# ---------------------------------------------------------------------------------------------------
# validate


@pytest.mark.parametrize("task", ["conversation", "chat"])
def test_validate_refuses_augment_on_a_task_with_conversations(make_config, task):
    config = make_config(task, extra="synthesis:\n  augment: 2\n")
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines() == [
        f"error: {config}:{line_of(config, 'augment:')}: synthesis.augment: the teacher writes new single-turn prompts "
        f"(nli, qa, math, summarization), and task.type {task} has conversations: set it to 0"
    ]
