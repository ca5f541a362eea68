"""Chat-log import: stored completions and request/response pairs become a dataset; logged answers are reused."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from azdistill.cli import cli
from azdistill.config.schema import DistillConfig
from azdistill.data.logs_import import parse_log_line
from azdistill.stages.synthesize import synthesize
from azdistill.teachers.factory import hosted_teacher_factory

SYSTEM = {"role": "system", "content": "Classify the sentiment."}


def stored_completion(question: str, answer: str, finish: str = "stop", model: str = "gpt-4o", **metadata) -> dict:
    """A chat.completion object as Azure OpenAI's stored completions list returns it, with its input."""
    return {
        "id": f"chatcmpl-{abs(hash(question))}", "object": "chat.completion", "created": 1730000000, "model": model,
        "metadata": metadata, "input_messages": [SYSTEM, {"role": "user", "content": [{"type": "text", "text": question}]}],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2},
    }


def test_each_log_format_becomes_messages_ending_with_the_answer():
    messages, facts, _ = parse_log_line(stored_completion("Great film", "positive", category="reviews"))
    assert messages == [SYSTEM, {"role": "user", "content": "Great film"}, {"role": "assistant", "content": "positive"}]
    assert facts == {"model": "gpt-4o", "metadata": {"category": "reviews"}}

    pair = {"request": {"model": "m", "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}]}}
    messages, facts, _ = parse_log_line(pair)
    assert messages[0] == {"role": "system", "content": "Be brief."} and messages[-1]["content"] == "Hello" and facts["model"] == "m"
    assert parse_log_line({"request": {"messages": [{"role": "user", "content": "Hi"}]}, "response": "Hello"})[0][-1]["content"] == "Hello"

    assert parse_log_line(stored_completion("x", "cut", finish="length"))[2] == "logged answer was cut off (finish_reason=length)"
    assert parse_log_line({"foo": 1})[2].startswith("unknown format")
    tool_call = {"request": {"messages": [{"role": "tool", "content": "42"}]}, "response": "ok"}
    assert parse_log_line(tool_call)[2] == "no readable input messages"


def test_import_then_reuse_the_logged_answers_without_calling_a_teacher(tmp_path):
    logs = tmp_path / "completions.jsonl"
    lines = [stored_completion(f"Review {i}: {'good' if i % 2 else 'bad'}", "positive" if i % 2 else "negative", category="reviews") for i in range(40)]
    lines += [stored_completion("other", "x", model="gpt-35"), stored_completion("hedge", "positive or negative", category="reviews")]
    lines += [lines[0], "{not json"]
    logs.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")

    result = CliRunner().invoke(cli, ["import-logs", str(logs), "--out", str(tmp_path / "data"), "--task", "nli",
                                      "--model", "gpt-4o", "--metadata", "category=reviews", "--test-share", "0"])
    assert result.exit_code == 0, result.output
    assert "skipped 1: exact duplicate" in result.output and "skipped 1: other model" in result.output
    written = {split: (tmp_path / "data" / f"{split}.jsonl").read_text().splitlines() for split in ("train", "validation", "test")}
    assert sum(len(rows) for rows in written.values()) == 41
    again = tmp_path / "again"
    CliRunner().invoke(cli, ["import-logs", str(logs), "--out", str(again), "--task", "nli", "--model", "gpt-4o", "--test-share", "0"])
    assert (again / "train.jsonl").read_text().splitlines() == written["train"]  # same logs, same splits

    config = DistillConfig.model_validate({
        "name": "logged", "workdir": str(tmp_path / "work"),
        "task": {"type": "nli", "labels": ["positive", "negative"]},
        "data": {split: str(tmp_path / "data" / f"{split}.jsonl") for split in ("train", "validation", "test")},
        "teacher": {"kind": "logged"}, "synthesis": {"min_success_ratio": 0.5}, "tracking": {"enabled": False},
    })
    out = synthesize(config, hosted_teacher_factory(config))
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert rows and all(row["messages"][-1]["content"] in ("positive", "negative") for row in rows)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [row["answer"] for row in rejected] == ["positive or negative"]  # the checks apply to logged answers too


def test_drop_answers_writes_prompts_for_a_teacher_to_regenerate(tmp_path):
    logs = tmp_path / "pairs.jsonl"
    logs.write_text("".join(json.dumps({"request": {"messages": [SYSTEM, {"role": "user", "content": f"Q{i}"}]}, "response": f"A{i}"}) + "\n" for i in range(5)))
    result = CliRunner().invoke(cli, ["import-logs", str(logs), "--out", str(tmp_path / "d"), "--task", "qa", "--drop-answers",
                                      "--validation-share", "0", "--test-share", "0"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    assert [row["messages"][-1]["role"] for row in rows] == ["user"] * 5
    assert json.loads((tmp_path / "d" / "import.json").read_text())["written"]["train"] == 5


def test_logs_with_nothing_usable_are_a_user_error(tmp_path):
    logs = tmp_path / "bad.jsonl"
    logs.write_text('{"foo": 1}\n')
    result = CliRunner().invoke(cli, ["import-logs", str(logs), "--out", str(tmp_path / "d"), "--task", "qa"])
    assert result.exit_code == 2 and "no usable training records" in result.output
    assert not (tmp_path / "d" / "train.jsonl").exists()
    assert Path(tmp_path / "d").exists() is False or not any((tmp_path / "d").glob("*.jsonl"))
