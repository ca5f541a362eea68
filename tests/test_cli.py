"""Tests for the `azdistill` command line: help, version, `validate`, and the one-line errors (exit 2).

No test here loads a model or runs a stage: the functions that would load or convert one are replaced by a
tripwire (`forbid_models`), so a command that reaches them fails its test instead of spending minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import line_of

import azdistill
import azdistill.models.builtin
import azdistill.models.loading
import azdistill.models.students
from azdistill.cli import cli
from azdistill.config.sections import TASK_TYPES
from azdistill.data.splits import AZURE_MINIMUM_DEFAULT, AZURE_MINIMUM_RECORDS
from azdistill.errors import StageFailed

COMMANDS = ("run", "validate", "synthesize", "preflight", "finetune", "evaluate", "ui", "export", "serve")
TOOLS = ("import-logs",)  # commands that take no config (tested in tests/test_logs_import.py)
AZURE = ("submit", "deploy", "schedule", "status", "logs", "job")  # Azure ML commands (tested in tests/test_azure_*.py)
GROUPS = ("runs",)  # command groups; their subcommands are tested in tests/test_runs.py
TOP_LEVEL_KEYS = "azure, data, evaluation, name, runtime, student, synthesis, task, teacher, tracking, training, workdir"
GOOD_ROW = {
    "messages": [
        {"role": "system", "content": "Classify the review as positive or negative."},
        {"role": "user", "content": "Loved it."},
        {"role": "assistant", "content": "positive"},
    ]
}


class ModelLoaded(AssertionError):
    pass


def patch_everywhere(monkeypatch, module, name: str, replacement) -> None:
    """Replace a function where it is defined and in every loaded module that imported it at its top."""
    real = getattr(module, name)
    for loaded in [m for key, m in sys.modules.items() if key.startswith("azdistill.") and getattr(m, name, None) is real]:
        monkeypatch.setattr(loaded, name, replacement)


@pytest.fixture(autouse=True)
def forbid_models(monkeypatch, tmp_path):
    """Fail loudly if a command gets as far as converting, pruning or loading a model; keep everything offline."""

    def tripwire(*args, **kwargs):
        raise ModelLoaded("a CLI test reached model loading")

    for module, name in (
        (azdistill.models.builtin, "builtin_teacher_path"),
        (azdistill.models.students, "make_pruned_student"),
        (azdistill.models.loading, "load_model"),
        (azdistill.models.loading, "load_tokenizer"),
    ):
        patch_everywhere(monkeypatch, module, name, tripwire)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("AZDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(cli, [str(arg) for arg in args])


def assert_user_error(result, expected_line: str) -> None:
    """Exit 2, exactly one line on stderr (`error: ...`), no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.splitlines() == [expected_line]


def tiny_warning(path: Path, count: int, minimum: int, task: str) -> str:
    return (
        f"warning: {path}: {count} record{'s' if count != 1 else ''}, fewer than the {minimum} per split that Azure ML's "
        f"distillation requires for task {task}; the student may learn little"
    )


def distinct_rows(count: int) -> list[dict]:
    """`count` valid rows whose prompts all differ."""
    system, user, assistant = GOOD_ROW["messages"]
    return [{"messages": [system, {**user, "content": f"Review {index}: loved it."}, assistant]} for index in range(count)]


def data_file(config: Path, split: str) -> Path:
    return config.parent / "data" / f"{split}.jsonl"


def write_rows(path: Path, rows) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Help and version


def test_help_lists_every_command(runner):
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    assert result.stderr == ""
    commands_section = result.stdout.split("Commands:", 1)[1]
    listed = [line.split()[0] for line in commands_section.splitlines() if line.strip()]
    assert sorted(listed) == sorted(COMMANDS + GROUPS + TOOLS + AZURE)


# Each of these takes seconds to import on a small machine; bench/cli_startup.py measures the difference.
HEAVY_MODULES = ("torch", "transformers", "mlflow", "azure.ai.ml", "peft", "accelerate", "numpy", "pandas", "matplotlib", "sacrebleu")

IMPORTS_PROBE = """
import json, sys
from click.testing import CliRunner
from azdistill.cli import cli

HEAVY = %r

def walk(command, path):
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from walk(sub, path + [name])

runner, seen = CliRunner(), []
for args in [path + ["--help"] for path in walk(cli, [])] + [["validate", sys.argv[1]]]:
    result = runner.invoke(cli, args)
    seen.append({"args": args, "exit_code": result.exit_code, "heavy": [m for m in HEAVY if m in sys.modules]})
print(json.dumps(seen))
"""


def test_help_of_every_command_and_validate_import_no_heavy_library():
    """In a fresh interpreter (in-process, earlier tests have imported everything): `--help` of every command and
    `validate` of a sample config load none of torch, transformers, MLflow or the Azure ML SDK. Checked by the
    modules loaded, not by a stopwatch, so a busy machine cannot fail it."""
    from azdistill.config.sections import PROJECT_ROOT

    probe = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE % (HEAVY_MODULES,), str(PROJECT_ROOT / "data" / "nli" / "config.yaml")],
        capture_output=True, text=True, check=True, cwd=PROJECT_ROOT,
    )
    seen = json.loads(probe.stdout.splitlines()[-1])
    assert len(seen) > 25  # every command and subcommand, and validate
    for step in seen:
        assert step["exit_code"] == 0, step
        assert step["heavy"] == [], f"azdistill {' '.join(step['args'])} imported {step['heavy']}"


def test_short_help_option(runner):
    result = invoke(runner, "-h")
    assert result.exit_code == 0
    assert "Commands:" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(runner, command):
    result = invoke(runner, command, "--help")
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {command} [OPTIONS]" in result.stdout
    assert "--set KEY.PATH=VALUE" in result.stdout


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from azdistill.cli import cli\n"
        "result = CliRunner().invoke(cli, ['--help'])\n"
        "assert result.exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'mlflow', 'matplotlib', 'azure.ai.ml', 'azure.identity') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version(runner):
    result = invoke(runner, "--version")
    assert result.exit_code == 0
    assert result.stdout == f"azdistill, version {azdistill.__version__}\n"
    assert azdistill.__version__ == "0.1.0"


def test_module_entry_point_uses_the_program_name(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "azdistill", "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"azdistill, version {azdistill.__version__}\n"


def test_unknown_command_is_a_usage_error(runner):
    result = invoke(runner, "distil")
    assert result.exit_code == 2
    assert "No such command 'distil'" in result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------------
# validate on good input


@pytest.mark.parametrize("minimal_config", TASK_TYPES, indirect=True)
def test_validate_prints_counts_per_split(runner, minimal_config):
    task = minimal_config.read_text().split("type: ", 1)[1].split()[0]
    result = invoke(runner, "validate", minimal_config)
    assert result.exit_code == 0, result.output
    data = minimal_config.parent.resolve() / "data"
    assert result.stdout.splitlines() == [
        f"train: {data / 'train.jsonl'} — 4 records, 4 with reference answers",
        f"validation: {data / 'validation.jsonl'} — 2 records, 2 with reference answers",
        f"test: {data / 'test.jsonl'} — 3 records, 3 with reference answers",
        f"config OK: task {task}, teacher builtin, student pruned-teacher",
    ]
    # the fixture's splits are far below Azure ML's minimum: warned about, not refused
    minimum = AZURE_MINIMUM_RECORDS.get(task, AZURE_MINIMUM_DEFAULT)
    assert result.stderr.splitlines() == [tiny_warning(data / f"{split}.jsonl", count, minimum, task) for split, count in
                                          (("train", 4), ("validation", 2), ("test", 3))]


def test_validate_counts_records_without_references(runner, make_config):
    config = make_config("qa", counts={"test": 5}, references={"test": False, "validation": False})
    result = invoke(runner, "validate", config)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].endswith("— 4 records, 4 with reference answers")
    assert lines[1].endswith("— 2 records, 0 with reference answers")
    assert lines[2].endswith("— 5 records, 0 with reference answers")


def test_validate_applies_set_overrides(runner, make_config):
    config = make_config("nli")
    result = invoke(runner, "validate", config, "--set", "data.max_records=1", "--set", "task.labels=[positive, negative, mixed]")
    assert result.exit_code == 0, result.output
    assert [line.split(" — ")[1] for line in result.stdout.splitlines()[:3]] == ["1 records, 1 with reference answers"] * 3


def test_validate_does_not_create_the_workdir(runner, make_config, workdir):
    result = invoke(runner, "validate", make_config())
    assert result.exit_code == 0
    assert not workdir.exists()


# ---------------------------------------------------------------------------------------------------
# validate on bad input: exit 2, one line on stderr, no traceback


def test_malformed_json_line(runner, make_config):
    config = make_config()
    train = data_file(config, "train")
    write_rows(train, [GOOD_ROW, '{"messages": [oops]}', GOOD_ROW])
    result = invoke(runner, "validate", config)
    assert_user_error(result, f"error: {train.resolve()}:2: malformed JSON: Expecting value (column 15)")
    assert result.stdout == ""


def test_wrong_first_role(runner, make_config):
    config = make_config()
    train = data_file(config, "train")
    write_rows(train, [GOOD_ROW, {"messages": GOOD_ROW["messages"][1:]}])
    assert_user_error(invoke(runner, "validate", config), f"error: {train.resolve()}:2: the first message must be 'system', not 'user'")


def test_roles_out_of_order(runner, make_config):
    config = make_config()
    train = data_file(config, "train")
    system, user, _ = GOOD_ROW["messages"]
    write_rows(train, [{"messages": [system, user, user]}])
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {train.resolve()}:1: messages[2] is 'user' where 'assistant' was expected "
        "(system, then user and assistant alternating)",
    )


def test_unknown_role(runner, make_config):
    config = make_config()
    train = data_file(config, "train")
    system, _, _ = GOOD_ROW["messages"]
    write_rows(train, [{"messages": [system, {"role": "human", "content": "hi"}]}])
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {train.resolve()}:1: messages[1].role is 'human'; allowed: system, user, assistant",
    )


def test_empty_content(runner, make_config):
    config = make_config()
    test = data_file(config, "test")
    system, _, _ = GOOD_ROW["messages"]
    write_rows(test, [GOOD_ROW, GOOD_ROW, {"messages": [system, {"role": "user", "content": "   "}]}])
    result = invoke(runner, "validate", config)
    assert_user_error(result, f"error: {test.resolve()}:3: messages[1] (user) has empty content")
    # the splits before the bad one were reported on stdout
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["train", "validation"]


def test_multi_turn_record_for_a_single_turn_task(runner, make_config):
    config = make_config("math")
    train = data_file(config, "train")
    system, user, assistant = GOOD_ROW["messages"]
    write_rows(train, [{"messages": [system, user, assistant, user, assistant]}])
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {train.resolve()}:1: task 'math' takes one turn: [system, user] or [system, user, assistant]; "
        "got 5 messages (use task conversation or chat for multi-turn records)",
    )


def test_several_bad_lines_give_one_line_and_a_report_in_the_workdir(runner, make_config, workdir):
    config = make_config()
    train = data_file(config, "train")
    write_rows(train, ["{oops", GOOD_ROW, "[]"])
    result = invoke(runner, "validate", config)
    report = workdir / "validate-report.jsonl"
    assert_user_error(
        result,
        f"error: {train.resolve()}: 2 bad records; first at line 1: malformed JSON: Expecting property name enclosed in "
        f"double quotes (column 2); all of them in {report}",
    )
    assert [json.loads(line)["line"] for line in report.read_text(encoding="utf-8").splitlines()] == [1, 3]


def test_missing_data_file(runner, make_config):
    config = make_config()
    validation = data_file(config, "validation")
    validation.unlink()
    assert_user_error(invoke(runner, "validate", config), f"error: {validation.resolve()}: data file not found")


def test_data_file_with_the_wrong_extension(runner, make_config):
    config = make_config()
    json_file = config.parent / "data" / "train.json"
    json_file.write_text(json.dumps(GOOD_ROW) + "\n")
    assert_user_error(
        invoke(runner, "validate", config, "--set", f"data.train={json_file}"),
        f"error: {json_file.resolve()}: expected a .jsonl file (one JSON object per line)",
    )


def test_empty_data_file(runner, make_config):
    config = make_config()
    train = data_file(config, "train")
    train.write_text("")
    assert_user_error(invoke(runner, "validate", config), f"error: {train.resolve()}: no records (the file is empty)")


def test_missing_config_file(runner, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_user_error(invoke(runner, "validate", missing), f"error: {missing}: config file not found")


def test_unknown_task(runner, make_config):
    config = make_config("qa")
    config.write_text(config.read_text().replace("type: qa", "type: poetry"))
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {config}:{line_of(config, 'type: poetry')}: task.type: Input should be 'nli', 'qa', 'conversation', "
        "'math', 'summarization' or 'chat' (given: 'poetry')",
    )


def test_nli_without_labels(runner, make_config):
    config = make_config("nli")
    config.write_text(config.read_text().replace("  labels: [positive, negative]\n", ""))
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {config}:{line_of(config, 'task:')}: task: task.labels must list at least two labels for task type nli",
    )


def test_bad_config_key(runner, make_config):
    config = make_config(extra="traning:\n  epochs: 2\n")
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {config}:{line_of(config, 'traning:')}: unknown key 'traning'; allowed keys here: {TOP_LEVEL_KEYS}",
    )


def test_bad_config_value(runner, make_config):
    config = make_config(extra="synthesis:\n  temperature: 1.5\n")
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {config}:{line_of(config, 'temperature:')}: synthesis.temperature: "
        "Input should be less than or equal to 1 (given: 1.5)",
    )


def test_invalid_yaml(runner, make_config):
    config = make_config(extra="training:\n  epochs: [2\n")
    result = invoke(runner, "validate", config)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {config}:")
    assert ": not valid YAML: " in line


def test_config_that_is_a_list(runner, tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- name: x\n")
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {config}: expected a mapping of sections (task, data, teacher, ...), got list",
    )


def test_set_without_equals(runner, make_config):
    assert_user_error(
        invoke(runner, "validate", make_config(), "--set", "training.epochs"),
        "error: --set training.epochs: expected key.path=value, e.g. --set training.epochs=2",
    )


def test_set_of_an_unknown_key(runner, make_config):
    result = invoke(runner, "validate", make_config(), "--set", "training.epoch=2")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --set training.epoch: unknown key 'training.epoch'; allowed keys here: batch_size, ")


def test_set_with_a_bad_value(runner, make_config):
    assert_user_error(
        invoke(runner, "validate", make_config(), "--set", "training.epochs=0"),
        "error: --set training.epochs: training.epochs: Input should be greater than 0 (given: 0)",
    )


def test_data_file_that_is_not_utf8(runner, make_config):
    config = make_config()
    train = data_file(config, "train")
    train.write_bytes(json.dumps(GOOD_ROW).replace("Loved", "Caf\\u00e9").encode().replace(b"Caf\\u00e9", b"Caf\xe9") + b"\n")
    result = invoke(runner, "validate", config)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {train.resolve()}")


# ---------------------------------------------------------------------------------------------------
# Other commands fail on bad input before any model loads, and leave no stage output


def test_run_with_a_malformed_data_line_fails_fast_and_writes_nothing(runner, make_config, workdir, monkeypatch):
    config = make_config()
    test = data_file(config, "test")
    write_rows(test, [GOOD_ROW, "{not json"])

    def no_model_may_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    patch_everywhere(monkeypatch, azdistill.models.builtin, "resolve_teacher", no_model_may_load)
    patch_everywhere(monkeypatch, azdistill.models.students, "resolve_student", no_model_may_load)
    result = invoke(runner, "run", config)
    assert_user_error(result, f"error: {test.resolve()}:2: malformed JSON: Expecting property name enclosed in double quotes (column 2)")
    assert not (workdir / "runs").exists()


def test_run_with_a_bad_config_value_writes_nothing(runner, make_config, workdir):
    config = make_config()
    assert_user_error(
        invoke(runner, "run", config, "--set", "training.learning_rate=2"),
        "error: --set training.learning_rate: training.learning_rate: Input should be less than 1 (given: 2)",
    )
    assert not workdir.exists()


def test_run_with_a_missing_teacher_folder_fails_before_loading_anything(runner, make_config, workdir, tmp_path):
    missing = tmp_path / "no-such-teacher"
    result = invoke(runner, "run", make_config(), "--set", f"teacher.model={missing}")
    assert_user_error(
        result,
        f"error: teacher.model: {missing} is not a folder; give 'builtin'/'pruned-teacher' or a local model folder",
    )
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize("command", ["synthesize", "finetune", "evaluate", "ui"])
def test_other_commands_report_config_errors_with_exit_2(runner, make_config, workdir, command):
    assert_user_error(
        invoke(runner, command, make_config(), "--set", "colour=blue"),
        f"error: --set colour: unknown key 'colour'; allowed keys here: {TOP_LEVEL_KEYS}",
    )
    assert not workdir.exists()


@pytest.mark.parametrize("command", ["run", "synthesize", "finetune", "evaluate", "ui", "validate"])
def test_every_command_reports_a_missing_config(runner, tmp_path, command):
    missing = tmp_path / "missing.yaml"
    assert_user_error(invoke(runner, command, missing), f"error: {missing}: config file not found")


def test_finetune_before_synthesize_says_what_to_run(runner, make_config, workdir):
    result = invoke(runner, "finetune", make_config())
    assert_user_error(
        result,
        f"error: {workdir / 'runs' / 'unit-test' / 'synthesize'} holds no finished synthesize stage: "
        "run `azdistill synthesize` with this config first (or `azdistill run`)",
    )
    assert not workdir.exists()


def test_ui_without_runs_says_so(runner, make_config, workdir):
    config = make_config(extra="")
    config.write_text(config.read_text().replace("  enabled: false\n", "  enabled: true\n"))
    assert_user_error(
        invoke(runner, "ui", config),
        f"error: no runs yet: {(workdir / 'mlflow.db').resolve()} does not exist; run `azdistill run` first",
    )


def test_finetune_after_an_interrupted_synthesize_says_what_to_run(runner, make_config, workdir):
    # An interrupted synthesize has written train.jsonl but not finished the validation split.
    synthetic = workdir / "runs" / "unit-test" / "synthesize"
    synthetic.mkdir(parents=True)
    (synthetic / "train.jsonl").write_text("")
    result = invoke(runner, "finetune", make_config())
    assert_user_error(
        result,
        f"error: {synthetic} holds no finished synthesize stage: "
        "run `azdistill synthesize` with this config first (or `azdistill run`)",
    )


def test_evaluate_before_finetune_fails_before_loading_models(runner, make_config, workdir):
    result = invoke(runner, "evaluate", make_config())
    assert_user_error(
        result,
        f"error: {workdir / 'runs' / 'unit-test' / 'finetune'} holds no finished finetune stage: "
        "run `azdistill finetune` with this config first (or `azdistill run`)",
    )
    assert not (workdir / "runs").exists()


def test_synthesize_with_a_malformed_data_line_fails_before_touching_the_teacher(runner, make_config, workdir):
    config = make_config()
    train = data_file(config, "train")
    write_rows(train, ["{not json"])
    assert_user_error(
        invoke(runner, "synthesize", config),
        f"error: {train.resolve()}:1: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
    )
    assert not (workdir / "runs").exists()


# ---------------------------------------------------------------------------------------------------
# The dispatcher's other exit statuses


def test_a_failed_stage_exits_1_with_one_line(runner, make_config, monkeypatch):
    def fail(*args, **kwargs):
        raise StageFailed("only 2 of 10 teacher answers passed the checks")

    monkeypatch.setattr("azdistill.config.loading.load_config", fail)
    result = invoke(runner, "validate", make_config())
    assert result.exit_code == 1
    assert result.stderr == "failed: only 2 of 10 teacher answers passed the checks\n"
    assert "Traceback" not in result.output


def test_an_interrupt_exits_130_with_a_hint(runner, make_config, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("azdistill.config.loading.load_config", interrupt)
    result = invoke(runner, "validate", make_config())
    assert result.exit_code == 130
    assert result.stderr == "interrupted; run the same command again to continue where it stopped\n"


def test_the_tripwire_fixture_works(runner):
    with pytest.raises(ModelLoaded):
        azdistill.models.builtin.builtin_teacher_path()
    with pytest.raises(ModelLoaded):
        azdistill.models.students.make_pruned_student(Path("t"), 0.5, Path("s"))


# ---------------------------------------------------------------------------------------------------
# validate: nothing lost, nothing trusted blindly (bad input: one line and exit 2, nothing half-written)


def test_validate_refuses_a_repeated_section(runner, make_config):
    config = make_config(extra="training:\n  learning_rate: 0.01\ntraining:\n  epochs: 2\n")
    first, second = line_of(config, "training:"), line_of(config, "epochs: 2") - 1
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {config}:{second}: duplicate key 'training' (first at line {first}); merge the two sections",
    )


def test_validate_refuses_a_workdir_that_is_a_file(runner, make_config, workdir):
    workdir.write_text("not a folder")
    config = make_config()
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {config}:{line_of(config, 'workdir:')}: workdir: {workdir} is a file, not a folder; set workdir to a "
        f"folder or to a path that does not exist yet (given: {str(workdir)!r})",
    )


def test_validate_points_at_the_line_missing_a_colon(runner, make_config):
    config = make_config()
    config.write_text(config.read_text().replace("  type: nli", "  type nli"))
    result = invoke(runner, "validate", config)
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {config}:{line_of(config, 'type nli')}: not valid YAML: "), line
    assert result.exit_code == 2


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_validate_says_what_a_data_path_that_is_not_a_file_is(runner, make_config, kind):
    config = make_config()
    train = data_file(config, "train")
    train.unlink()
    if kind == "directory":
        train.mkdir()
        expected = "is a directory, not a data file; give the path of a .jsonl file"
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no named pipes on this platform")
        os.mkfifo(train)
        expected = "is not a regular file (a named pipe); give the path of a .jsonl file"
    assert_user_error(invoke(runner, "validate", config), f"error: {train.resolve()}: {expected}")


def test_validate_gives_one_line_for_25_bad_records_and_writes_only_the_report(runner, make_config, workdir):
    config = make_config()
    train = data_file(config, "train")
    write_rows(train, distinct_rows(2) + ['{"messages": [oops]}'] * 25)
    data_before = sorted(path.name for path in train.parent.iterdir())
    result = invoke(runner, "validate", config)
    report = workdir / "validate-report.jsonl"
    assert_user_error(
        result,
        f"error: {train.resolve()}: 25 bad records; first at line 3: malformed JSON: Expecting value (column 15); "
        f"all of them in {report}",
    )
    rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert [row["line"] for row in rows] == list(range(3, 28))
    assert {row["file"] for row in rows} == {str(train.resolve())}
    assert sorted(path.name for path in workdir.iterdir()) == ["validate-report.jsonl"]  # nothing else, no temporary
    assert sorted(path.name for path in train.parent.iterdir()) == data_before  # nothing beside the user's data


def test_a_later_clean_validate_removes_the_old_report(runner, make_config, workdir):
    config = make_config()
    train = data_file(config, "train")
    good = train.read_text(encoding="utf-8")
    write_rows(train, ["{bad", "{bad"])
    assert invoke(runner, "validate", config).exit_code == 2
    assert (workdir / "validate-report.jsonl").exists()
    train.write_text(good, encoding="utf-8")
    assert invoke(runner, "validate", config).exit_code == 0
    assert not (workdir / "validate-report.jsonl").exists()


def test_validate_refuses_an_over_long_prompt_with_its_line(runner, make_config):
    config = make_config()
    validation = data_file(config, "validation")
    system, user, assistant = GOOD_ROW["messages"]
    write_rows(validation, [GOOD_ROW, {"messages": [system, {**user, "content": "x" * 200_000}, assistant]}])
    assert_user_error(
        invoke(runner, "validate", config),
        f"error: {validation.resolve()}:2: the prompt has {len(system['content']) + 200_000:,} characters, more than "
        "data.max_prompt_chars (100,000); shorten the record or raise data.max_prompt_chars",
    )
    assert invoke(runner, "validate", config, "--set", "data.max_prompt_chars=300000").exit_code == 0


def test_validate_warns_about_duplicate_prompts(runner, make_config):
    config = make_config()
    train = data_file(config, "train")
    write_rows(train, [GOOD_ROW] * 24 + distinct_rows(65))
    result = invoke(runner, "validate", config)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith("— 89 records, 89 with reference answers")
    assert (
        f"warning: {train.resolve()}: 23 records repeat an earlier prompt, first at lines 2, 3, 4, 5, 6 "
        "(line 2 repeats line 1); remove the copies unless they are meant to weigh more"
    ) in result.stderr.splitlines()
    assert not any(str(train.resolve()) in line and "fewer than" in line for line in result.stderr.splitlines())


@pytest.mark.parametrize("task", ["nli", "math"])
def test_validate_warns_below_azure_mls_minimum_per_split(runner, make_config, task):
    minimum = AZURE_MINIMUM_RECORDS.get(task, AZURE_MINIMUM_DEFAULT)
    config = make_config(task)
    train, validation = data_file(config, "train"), data_file(config, "validation")
    write_rows(train, distinct_rows(minimum))
    write_rows(validation, distinct_rows(minimum - 1))
    result = invoke(runner, "validate", config)
    assert result.exit_code == 0, result.output
    warnings = result.stderr.splitlines()
    assert tiny_warning(validation.resolve(), minimum - 1, minimum, task) in warnings
    assert not any(str(train.resolve()) in line for line in warnings)


def test_validate_warns_about_a_one_record_training_set(runner, make_config):
    config = make_config()
    train = data_file(config, "train")
    write_rows(train, [GOOD_ROW])
    result = invoke(runner, "validate", config)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == tiny_warning(train.resolve(), 1, AZURE_MINIMUM_DEFAULT, "nli")


def test_validate_streams_the_data_instead_of_reading_it_whole(runner, make_config, monkeypatch):
    import azdistill.data.records

    def whole_file(*args, **kwargs):
        raise AssertionError("validate read a whole split into memory")

    monkeypatch.setattr(azdistill.data.records, "read_records", whole_file)
    assert invoke(runner, "validate", make_config()).exit_code == 0
