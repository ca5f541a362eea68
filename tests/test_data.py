"""Tests for azdistill.data (records, splits, files): JSONL chat records, their `file:line` errors, atomic writes and the journal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import record, records

from azdistill.config.sections import SINGLE_TURN_TASKS, TASK_TYPES
from azdistill.data.files import AppendLog, atomic_writer, iter_jsonl, read_journal, write_json, write_jsonl
from azdistill.data.records import Record, check_messages, read_records
from azdistill.errors import UserError

SYSTEM = {"role": "system", "content": "Classify the review as positive or negative."}
USER = {"role": "user", "content": "Loved it."}
ASSISTANT = {"role": "assistant", "content": "positive"}
GOOD = {"messages": [SYSTEM, USER, ASSISTANT]}
MULTI_TURN = {"messages": [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "And this one?"}, ASSISTANT]}


def error_lines(path, task="nli", limit=None) -> list[str]:
    with pytest.raises(UserError) as caught:
        read_records(path, task, limit)
    return str(caught.value).split("\n")


def msgs(*messages) -> dict:
    return {"messages": list(messages)}


# ---------------------------------------------------------------------------------------------------
# Valid data


@pytest.mark.parametrize("task", TASK_TYPES)
def test_the_shared_dataset_fixture_is_valid_for_every_task(write_dataset, task):
    paths = write_dataset(task)
    counts = {split: len(read_records(path, task)) for split, path in paths.items()}
    assert counts == {"train": 4, "validation": 2, "test": 3}


def test_records_keep_messages_line_numbers_and_extra_fields(write_lines):
    path = write_lines("d.jsonl", [GOOD, {**GOOD, "id": "r2", "source": "web"}])
    first, second = read_records(path, "nli")
    assert first.messages == GOOD["messages"]
    assert (first.line, second.line) == (1, 2)
    assert first.extra == {}
    assert second.extra == {"id": "r2", "source": "web"}


def test_blank_lines_are_skipped_but_counted_for_line_numbers(write_lines):
    path = write_lines("d.jsonl", ["", GOOD, "   ", "\t", GOOD, ""])
    assert [r.line for r in read_records(path, "nli")] == [2, 5]


def test_windows_line_endings_are_accepted(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\r\n" + json.dumps(GOOD) + "\r\n").encode())
    assert [r.line for r in read_records(path, "nli")] == [1, 2]


def test_last_line_without_newline_is_read(write_lines):
    path = write_lines("d.jsonl", [GOOD, GOOD], newline_at_end=False)
    assert len(read_records(path, "nli")) == 2


@pytest.mark.parametrize("limit, expected_lines", [(None, [1, 2, 3, 4, 5]), (2, [1, 2]), (5, [1, 2, 3, 4, 5]), (50, [1, 2, 3, 4, 5])])
def test_limit_keeps_the_first_records(write_lines, limit, expected_lines):
    path = write_lines("d.jsonl", [GOOD] * 5)
    assert [r.line for r in read_records(path, "nli", limit)] == expected_lines


def test_limit_does_not_hide_bad_lines_after_it(write_lines):
    path = write_lines("d.jsonl", [GOOD, GOOD, "{oops"])
    assert error_lines(path, limit=1) == [f"{path}:3: malformed JSON: Expecting property name enclosed in double quotes (column 2)"]


@pytest.mark.parametrize("task", ["conversation", "chat"])
def test_multi_turn_records_are_accepted_for_conversation_tasks(write_lines, task):
    path = write_lines("d.jsonl", [MULTI_TURN, GOOD])
    assert [len(r.messages) for r in read_records(path, task)] == [5, 3]


@pytest.mark.parametrize("task", sorted(SINGLE_TURN_TASKS))
def test_multi_turn_records_are_refused_for_single_turn_tasks(write_lines, task):
    path = write_lines("d.jsonl", [GOOD, MULTI_TURN])
    assert error_lines(path, task) == [
        f"{path}:2: task '{task}' takes one turn: [system, user] or [system, user, assistant]; "
        "got 5 messages (use task conversation or chat for multi-turn records)"
    ]


def test_single_turn_tasks_are_the_four_documented():
    assert set(SINGLE_TURN_TASKS) == {"nli", "qa", "math", "summarization"}


@pytest.mark.parametrize("task", sorted(SINGLE_TURN_TASKS))
def test_four_messages_ending_in_user_are_also_multi_turn(task):
    messages = [SYSTEM, USER, ASSISTANT, USER]
    assert check_messages(messages, task).startswith(f"task '{task}' takes one turn")
    assert check_messages(messages, "conversation") is None


# ---------------------------------------------------------------------------------------------------
# Record.reference and Record.prompt


def test_reference_and_prompt_of_a_record_with_an_answer():
    rec = Record(messages=[SYSTEM, USER, ASSISTANT], line=1)
    assert rec.reference == "positive"
    assert rec.prompt == [SYSTEM, USER]


def test_reference_and_prompt_of_a_record_without_an_answer():
    rec = Record(messages=[SYSTEM, USER], line=1)
    assert rec.reference is None
    assert rec.prompt == [SYSTEM, USER]


def test_reference_and_prompt_of_multi_turn_records():
    last_user = {"role": "user", "content": "And this one?"}
    with_answer = Record(messages=MULTI_TURN["messages"], line=1)
    assert with_answer.reference == "positive"
    assert with_answer.prompt == [SYSTEM, USER, ASSISTANT, last_user]
    without_answer = Record(messages=[SYSTEM, USER, ASSISTANT, last_user], line=1)
    assert without_answer.reference is None
    assert without_answer.prompt == [SYSTEM, USER, ASSISTANT, last_user]


def test_reference_counts_from_read_records(write_lines):
    path = write_lines("d.jsonl", [GOOD, msgs(SYSTEM, USER), GOOD])
    assert [r.reference for r in read_records(path, "nli")] == ["positive", None, "positive"]


# ---------------------------------------------------------------------------------------------------
# Each bad line is reported as file:line: what is wrong


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"messages": x}', "malformed JSON: Expecting value (column 14)"),
        ("not json at all", "malformed JSON: Expecting value (column 1)"),
        ("[1, 2]", "expected an object with a 'messages' list"),
        ('"just a string"', "expected an object with a 'messages' list"),
        ('{"msgs": []}', "expected an object with a 'messages' list"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": "hello"}', "'messages' must be a non-empty list"),
        ('{"messages": ["hi"]}', "messages[0] must be an object with 'role' and 'content'"),
        (msgs(USER, ASSISTANT), "the first message must be 'system', not 'user'"),
        (msgs(SYSTEM, {"role": "bot", "content": "hi"}), "messages[1].role is 'bot'; allowed: system, user, assistant"),
        (msgs(SYSTEM, {"content": "hi"}), "messages[1].role is None; allowed: system, user, assistant"),
        (msgs(SYSTEM, {"role": "User", "content": "hi"}), "messages[1].role is 'User'; allowed: system, user, assistant"),
        (
            msgs(SYSTEM, USER, USER),
            "messages[2] is 'user' where 'assistant' was expected (system, then user and assistant alternating)",
        ),
        (
            msgs(SYSTEM, ASSISTANT),
            "messages[1] is 'assistant' where 'user' was expected (system, then user and assistant alternating)",
        ),
        (
            msgs(SYSTEM, SYSTEM, USER),
            "messages[1] is 'system' where 'user' was expected (system, then user and assistant alternating)",
        ),
        (msgs(SYSTEM), "a record needs a 'user' message after the system message"),
        (msgs({"role": "system", "content": ""}, USER), "messages[0] (system) has empty content"),
        (msgs(SYSTEM, {"role": "user", "content": ""}), "messages[1] (user) has empty content"),
        (msgs(SYSTEM, {"role": "user", "content": " \t\n "}), "messages[1] (user) has empty content"),
        (msgs(SYSTEM, USER, {"role": "assistant", "content": "   "}), "messages[2] (assistant) has empty content"),
        (msgs(SYSTEM, {"role": "user", "content": 5}), "messages[1].content must be a string"),
        (msgs(SYSTEM, {"role": "user", "content": None}), "messages[1].content must be a string"),
        (msgs(SYSTEM, {"role": "user", "content": ["a", "b"]}), "messages[1].content must be a string"),
        (msgs(SYSTEM, {"role": "user"}), "messages[1].content must be a string"),
    ],
)
def test_each_kind_of_bad_line_is_named_with_file_and_line(write_lines, line, problem):
    path = write_lines("d.jsonl", [GOOD, line, GOOD])
    assert error_lines(path) == [f"{path}:2: {problem}"]


def test_several_bad_lines_give_one_line_and_a_report_of_all_of_them(write_lines, tmp_path):
    path = write_lines(
        "d.jsonl",
        [
            GOOD,
            "{broken",
            GOOD,
            msgs(USER, ASSISTANT),
            "",
            msgs(SYSTEM, {"role": "user", "content": "  "}),
            GOOD,
            msgs(SYSTEM, USER, USER),
        ],
    )
    report = tmp_path / "work" / "report.jsonl"
    with pytest.raises(UserError) as caught:
        read_records(path, "nli", report=report)
    assert str(caught.value) == (
        f"{path}: 4 bad records; first at line 2: malformed JSON: Expecting property name enclosed in double quotes "
        f"(column 2); all of them in {report}"
    )
    assert [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()] == [
        {"file": str(path), "line": 2, "problem": "malformed JSON: Expecting property name enclosed in double quotes (column 2)"},
        {"file": str(path), "line": 4, "problem": "the first message must be 'system', not 'user'"},
        {"file": str(path), "line": 6, "problem": "messages[1] (user) has empty content"},
        {"file": str(path), "line": 8, "problem": "messages[2] is 'user' where 'assistant' was expected "
         "(system, then user and assistant alternating)"},
    ]
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.jsonl"]  # no temporary file left


def test_twenty_five_bad_lines_give_one_line_with_the_count(write_lines, tmp_path, monkeypatch):
    # 25 bad lines used to give a 21-line message; the report without a place given goes to a temporary folder,
    # never beside the user's data.
    import tempfile

    (tmp_path / "temp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    path = write_lines("data/d.jsonl", [GOOD, GOOD] + ["{bad"] * 25)
    (line,) = error_lines(path)
    assert line.startswith(f"{path}: 25 bad records; first at line 3: malformed JSON: ")
    report = Path(line.rsplit("; all of them in ", 1)[1])
    assert len(report.read_text(encoding="utf-8").splitlines()) == 25
    assert report.parent.parent == tmp_path / "temp"
    assert sorted(p.name for p in path.parent.iterdir()) == ["d.jsonl"]


def test_one_bad_line_writes_no_report(write_lines, tmp_path):
    path = write_lines("d.jsonl", [GOOD, "{bad"])
    report = tmp_path / "work" / "report.jsonl"
    with pytest.raises(UserError, match=r":2: malformed JSON"):
        read_records(path, "nli", report=report)
    assert not (tmp_path / "work").exists()


def test_malformed_json_at_the_end_of_a_line_names_the_right_column(write_lines):
    truncated = json.dumps(GOOD)[:-1]  # the closing brace is missing
    path = write_lines("d.jsonl", [truncated])
    assert error_lines(path) == [f"{path}:1: malformed JSON: Expecting ',' delimiter (column {len(truncated) + 1})"]


def test_a_file_that_is_not_utf8_is_a_user_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD, ensure_ascii=False).replace("Loved", "Caf\xe9").encode("latin-1") + b"\n")
    lines = error_lines(path)
    assert lines[0].startswith(f"{path}")


# ---------------------------------------------------------------------------------------------------
# Files that cannot be read at all


def test_missing_file(tmp_path):
    path = tmp_path / "missing.jsonl"
    assert error_lines(path) == [f"{path}: data file not found"]


def test_a_folder_is_not_a_data_file(tmp_path):
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    assert error_lines(folder) == [f"{folder}: is a directory, not a data file; give the path of a .jsonl file"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_named_pipe_is_not_a_data_file(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    # Opening a pipe with no writer would block: the check must not open it.
    assert error_lines(fifo) == [f"{fifo}: is not a regular file (a named pipe); give the path of a .jsonl file"]


def test_a_data_file_below_a_file_is_not_found(tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("x")
    assert error_lines(taken / "d.jsonl") == [f"{taken / 'd.jsonl'}: data file not found ({taken} is a file, not a folder)"]


@pytest.mark.parametrize("name", ["d.json", "d.txt", "d.csv", "d"])
def test_wrong_extension(write_lines, name):
    path = write_lines(name, [GOOD])
    assert error_lines(path) == [f"{path}: expected a .jsonl file (one JSON object per line)"]


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    assert error_lines(path) == [f"{path}: no records (the file is empty)"]


def test_read_records_accepts_a_string_path(write_lines):
    path = write_lines("d.jsonl", [GOOD])
    assert len(read_records(str(path), "nli")) == 1


# ---------------------------------------------------------------------------------------------------
# Atomic writes


def test_write_jsonl_writes_rows_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    rows = [{"a": 1}, {"b": "é"}, {"c": [1, 2]}]
    assert write_jsonl(path, rows) == 3
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n{"c": [1, 2]}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]
    assert list(iter_jsonl(path)) == rows


def test_write_jsonl_accepts_a_generator_and_an_empty_iterable(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, ({"i": i} for i in range(4))) == 4
    assert [row["i"] for row in iter_jsonl(path)] == [0, 1, 2, 3]
    assert write_jsonl(path, []) == 0
    assert path.read_text() == ""


def test_write_jsonl_that_fails_midway_keeps_the_previous_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"old": 1}, {"old": 2}])
    before = path.read_bytes()

    def rows():
        yield {"new": 1}
        yield {"new": 2}
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        write_jsonl(path, rows())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_write_jsonl_that_fails_before_any_file_exists_leaves_nothing(tmp_path):
    path = tmp_path / "rows.jsonl"

    def rows():
        yield {"new": 1}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, rows())
    assert list(tmp_path.iterdir()) == []


def test_write_jsonl_with_an_unserialisable_row_keeps_the_previous_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"old": 1}\n')
    with pytest.raises(TypeError):
        write_jsonl(path, [{"ok": 1}, {"bad": object()}])
    assert path.read_text() == '{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_write_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_json(path, {"path": Path("/x"), "n": 1})
    assert json.loads(path.read_text()) == {"path": "/x", "n": 1}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_atomic_writer_in_binary_mode(tmp_path):
    path = tmp_path / "blob.bin"
    with atomic_writer(path, "wb") as handle:
        handle.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin"]


def test_atomic_writer_does_not_show_partial_content_while_writing(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("old\n")
    with atomic_writer(path) as handle:
        handle.write("new\n")
        handle.flush()
        assert path.read_text() == "old\n"  # the target only changes when the block ends
        temporaries = [p for p in tmp_path.iterdir() if p.name != "rows.jsonl"]
        assert len(temporaries) == 1 and temporaries[0].name.startswith(".rows.jsonl.")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


# ---------------------------------------------------------------------------------------------------
# The append-only journal


def test_append_log_round_trips_rows(tmp_path):
    path = tmp_path / "stage" / "journal.jsonl"
    with AppendLog(path) as journal:
        journal.append({"index": 0, "status": "ok"})
        journal.append({"index": 1, "text": "é\n"})
        # flushed per row: readable before the log is closed
        assert read_journal(path) == [{"index": 0, "status": "ok"}, {"index": 1, "text": "é\n"}]
    assert read_journal(path) == [{"index": 0, "status": "ok"}, {"index": 1, "text": "é\n"}]


def test_append_log_continues_an_existing_journal(tmp_path):
    path = tmp_path / "journal.jsonl"
    with AppendLog(path) as journal:
        journal.append({"index": 0})
    with AppendLog(path) as journal:
        journal.append({"index": 1})
    assert read_journal(path) == [{"index": 0}, {"index": 1}]


def test_missing_journal_is_empty(tmp_path):
    assert read_journal(tmp_path / "nothing.jsonl") == []


def test_torn_last_line_is_ignored_by_read_journal(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"index": 2, "te')
    assert read_journal(path) == [{"index": 0}, {"index": 1}]


def test_torn_last_line_that_happens_to_be_complete_json_is_still_ignored(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}')  # no newline: the writer was killed before it
    assert read_journal(path) == [{"index": 0}]


def test_next_append_log_cuts_the_torn_line_and_keeps_the_journal_valid(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"index": 2, "te')
    with AppendLog(path) as journal:
        journal.append({"index": 2, "text": "again"})
    assert path.read_text() == '{"index": 0}\n{"index": 1}\n{"index": 2, "text": "again"}\n'
    assert [json.loads(line) for line in path.read_text().splitlines()] == read_journal(path)
    assert read_journal(path) == [{"index": 0}, {"index": 1}, {"index": 2, "text": "again"}]


def test_append_log_on_a_journal_that_is_only_a_torn_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"index": 0, "st')
    with AppendLog(path) as journal:
        journal.append({"index": 0})
    assert path.read_text() == '{"index": 0}\n'


def test_append_log_leaves_an_intact_journal_alone(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"index": 0}\n')
    AppendLog(path).close()
    assert path.read_text() == '{"index": 0}\n'
    empty = tmp_path / "empty.jsonl"
    AppendLog(empty).close()
    assert empty.read_text() == ""


def test_the_conftest_records_helper_builds_valid_records():
    # guards the shared fixtures: a broken helper would make every dataset-based test meaningless
    for task in TASK_TYPES:
        for index in range(4):
            assert check_messages(record(task, index)["messages"], task) is None
            assert check_messages(record(task, index, reference=False)["messages"], task) is None
    assert len(records("chat", 3)) == 3
    assert any(len(r["messages"]) > 3 for r in records("conversation", 4))


# ---------------------------------------------------------------------------------------------------
# Streaming checks for `validate`: an over-long prompt, duplicates, and memory that does not grow with the file


def test_check_prompt_length_names_the_size_and_the_setting():
    from azdistill.data.records import check_prompt_length

    long_user = {"role": "user", "content": "x" * 150}
    assert check_prompt_length([SYSTEM, USER, ASSISTANT], 100) is None
    assert check_prompt_length([SYSTEM, long_user], 100) == (
        f"the prompt has {len(SYSTEM['content']) + 150} characters, more than data.max_prompt_chars (100); "
        "shorten the record or raise data.max_prompt_chars"
    )
    # the final assistant turn is the reference answer, not part of the prompt the teacher reads
    assert check_prompt_length([SYSTEM, USER, {"role": "assistant", "content": "y" * 500}], 100) is None


def test_scan_records_is_a_generator_of_records_and_bad_lines(write_lines):
    import inspect

    from azdistill.data.records import BadLine, scan_records

    huge = msgs(SYSTEM, {"role": "user", "content": "x" * 2000})
    path = write_lines("d.jsonl", [GOOD, "{bad", "", huge])
    items = scan_records(path, "nli", max_prompt_chars=1000)
    assert inspect.isgenerator(items)
    first, second, third = list(items)
    assert isinstance(first, Record) and first.line == 1
    assert second == BadLine(line=2, problem="malformed JSON: Expecting property name enclosed in double quotes (column 2)")
    assert isinstance(third, BadLine) and third.line == 4 and "more than data.max_prompt_chars (1,000)" in third.problem


def test_read_records_leaves_long_prompts_to_the_stages(write_lines):
    # The stages reject an over-long record with a reason (check_prompt_length); they are not refused wholesale.
    path = write_lines("d.jsonl", [GOOD, msgs(SYSTEM, {"role": "user", "content": "x" * 200_000})])
    assert len(read_records(path, "nli")) == 2


def test_check_split_counts_references_and_duplicate_prompts(write_lines):
    from azdistill.data.splits import check_split

    other = msgs(SYSTEM, {"role": "user", "content": "Hated it."})
    path = write_lines("d.jsonl", [other, GOOD, msgs(SYSTEM, USER), GOOD, other, GOOD])
    summary = check_split(path, "nli")
    assert (summary.records, summary.with_reference) == (6, 3)
    # the same prompt with or without a reference answer is the same question to the teacher
    assert (summary.duplicates, summary.duplicate_lines, summary.first_duplicate_of) == (4, [3, 4, 5, 6], 2)


def test_check_split_with_a_limit_summarises_the_records_used_and_checks_them_all(write_lines):
    from azdistill.data.splits import check_split

    path = write_lines("d.jsonl", [GOOD, msgs(SYSTEM, {"role": "user", "content": "Hated it."}), GOOD, "{bad"])
    with pytest.raises(UserError, match=r":4: malformed JSON"):
        check_split(path, "nli", limit=2)
    path = write_lines("e.jsonl", [GOOD, msgs(SYSTEM, {"role": "user", "content": "Hated it."}), GOOD])
    summary = check_split(path, "nli", limit=2)
    assert (summary.records, summary.duplicates) == (2, 0)


def test_check_split_reports_an_over_long_prompt_with_its_line(write_lines):
    from azdistill.data.splits import check_split

    path = write_lines("d.jsonl", [GOOD, msgs(SYSTEM, {"role": "user", "content": "x" * 10_000})])
    with pytest.raises(UserError) as caught:
        check_split(path, "nli", max_prompt_chars=5000)
    assert str(caught.value) == (
        f"{path}:2: the prompt has {len(SYSTEM['content']) + 10_000:,} characters, more than data.max_prompt_chars "
        "(5,000); shorten the record or raise data.max_prompt_chars"
    )


def _write_distinct_records(path: Path, count: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            handle.write(json.dumps(msgs(SYSTEM, {"role": "user", "content": f"Review number {index}: fine."}, ASSISTANT)) + "\n")
    return path


def _peak_bytes(function, *args) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_check_split_memory_does_not_grow_with_the_records(tmp_path):
    # validate used to hold every record (1.6 GB for 1M records). check_split streams: what grows is one small
    # integer per distinct prompt (for the duplicate check), not the records.
    from azdistill.data.splits import check_split

    small = _write_distinct_records(tmp_path / "small.jsonl", 5_000)
    large = _write_distinct_records(tmp_path / "large.jsonl", 30_000)
    per_record_streamed = (_peak_bytes(check_split, large, "nli") - _peak_bytes(check_split, small, "nli")) / 25_000
    per_record_held = _peak_bytes(read_records, small, "nli") / 5_000
    assert per_record_streamed < 150, per_record_streamed
    assert per_record_held > 8 * per_record_streamed, (per_record_held, per_record_streamed)
