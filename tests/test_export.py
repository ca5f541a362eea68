"""Tests for `azdistill export --format azure`: the files it writes pass the data checks of Azure ML's own distillation.

`azure_record_problem` and `azure_file_problems` re-implement those checks here, independently of
azdistill/data/export.py, from the `oss_distillation_validate_pipeline` component of Azure/azureml-assets:
assets/training/distillation/src/validate_pipeline.py (`_validate_dataset`, `_validate_dataset_record`,
`_validate_record_by_task`, `_validate_record_content`, `_validate_number_of_records`) and
assets/training/distillation/src/common/constants.py (`DataGenerationTaskType`, `SUPPORTED_FILE_FORMATS`,
`MIN_RECORDS_FOR_FT`, `MATH_MIN_RECORDS_FOR_FT`). The minimums come from azdistill.data.splits, the project's one copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
from click.testing import CliRunner

from azdistill.cli import cli
from azdistill.config.loading import load_config
from azdistill.config.sections import PROJECT_ROOT, SINGLE_TURN_TASKS, TASK_TYPES
from azdistill.data.splits import AZURE_MINIMUM_DEFAULT, AZURE_MINIMUM_RECORDS

SPLITS = ("train", "validation", "test")
AZURE_SPLITS = ("train", "validation")  # the files Azure's distillation takes (train_file_path, validation_file_path)
# Azure's DataGenerationTaskType values, and the azdistill task each one stands for.
AZURE_SINGLE_TURN = ("NLI", "NLU_QA", "MATH", "SUMMARIZATION")
AZURE_TASK_NAMES = AZURE_SINGLE_TURN + ("CONVERSATION",)
EXPECTED_MAPPING = {
    "nli": "NLI", "qa": "NLU_QA", "math": "MATH", "summarization": "SUMMARIZATION", "conversation": "CONVERSATION", "chat": "CONVERSATION",
}
SAMPLES = {"sentiment": None, **{task: PROJECT_ROOT / "data" / task / "config.yaml" for task in TASK_TYPES}}  # None: the demo


# ---------------------------------------------------------------------------------------------------
# Azure ML distillation's data checks, re-implemented


def azure_record_problem(row: object, azure_task: str) -> Optional[str]:
    """Why Azure's validator would refuse one row of a train or validation file, or None."""
    # pandas.read_json(lines=True) then `row.iloc[0]`: the messages must be the row's first column.
    if not isinstance(row, dict) or not row or next(iter(row)) != "messages":
        return "the row's first key must be 'messages'"
    record = row["messages"]
    if not isinstance(record, list) or not record:
        return "Chat cannot be empty."
    if azure_task in AZURE_SINGLE_TURN and len(record) > 2:
        return f"Chat cannot be of type multi-turn for task type {azure_task}. Expected format: [system, user]"
    if azure_task == "CONVERSATION" and len(record) < 3:
        return "Dataset is not matching expected schema for task type CONVERSATION. Expected format: [system, user, assistant]"
    if not isinstance(record[0], dict) or record[0].get("role") != "system":
        return "First message should be of role 'system'."
    for index, message in enumerate(record[1:], start=1):
        if not isinstance(message, dict):
            return f"Message at index {index} should be a dictionary."
        if "role" not in message:
            return f"Message at index {index} is missing 'role'."
        if message["role"] not in ("system", "user", "assistant"):
            return f"Invalid 'role' at index {index}."
        if "content" not in message:
            return f"Message at index {index} is missing 'content'."
        expected = ("user", "assistant")[(index - 1) % 2]
        if message["role"] != expected:
            return f"Role at index {index} should be {expected}."
    if azure_task == "CONVERSATION" and len(record[1:]) % 2:
        return "There is an incomplete pair of 'user' and 'assistant' messages."
    # Stricter than the validator, which lets a lone [system] through to the teacher call that then has no question.
    if azure_task in AZURE_SINGLE_TURN and len(record) != 2:
        return "a prompt is [system, user]"
    if not all(isinstance(message.get("content"), str) for message in record):
        return "every content must be a string"
    return None


def azure_minimum(azure_task: str) -> int:
    return AZURE_MINIMUM_RECORDS["math"] if azure_task == "MATH" else AZURE_MINIMUM_DEFAULT


def azure_file_problems(path: Path, azure_task: str) -> list[str]:
    """Everything Azure's validator would refuse in one train or validation file: its format, rows and size."""
    if path.suffix != ".jsonl":
        return [f"{path.name}: not in the supported file formats ['.jsonl']"]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    problems = [f"{path.name}:{number}: {problem}" for number, row in enumerate(rows, start=1)
                if (problem := azure_record_problem(row, azure_task))]
    if len(rows) < azure_minimum(azure_task):
        problems.append(f"{path.name}: {len(rows)} records, fewer than the {azure_minimum(azure_task)} required for task {azure_task}")
    return problems


SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Hi?"}
ASSISTANT = {"role": "assistant", "content": "Hello."}


@pytest.mark.parametrize(
    "azure_task, messages, expected",
    [
        ("NLI", [SYSTEM, USER], None),
        ("NLI", [SYSTEM, USER, ASSISTANT], "Chat cannot be of type multi-turn for task type NLI. Expected format: [system, user]"),
        ("MATH", [SYSTEM], "a prompt is [system, user]"),
        ("NLU_QA", [USER, ASSISTANT], "First message should be of role 'system'."),
        ("SUMMARIZATION", [SYSTEM, ASSISTANT], "Role at index 1 should be user."),
        ("NLI", [SYSTEM, {"role": "tool", "content": "x"}], "Invalid 'role' at index 1."),
        ("NLI", [SYSTEM, {"role": "user"}], "Message at index 1 is missing 'content'."),
        ("CONVERSATION", [SYSTEM, USER, ASSISTANT], None),
        ("CONVERSATION", [SYSTEM, USER, ASSISTANT, USER, ASSISTANT], None),
        ("CONVERSATION", [SYSTEM, USER], "Dataset is not matching expected schema for task type CONVERSATION. "
                                         "Expected format: [system, user, assistant]"),
        ("CONVERSATION", [SYSTEM, USER, ASSISTANT, USER], "There is an incomplete pair of 'user' and 'assistant' messages."),
        ("CONVERSATION", [SYSTEM, USER, USER], "Role at index 2 should be assistant."),
    ],
)
def test_the_reimplemented_azure_rules(azure_task, messages, expected):
    assert azure_record_problem({"messages": messages}, azure_task) == expected


def test_the_reimplemented_azure_rules_read_the_first_column_and_count_rows(tmp_path):
    assert azure_record_problem({"id": 1, "messages": [SYSTEM, USER]}, "NLI") == "the row's first key must be 'messages'"
    path = tmp_path / "train.jsonl"
    for azure_task in ("NLI", "MATH"):
        path.write_text((json.dumps({"messages": [SYSTEM, USER]}) + "\n") * azure_minimum(azure_task), encoding="utf-8")
        assert azure_file_problems(path, azure_task) == []
        path.write_text((json.dumps({"messages": [SYSTEM, USER]}) + "\n") * (azure_minimum(azure_task) - 1), encoding="utf-8")
        assert azure_file_problems(path, azure_task) == [
            f"train.jsonl: {azure_minimum(azure_task) - 1} records, fewer than the {azure_minimum(azure_task)} required for task {azure_task}"
        ]


def test_the_bundled_data_as_is_fails_azure_rules():
    """The issue: a reference answer makes a single-turn record multi-turn for Azure, and the samples are small."""
    problems = azure_file_problems(PROJECT_ROOT / "data" / "nli" / "train.jsonl", "NLI")
    assert problems[0] == "train.jsonl:1: Chat cannot be of type multi-turn for task type NLI. Expected format: [system, user]"
    assert problems[-1].startswith("train.jsonl: 24 records, fewer than the")


# ---------------------------------------------------------------------------------------------------
# The export


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def export(runner: CliRunner, config: Optional[Path], out: Path, *extra: str):
    return runner.invoke(cli, ["export", *([str(config)] if config else []), "--format", "azure", "--out", str(out), *extra])


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def assert_one_line_error(result, expected_start: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(expected_start), result.stderr


def test_the_task_mapping_covers_every_task_type():
    from azdistill.data.export import AZURE_TASK_TYPES

    assert AZURE_TASK_TYPES == EXPECTED_MAPPING
    assert set(AZURE_TASK_TYPES) == set(TASK_TYPES)
    assert set(AZURE_TASK_TYPES.values()) == set(AZURE_TASK_NAMES)


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_bundled_sample_round_trip(runner, tmp_path, sample):
    """Each bundled sample exports to files that pass Azure's checks, but for the size of the small samples, which is
    warned about (one line per split); references leave the prompts for a side file, and nothing is lost."""
    config = load_config(SAMPLES[sample])
    task, out = config.task.type, tmp_path / "azure"
    azure_task = EXPECTED_MAPPING[task]
    result = export(runner, SAMPLES[sample], out)
    assert result.exit_code == 0, result.output

    sources = {split: read_rows(Path(getattr(config.data, split))) for split in SPLITS}
    small = [split for split in AZURE_SPLITS if len(sources[split]) < azure_minimum(azure_task)]
    assert result.stderr.splitlines() == [
        f"warning: {split}: {len(sources[split])} records, fewer than the {azure_minimum(azure_task)} that Azure ML's distillation "
        f"requires for task {azure_task}; it will refuse {out / (split + '.jsonl')} until the split has {azure_minimum(azure_task)}"
        for split in small
    ]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == list(SPLITS)
    assert lines[3] == f"task {task} exported as Azure ML's data_generation_task_type {azure_task}; mapping in {out / 'export.json'}"

    manifest = json.loads((out / "export.json").read_text(encoding="utf-8"))
    assert (manifest["format"], manifest["task_type"], manifest["data_generation_task_type"]) == ("azure", task, azure_task)
    assert manifest["task_types"] == EXPECTED_MAPPING
    for split in SPLITS:
        exported, source = read_rows(out / f"{split}.jsonl"), sources[split]
        assert [azure_record_problem(row, azure_task) for row in exported] == [None] * len(source)
        assert manifest["splits"][split]["records"] == len(source)
        if split in AZURE_SPLITS:
            expected = [f"{split}.jsonl: {len(source)} records, fewer than the {azure_minimum(azure_task)} required for task {azure_task}"]
            assert azure_file_problems(out / f"{split}.jsonl", azure_task) == (expected if split in small else [])
        side_file = out / f"{split}.references.jsonl"
        if task in SINGLE_TURN_TASKS:
            assert [row["messages"] for row in exported] == [row["messages"][:2] for row in source]
            assert [item["reference"] for item in read_rows(side_file)] == [row["messages"][2]["content"] for row in source]
            assert manifest["splits"][split]["references_file"] == side_file.name
        else:  # the teacher regenerates the assistant turns; Azure needs them present
            assert exported == source
            assert not side_file.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["azure"]  # no temporary folder left beside it


def test_a_split_under_the_minimum_is_one_warning_line_and_exit_0(runner, make_config, tmp_path):
    config = make_config("qa", counts={"train": AZURE_MINIMUM_DEFAULT, "validation": AZURE_MINIMUM_DEFAULT - 1, "test": 1})
    out = tmp_path / "azure"
    result = export(runner, config, out)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"warning: validation: {AZURE_MINIMUM_DEFAULT - 1} records, fewer than the {AZURE_MINIMUM_DEFAULT} that Azure ML's "
        f"distillation requires for task NLU_QA; it will refuse {out / 'validation.jsonl'} until the split has {AZURE_MINIMUM_DEFAULT}"
    ]
    assert azure_file_problems(out / "train.jsonl", "NLU_QA") == []
    assert json.loads((out / "export.json").read_text())["splits"]["validation"]["below_azure_minimum"] is True


def test_math_has_its_own_minimum(runner, make_config, tmp_path):
    minimum = AZURE_MINIMUM_RECORDS["math"]
    config = make_config("math", counts={"train": minimum, "validation": minimum})
    result = export(runner, config, tmp_path / "azure")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    for split in AZURE_SPLITS:
        assert azure_file_problems(tmp_path / "azure" / f"{split}.jsonl", "MATH") == []


def test_data_max_records_applies(runner, make_config, tmp_path):
    result = export(runner, make_config("nli"), tmp_path / "azure", "--set", "data.max_records=2")
    assert result.exit_code == 0, result.output
    assert [len(read_rows(tmp_path / "azure" / f"{split}.jsonl")) for split in SPLITS] == [2, 2, 2]


def test_records_without_references_write_no_side_file(runner, make_config, tmp_path):
    config = make_config("summarization", references={"test": False})
    result = export(runner, config, tmp_path / "azure")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "azure" / "test.references.jsonl").exists()
    assert (tmp_path / "azure" / "train.references.jsonl").exists()
    assert json.loads((tmp_path / "azure" / "export.json").read_text())["splits"]["test"]["references_file"] is None


def test_bad_data_is_one_line_exit_2_and_writes_nothing(runner, make_config, tmp_path):
    config = make_config("nli")
    test_split = config.parent / "data" / "test.jsonl"  # the last split read: the others were converted already
    test_split.write_text(test_split.read_text() + '{"messages": [oops]}\n', encoding="utf-8")
    result = export(runner, config, tmp_path / "azure")
    assert_one_line_error(result, f"error: {test_split.resolve()}:4: malformed JSON")
    assert result.stdout == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["project"]


def test_bad_data_leaves_an_earlier_export_as_it_was(runner, make_config, tmp_path):
    config, out = make_config("qa"), tmp_path / "azure"
    assert export(runner, config, out).exit_code == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    (config.parent / "data" / "validation.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
    assert_one_line_error(export(runner, config, out), "error: ")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["azure", "project"]


def test_a_conversation_ending_with_a_user_turn_is_refused(runner, make_config, tmp_path):
    config = make_config("chat", references={"validation": False})
    result = export(runner, config, tmp_path / "azure")
    validation = (config.parent / "data" / "validation.jsonl").resolve()
    assert_one_line_error(result, f"error: {validation}:1: ends with a user turn; Azure ML's CONVERSATION task (task chat)")
    assert not (tmp_path / "azure").exists()


def test_an_earlier_export_is_replaced_whole(runner, make_config, write_dataset, tmp_path):
    config, out = make_config("nli"), tmp_path / "azure"
    assert export(runner, config, out).exit_code == 0
    assert (out / "test.references.jsonl").exists()
    write_dataset("nli", config.parent / "data", references={"test": False})
    result = export(runner, config, out)
    assert result.exit_code == 0, result.output
    assert not (out / "test.references.jsonl").exists()  # no stale side file from the earlier export
    assert sorted(path.name for path in tmp_path.iterdir()) == ["azure", "project"]


def test_an_out_folder_with_other_files_is_refused(runner, make_config, tmp_path):
    out = tmp_path / "azure"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert_one_line_error(export(runner, make_config(), out), f"error: --out {out}: holds 'notes.txt', which is not an export's file")
    assert [path.name for path in out.iterdir()] == ["notes.txt"]

    (out / "notes.txt").unlink()
    (out / "train.jsonl").write_text("{}\n", encoding="utf-8")  # data, but not an export (no export.json)
    assert_one_line_error(export(runner, make_config(), out), f"error: --out {out}: holds data files but no export.json")
    assert (out / "train.jsonl").read_text() == "{}\n"


def test_an_out_that_is_a_file_is_refused(runner, make_config, tmp_path):
    out = tmp_path / "azure.jsonl"
    out.write_text("", encoding="utf-8")
    assert_one_line_error(export(runner, make_config(), out), f"error: --out {out}: is a file")
    assert_one_line_error(export(runner, make_config(), out / "inner"), f"error: --out {out / 'inner'}: cannot be created")


def test_an_empty_out_folder_is_filled(runner, make_config, tmp_path):
    out = tmp_path / "azure"
    out.mkdir()
    assert export(runner, make_config(), out).exit_code == 0
    assert sorted(path.name for path in out.iterdir())[0] == "export.json"


def test_a_failed_write_leaves_nothing(monkeypatch, make_config, tmp_path):
    import azdistill.data.files
    from azdistill.data.export import export_azure

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(azdistill.data.files, "write_json", disk_full)  # the manifest, written last
    with pytest.raises(OSError):
        export_azure(load_config(make_config()), tmp_path / "azure")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["project"]


def test_format_is_required_and_its_choices_are_the_modules(runner, make_config, tmp_path):
    from azdistill.data.export import EXPORT_FORMATS

    option = next(param for param in cli.commands["export"].params if param.name == "export_format")
    assert tuple(option.type.choices) == EXPORT_FORMATS
    result = runner.invoke(cli, ["export", str(make_config()), "--out", str(tmp_path / "azure")])
    assert result.exit_code == 2
    assert "Missing option '--format'" in result.stderr
    result = runner.invoke(cli, ["export", str(make_config()), "--format", "openai", "--out", str(tmp_path / "azure")])
    assert result.exit_code == 2
    assert not (tmp_path / "azure").exists()
