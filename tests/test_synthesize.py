"""The synthesize stage on temporary JSONL with a scripted fake teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from azdistill.config.schema import DistillConfig
from azdistill.errors import StageFailed
from azdistill.models.generation import Completion
from azdistill.stages.synthesize import synthesize
from azdistill.synthesis.checks import check_completion, check_target
from azdistill.teachers.base import Teacher

SYSTEM = "Classify the sentiment. Answer positive or negative."


class ScriptedTeacher(Teacher):
    """Answers from a function of the conversation; records every batch it was sent."""

    name = "scripted"

    def __init__(self, reply, batch_size: int = 3, fail_after_batches: int | None = None):
        self.reply, self.batch_size = reply, batch_size
        self.fail_after_batches = fail_after_batches
        self.batches: list[list[list[dict]]] = []

    def answer(self, conversations):
        if self.fail_after_batches is not None and len(self.batches) >= self.fail_after_batches:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a run
        self.batches.append([list(conversation) for conversation in conversations])
        return [self.reply(conversation) for conversation in conversations]


def stop(text: str) -> Completion:
    return Completion(text=text, finish_reason="stop", prompt_tokens=10, completion_tokens=len(text.split()))


def write_split(path: Path, rows: list[list[dict]]) -> None:
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in rows))


def single(review: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Review: {review}"}]


def make_config(tmp_path: Path, task: dict, train: list, validation: list, **synthesis) -> DistillConfig:
    write_split(tmp_path / "train.jsonl", train)
    write_split(tmp_path / "validation.jsonl", validation)
    write_split(tmp_path / "test.jsonl", validation)
    return DistillConfig.model_validate(
        {
            "name": "t",
            "workdir": str(tmp_path / "work"),
            "task": task,
            "data": {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "validation", "test")},
            # These tests are about free answers and their checks; tests of answers constrained to the labels say so.
            "synthesis": {"min_success_ratio": 0.0, "label_constraint": "off", **synthesis},
            "tracking": {"enabled": False},
        }
    )


def sentiment_reply(conversation):
    text = conversation[-1]["content"]
    if "empty" in text:
        return stop("")
    if "long" in text:
        return Completion("The review is positive and", "length", 10, 5)
    if "unsure" in text:
        return stop("It could be positive or negative.")
    return stop("The review is positive." if "good" in text else "Negative.")


NLI = {"type": "nli", "labels": ["positive", "negative"]}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_answer_checks_name_each_reason():
    assert check_completion(stop("Positive!")) is None and check_target("Positive!", "nli", ["positive", "negative"]) is None
    assert check_completion(stop("  ")) == "empty answer"
    assert "cut off" in check_completion(Completion("The", "length", 1, 1))
    assert check_completion(stop("positive or negative")) is None
    assert "labels" in check_target("positive or negative", "nli", ["positive", "negative"])
    assert check_completion(stop("no idea")) is None and check_target("no idea", "math", None) == "answer has no number"
    worked = "so 3 + 4 = 7. Answer: 7"
    assert check_completion(stop(worked)) is None and check_target(worked, "math", None) is None


def test_outputs_follow_input_order_and_rejects_carry_reasons(tmp_path):
    train = [single(text) for text in ["good 1", "bad 2", "empty 3", "good 4", "long 5", "unsure 6", "bad 7"]]
    config = make_config(tmp_path, NLI, train, [single("good v")])
    teacher = ScriptedTeacher(sentiment_reply, batch_size=3)
    out = synthesize(config, lambda: teacher)

    rows = read(out / "train.jsonl")
    assert [row["messages"][1]["content"] for row in rows] == ["Review: good 1", "Review: bad 2", "Review: good 4", "Review: bad 7"]
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "The review is positive."}
    rejected = read(out / "rejected.jsonl")
    assert [(row["line"], row["reason"].split(" (")[0]) for row in rejected] == [
        (3, "empty answer"),
        (5, "answer cut off"),
        (6, "answer names none or several of the labels ['positive', 'negative']"),
    ]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["accepted"] == 4 and stats["splits"]["train"]["rejected"] == 3
    assert stats["splits"]["validation"] == {
        **stats["splits"]["validation"], "records": 1, "accepted": 1, "rejected": 0,
    }
    assert [len(batch) for batch in teacher.batches] == [3, 3, 1, 1]


class ChoosingTeacher(ScriptedTeacher):
    """A teacher constrained to the labels: scripted label distributions; `answer` (free) must not be called."""

    def answer(self, conversations):
        raise AssertionError("a constrained teacher is not asked for free answers")

    def choose(self, conversations, labels):
        self.batches.append([list(conversation) for conversation in conversations])
        completions = []
        for conversation in conversations:
            p = 0.8 if "good" in conversation[-1]["content"] else 0.3
            probs = dict(zip(labels, (p, round(1 - p, 6))))
            label = max(probs, key=probs.get)
            completions.append(Completion(label, "stop", 10, 1, label_probs=probs))
        return completions


def test_a_constrained_teacher_commits_on_every_prompt_and_its_distribution_is_kept(tmp_path):
    """label_constraint auto on an nli task with a local teacher: every prompt gets a label (the hedges and empty
    answers of free generation cannot happen), and the sidecar keeps each label distribution as the soft target."""
    train = [single(text) for text in ["good 1", "bad 2", "unsure 3"]]
    config = make_config(tmp_path, NLI, train, [single("good v")], label_constraint="auto")
    teacher = ChoosingTeacher(sentiment_reply)
    out = synthesize(config, lambda: teacher)

    rows = read(out / "train.jsonl")
    assert [row["messages"][-1]["content"] for row in rows] == ["positive", "negative", "negative"]
    sidecar = read(out / "train.logprobs.jsonl")
    assert [line["row"] for line in sidecar] == [0, 1, 2]
    (entry,) = sidecar[0]["turns"][0]["content"]
    assert entry["token"] == "positive" and entry["logprob"] == pytest.approx(math.log(0.8))
    assert {top["token"]: round(math.exp(top["logprob"]), 6) for top in entry["top_logprobs"]} == {"positive": 0.8, "negative": 0.2}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["constrained_labels"] == 3 and stats["splits"]["train"]["rejected"] == 0
    assert read(out / "rejected.jsonl") == []


def test_conversation_is_regenerated_turn_by_turn_from_the_teachers_own_answers(tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "human answer 1"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "human answer 2"},
    ]
    config = make_config(tmp_path, {"type": "conversation"}, [conversation], [conversation[:2]])
    teacher = ScriptedTeacher(lambda c: stop(f"teacher answer {sum(m['role'] == 'user' for m in c)}"), batch_size=4)
    out = synthesize(config, lambda: teacher)

    # The second turn's prompt holds the teacher's first answer, not the human one.
    assert teacher.batches[1] == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "teacher answer 1"},
            {"role": "user", "content": "How are you?"},
        ]
    ]
    (row,) = read(out / "train.jsonl")
    assert [m["content"] for m in row["messages"]] == ["Be brief.", "Hi", "teacher answer 1", "How are you?", "teacher answer 2"]


def test_interrupted_run_continues_without_asking_twice(tmp_path):
    train = [single(f"good {i}") for i in range(10)]
    config = make_config(tmp_path, NLI, train, [single("bad v")])
    first = ScriptedTeacher(sentiment_reply, batch_size=3, fail_after_batches=2)
    with pytest.raises(KeyboardInterrupt):
        synthesize(config, lambda: first)
    assert not (config.stage_dir("synthesize") / "train.jsonl").exists()  # nothing final written half-way

    second = ScriptedTeacher(sentiment_reply, batch_size=3)
    out = synthesize(config, lambda: second)
    asked_again = [conversation[-1]["content"] for batch in second.batches for conversation in batch]
    assert asked_again == [f"Review: good {i}" for i in range(6, 10)] + ["Review: bad v"]
    rows = read(out / "train.jsonl")
    assert [row["messages"][1]["content"] for row in rows] == [f"Review: good {i}" for i in range(10)]


def test_unchanged_inputs_skip_the_stage_and_force_reruns_it(tmp_path):
    config = make_config(tmp_path, NLI, [single("good 1")], [single("bad 1")])
    synthesize(config, lambda: ScriptedTeacher(sentiment_reply))

    def must_not_build():
        raise AssertionError("the teacher was built although nothing changed")

    synthesize(config, must_not_build)
    again = ScriptedTeacher(sentiment_reply)
    synthesize(config, lambda: again, force=True)
    assert len(again.batches) == 2

    changed = config.model_copy(update={"synthesis": config.synthesis.model_copy(update={"max_new_tokens": 9})})
    other = ScriptedTeacher(sentiment_reply)
    synthesize(changed, lambda: other)
    assert len(other.batches) == 2  # a changed setting invalidates the earlier answers


def test_too_few_usable_answers_fail_the_stage_with_the_main_reason(tmp_path):
    train = [single(f"empty {i}") for i in range(4)] + [single("good 1")]
    config = make_config(tmp_path, NLI, train, [single("good 2")], min_success_ratio=0.7)
    with pytest.raises(StageFailed, match=r"only 2 of 6 teacher answers passed the checks \(33% < synthesis.min_success_ratio 70%.*empty answer \(4x\)"):
        synthesize(config, lambda: ScriptedTeacher(sentiment_reply))
    assert (config.stage_dir("synthesize") / "rejected.jsonl").exists()


# ---------------------------------------------------------------------------------------------------
# A hosted reasoning model (o-series, DeepSeek-R1) on loopback: its trace is kept


def reasoning_config(tmp_path: Path, url: str, train: list, validation: list, task=NLI, **synthesis) -> DistillConfig:
    config = make_config(tmp_path, task, train, validation, **synthesis)
    teacher = {"kind": "openai-compatible", "endpoint": f"{url}/v1", "model": "r1", "auth": {"method": "none"},
               "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5.0, "max_concurrency": 2,
               "max_tokens_field": "max_completion_tokens", "sampling_parameters": False}
    return DistillConfig.model_validate({**config.model_dump(), "teacher": teacher})


def test_a_reasoning_teachers_trace_is_the_rationale_with_keep_rationale_and_kept_in_the_journal_otherwise(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fake_teacher_server import FakeTeacherServer, default_reasoning

    from azdistill.teachers.factory import hosted_teacher_factory

    train = [single(text) for text in ["good 1", "bad [[think_inline]] 2", "good [[no_reasoning]] 3", "good [[length]] 4"]]
    with FakeTeacherServer(reasoning=True) as server:
        config = reasoning_config(tmp_path, server.url, train, [single("bad v")], keep_rationale=True)
        out = synthesize(config, hosted_teacher_factory(config))
        assert set(server.bodies[0]) == {"messages", "max_completion_tokens", "seed", "model"}  # what an o-series model takes

        targets = [row["messages"][-1]["content"] for row in read(out / "train.jsonl")]
        trace = default_reasoning(single("good 1"))
        # The trace names both labels; the label check reads the answer after it, so the answer is accepted.
        assert targets == [
            f"{trace}\n\nAnswer: positive",
            f"{default_reasoning(single('bad [[think_inline]] 2'))}\n\nAnswer: negative",  # from a <think> block
            "positive",  # no trace: trained on the answer alone, and counted
        ]
        stats = json.loads((out / "stats.json").read_text())
        assert stats["splits"]["train"]["trained_without_rationale"] == 1 and stats["splits"]["validation"]["trained_without_rationale"] == 0
        (rejected,) = read(out / "rejected.jsonl")
        assert rejected["reason"].startswith("answer cut off") and rejected["reasoning"] == default_reasoning(single("good [[length]] 4"))

        plain = reasoning_config(tmp_path, server.url, train, [single("bad v")])
        out = synthesize(plain, hosted_teacher_factory(plain), force=True)
        assert [row["messages"][-1]["content"] for row in read(out / "train.jsonl")] == ["positive", "negative", "positive"]
        journal = {row["index"]: row for row in read(out / "train.journal.jsonl")}
        assert journal[0]["reasoning"] == [trace] and "reasoning" not in journal[2]
        assert journal[3]["status"] == "rejected" and journal[3]["reasoning"].startswith("The user asks about")
        assert "trained_without_rationale" not in json.loads((out / "stats.json").read_text())["splits"]["train"]


def test_a_conversation_with_a_reasoning_teacher_shows_it_its_answers_not_its_rationale(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fake_teacher_server import FakeTeacherServer, default_reasoning

    from azdistill.teachers.factory import hosted_teacher_factory

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "human 1"}, {"role": "user", "content": "How are you?"}]
    with FakeTeacherServer(reasoning=True) as server:
        config = reasoning_config(tmp_path, server.url, [conversation], [conversation[:2]], task={"type": "conversation"}, keep_rationale=True)
        out = synthesize(config, hosted_teacher_factory(config))
        (second,) = [body for body in server.bodies if body["messages"][-1]["content"] == "How are you?"]
        assert second["messages"][2] == {"role": "assistant", "content": "Answer to: Hi"}
        (row,) = read(out / "train.jsonl")
        history = conversation[:2] + [{"role": "assistant", "content": "Answer to: Hi"}]
        assert row["messages"][2]["content"] == f"{default_reasoning(conversation[:2])}\n\nAnswer: Answer to: Hi"
        assert row["messages"][4]["content"] == f"{default_reasoning(history + [conversation[3]])}\n\nAnswer: Answer to: How are you?"


@pytest.mark.parametrize("strategy, kind", [("plain", "local"), ("chain_of_density", "openai-compatible")])
def test_keep_rationale_without_a_rationale_to_keep_is_refused(tmp_path, strategy, kind):
    from azdistill.errors import UserError

    task = {"type": "summarization"} if strategy == "chain_of_density" else NLI
    config = make_config(tmp_path, task, [single("good")], [single("bad")], keep_rationale=True, prompt_strategy=strategy)
    if kind != "local":
        config = DistillConfig.model_validate({**config.model_dump(), "teacher": {"kind": kind, "endpoint": "http://127.0.0.1:9/v1", "model": "m", "auth": {"method": "none"}}})
    with pytest.raises(UserError, match="synthesis.keep_rationale needs a rationale to keep.*set synthesis.keep_rationale: false"):
        synthesize(config, lambda: pytest.fail("no teacher may be built"))
