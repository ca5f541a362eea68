"""Tests for azdistill.config: validation, `--set` overrides, path resolution and one-line error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from azdistill.config.loading import config_to_params, load_config, parse_override
from azdistill.config.schema import DistillConfig
from azdistill.config.sections import DEMO_CONFIG, PROJECT_ROOT, TASK_TYPES, TrackingConfig, TrainingConfig
from azdistill.errors import UserError

# Line numbers below are the ones error messages must name.
BASE = """\
name: demo-test
task:
  type: nli
  labels: [positive, negative]
data:
  train: data/train.jsonl
  validation: data/validation.jsonl
  test: data/test.jsonl
training:
  learning_rate: 0.001
  batch_size: 4
synthesis:
  temperature: 0.5
"""
TOP_LEVEL_KEYS = "azure, data, evaluation, name, runtime, student, synthesis, task, teacher, tracking, training, workdir"
TRAINING_KEYS = (
    "batch_size, batching, bf16, epochs, freeze_embeddings, gradient_accumulation_steps, gradient_checkpointing, hidden_loss, "
    "hidden_weight, kd_beta, kd_loss, kd_temperature, kd_weight, learning_rate, logging_steps, lora, lr_scheduler, "
    "max_length, method, on_policy_max_new_tokens, on_policy_ratio, on_policy_temperature, save_steps, seed, "
    "sft_weight, shared_prefix, topk_weight, warmup_ratio, weight_decay"
)


@pytest.fixture
def write_config(tmp_path):
    def write(text: str = BASE, name: str = "cfg.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def user_error(path, overrides=()) -> str:
    """The message of the UserError that loading must raise; it must be one line."""
    with pytest.raises(UserError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert "\n" not in message, f"message spans several lines: {message!r}"
    return message


# ---------------------------------------------------------------------------------------------------
# Valid configs


def test_base_config_loads_with_its_values_and_defaults(write_config):
    config = load_config(write_config())
    assert isinstance(config, DistillConfig)
    assert config.name == "demo-test"
    assert config.task.type == "nli"
    assert config.task.labels == ["positive", "negative"]
    assert config.training.learning_rate == 0.001
    assert config.training.batch_size == 4
    assert config.synthesis.temperature == 0.5
    # untouched sections keep their defaults
    assert config.training.epochs == 3.0
    assert config.teacher.model == "builtin"
    assert config.student.model == "pruned-teacher"
    assert config.tracking.enabled is True
    assert config.workdir == Path(".azdistill")
    assert config.run_dir == Path(".azdistill") / "runs" / "demo-test"
    assert config.stage_dir("synthesize") == Path(".azdistill") / "runs" / "demo-test" / "synthesize"
    assert config.registered_model_name == "demo-test-student"
    assert config.experiment_name == "demo-test"


@pytest.mark.parametrize("task", TASK_TYPES)
def test_every_task_type_loads_from_the_shared_fixture(make_config, task):
    config = load_config(make_config(task))
    assert config.task.type == task
    assert config.task.labels == (["positive", "negative"] if task == "nli" else None)
    assert config.tracking.enabled is False


def test_task_types_are_the_documented_six():
    assert set(TASK_TYPES) == {"nli", "qa", "conversation", "math", "summarization", "chat"}


# ---------------------------------------------------------------------------------------------------
# Mistakes in the file: one line naming file, line, key, what was given and what is allowed


def test_unknown_top_level_key_lists_allowed_keys(write_config):
    path = write_config(BASE + "colour: blue\n")
    assert user_error(path) == f"{path}:14: unknown key 'colour'; allowed keys here: {TOP_LEVEL_KEYS}"


def test_unknown_nested_key_names_full_key_and_section_keys(write_config):
    path = write_config(BASE.replace("  batch_size: 4\n", "  batch_size: 4\n  learning_rte: 0.1\n"))
    assert user_error(path) == f"{path}:12: unknown key 'training.learning_rte'; allowed keys here: {TRAINING_KEYS}"
    assert TRAINING_KEYS.split(", ") == sorted(TrainingConfig.model_fields)


def test_unknown_key_two_levels_deep(write_config):
    path = write_config(BASE + "evaluation:\n  promotion:\n    min_agrement: 0.5\n")
    assert user_error(path) == (
        f"{path}:16: unknown key 'evaluation.promotion.min_agrement'; "
        "allowed keys here: beat_baseline, champion_metric, max_latency_ratio, min_agreement, min_quality_retained"
    )


def test_wrong_type_names_line_key_and_given_value(write_config):
    path = write_config(BASE.replace("batch_size: 4", "batch_size: four"))
    message = user_error(path)
    assert message.startswith(f"{path}:11: training.batch_size: Input should be a valid integer")
    assert message.endswith("(given: 'four')")


def test_out_of_range_value_names_the_limit(write_config):
    path = write_config(BASE.replace("temperature: 0.5", "temperature: 1.5"))
    assert user_error(path) == (
        f"{path}:13: synthesis.temperature: Input should be less than or equal to 1 (given: 1.5)"
    )


def test_unknown_choice_of_a_literal_lists_the_choices(write_config):
    path = write_config(BASE.replace("  batch_size: 4\n", "  batch_size: 4\n  lr_scheduler: exponential\n"))
    message = user_error(path)
    assert message.startswith(f"{path}:12: training.lr_scheduler: Input should be ")
    for choice in ("'cosine'", "'linear'", "'constant'", "'constant_with_warmup'"):
        assert choice in message
    assert message.endswith("(given: 'exponential')")


def test_unknown_task_type_lists_all_task_types(write_config):
    path = write_config(BASE.replace("type: nli", "type: translation"))
    message = user_error(path)
    assert message == (
        f"{path}:3: task.type: Input should be 'nli', 'qa', 'conversation', 'math', 'summarization' or 'chat' "
        "(given: 'translation')"
    )


@pytest.mark.parametrize(
    "labels_line",
    ["", "  labels: [positive]\n", "  labels: []\n", "  labels: null\n"],
    ids=["missing", "one", "empty", "null"],
)
def test_nli_needs_at_least_two_labels(write_config, labels_line):
    path = write_config(BASE.replace("  labels: [positive, negative]\n", labels_line))
    assert user_error(path) == f"{path}:2: task: task.labels must list at least two labels for task type nli"


def test_nli_labels_must_be_distinct_ignoring_case(write_config):
    path = write_config(BASE.replace("[positive, negative]", "[Positive, positive]"))
    assert user_error(path) == f"{path}:2: task: task.labels must be distinct (case-insensitive)"


@pytest.mark.parametrize("task", [t for t in TASK_TYPES if t != "nli"])
def test_labels_on_a_non_nli_task_are_refused(write_config, task):
    path = write_config(BASE.replace("type: nli", f"type: {task}"))
    assert user_error(path) == f"{path}:2: task: task.labels is only used by task type nli, not {task}"


def test_missing_required_section_is_named(write_config):
    text = "".join(line for line in BASE.splitlines(keepends=True) if not line.startswith(("data", "  train", "  validation", "  test")))
    path = write_config(text)
    assert user_error(path) == f"{path}: missing required key 'data'"


def test_missing_required_nested_key_is_named(write_config):
    path = write_config(BASE.replace("  test: data/test.jsonl\n", ""))
    assert user_error(path) == f"{path}:5: missing required key 'data.test'"


def test_several_problems_report_the_first_and_count_the_rest(write_config):
    path = write_config(BASE.replace("temperature: 0.5", "temperature: 1.5").replace("batch_size: 4", "batch_size: 0"))
    message = user_error(path)
    # errors come in field order (synthesis before training), not in file order
    assert message == (
        f"{path}:13: synthesis.temperature: Input should be less than or equal to 1 (given: 1.5) (and 1 more problem)"
    )


def test_empty_file_reports_the_missing_keys(write_config):
    path = write_config("")
    assert user_error(path) == f"{path}: missing required key 'name' (and 2 more problems)"


def test_invalid_yaml_names_the_line(write_config):
    path = write_config(BASE.replace("  validation: data/validation.jsonl", "  validation: data/validation.jsonl: x"))
    assert user_error(path) == f"{path}:7: not valid YAML: mapping values are not allowed here"


def test_invalid_yaml_with_a_tab_names_the_line(write_config):
    path = write_config(BASE.replace("  batch_size: 4", "\tbatch_size: 4"))
    message = user_error(path)
    assert message.startswith(f"{path}:11: not valid YAML: ")
    assert "cannot start any token" in message


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert user_error(path) == f"{path}: config file not found"


def test_a_folder_is_not_a_config_file(tmp_path):
    assert user_error(tmp_path) == f"{tmp_path}: is a directory, not a config file; give the path of a YAML file"


@pytest.mark.parametrize("text, kind", [("- task\n- data\n", "list"), ("just words\n", "str"), ("42\n", "int")])
def test_config_that_is_not_a_mapping(write_config, text, kind):
    path = write_config(text)
    assert user_error(path) == f"{path}: expected a mapping of sections (task, data, teacher, ...), got {kind}"


@pytest.mark.parametrize("name", ["my model", "-leading-dash", "a/b", "x" * 65, ""])
def test_bad_name_is_refused(write_config, name):
    path = write_config(BASE.replace("name: demo-test", f"name: '{name}'"))
    assert user_error(path) == (
        f"{path}:1: name: use letters, digits, '.', '_' or '-' (at most 64, starting with a letter or digit) "
        f"(given: {name!r})"
    )


@pytest.mark.parametrize("name", ["a", "sentiment-demo", "v1.2_final", "X" * 64])
def test_good_names_are_accepted(write_config, name):
    assert load_config(write_config(BASE.replace("name: demo-test", f"name: '{name}'"))).name == name


def test_non_utf8_config_is_a_user_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.replace("demo-test", "caf\xe9").encode("latin-1"))
    message = user_error(path)
    assert message.startswith(f"{path}")
    assert "UTF-8" in message or "utf-8" in message


# ---------------------------------------------------------------------------------------------------
# --set overrides


def test_override_changes_a_valid_value(write_config):
    path = write_config()
    config = load_config(path, ["training.batch_size=16", "synthesis.temperature=0", "name=other-name"])
    assert config.training.batch_size == 16
    assert config.synthesis.temperature == 0.0
    assert config.name == "other-name"
    assert config.training.learning_rate == 0.001  # neighbours untouched


@pytest.mark.parametrize(
    "override, attribute, expected",
    [
        ("training.epochs=2.5", ("training", "epochs"), 2.5),
        ("tracking.enabled=false", ("tracking", "enabled"), False),
        ("evaluation.reference_baseline=no", ("evaluation", "reference_baseline"), False),
        ("task.labels=[good, bad, neutral]", ("task", "labels"), ["good", "bad", "neutral"]),
        ("data.max_records=null", ("data", "max_records"), None),
        ("data.max_records=5", ("data", "max_records"), 5),
        ("synthesis.system_prompt=Answer briefly.", ("synthesis", "system_prompt"), "Answer briefly."),
        ("evaluation.promotion.min_agreement=0.25", ("evaluation", "promotion", "min_agreement"), 0.25),
        ("student.keep_layers = 0.5", ("student", "keep_layers"), 0.5),
    ],
)
def test_override_values_are_read_as_yaml(write_config, override, attribute, expected):
    node = load_config(write_config(), [override])
    for part in attribute:
        node = getattr(node, part)
    assert node == expected
    assert type(node) is type(expected)


def test_later_override_of_the_same_key_wins(write_config):
    assert load_config(write_config(), ["training.epochs=2", "training.epochs=7"]).training.epochs == 7


def test_override_can_add_a_missing_section(write_config):
    config = load_config(write_config(), ["teacher.model=builtin", "tracking.experiment=exp-1"])
    assert config.tracking.experiment == "exp-1"
    assert config.experiment_name == "exp-1"


def test_override_of_an_unknown_nested_key(write_config):
    assert user_error(write_config(), ["training.epoch=2"]) == (
        f"--set training.epoch: unknown key 'training.epoch'; allowed keys here: {TRAINING_KEYS}"
    )


def test_override_of_an_unknown_top_level_key(write_config):
    assert user_error(write_config(), ["colour=blue"]) == (
        f"--set colour: unknown key 'colour'; allowed keys here: {TOP_LEVEL_KEYS}"
    )


def test_override_with_a_bad_value_blames_the_override_not_the_file(write_config):
    # training.batch_size is on line 11 of the file, but the bad value comes from --set
    assert user_error(write_config(), ["training.batch_size=-1"]) == (
        "--set training.batch_size: training.batch_size: Input should be greater than 0 (given: -1)"
    )


def test_override_with_a_value_of_the_wrong_type(write_config):
    message = user_error(write_config(), ["synthesis.temperature=hot"])
    assert message.startswith("--set synthesis.temperature: synthesis.temperature: Input should be a valid number")
    assert message.endswith("(given: 'hot')")


def test_override_of_an_unknown_task_type(write_config):
    message = user_error(write_config(), ["task.type=poetry"])
    assert message == (
        "--set task.type: task.type: Input should be 'nli', 'qa', 'conversation', 'math', 'summarization' "
        "or 'chat' (given: 'poetry')"
    )


def test_override_without_equals_sign(write_config):
    assert user_error(write_config(), ["training.epochs"]) == (
        "--set training.epochs: expected key.path=value, e.g. --set training.epochs=2"
    )


@pytest.mark.parametrize("override", [".epochs=2", "training.=2", "training..epochs=2", "=2"])
def test_override_with_an_empty_key_part(write_config, override):
    key = override.split("=", 1)[0]
    assert user_error(write_config(), [override]) == (
        f"--set {override}: '{key}' is not a key path; use e.g. training.epochs=2"
    )


def test_override_below_a_plain_value(write_config):
    assert user_error(write_config(), ["name.first=x"]) == (
        "--set name.first=x: cannot set 'name.first': 'name' holds a value, not a section"
    )


def test_override_value_that_is_not_yaml_is_kept_as_text(write_config):
    # "[oops" is not valid YAML; it is passed on as a string and the name check refuses it
    assert user_error(write_config(), ["name=[oops"]) == (
        "--set name: name: use letters, digits, '.', '_' or '-' (at most 64, starting with a letter or digit) "
        "(given: '[oops')"
    )


def test_parse_override():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a.b=") == ("a.b", "")
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=null") == ("a.b", None)
    with pytest.raises(UserError, match=r"^--set a\.b: expected key\.path=value"):
        parse_override("a.b")


@pytest.mark.parametrize("override", ["task.labels=[positive]", "task.labels=[positive, Positive]"])
def test_bad_override_below_or_above_the_error_blames_the_override(write_config, override):
    message = user_error(write_config(), [override])
    assert message.startswith("--set task.labels"), message


# ---------------------------------------------------------------------------------------------------
# Paths and the embedded demo


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    project = tmp_path / "deep" / "project"
    project.mkdir(parents=True)
    path = project / "cfg.yaml"
    absolute_test = tmp_path / "elsewhere" / "test.jsonl"
    path.write_text(
        BASE.replace("train: data/train.jsonl", "train: ../shared/train.jsonl").replace(
            "test: data/test.jsonl", f"test: {absolute_test}"
        ),
        encoding="utf-8",
    )
    somewhere_else = tmp_path / "cwd"
    somewhere_else.mkdir()
    monkeypatch.chdir(somewhere_else)
    config = load_config(Path("..") / "deep" / "project" / "cfg.yaml")
    assert config.data.train == (tmp_path / "deep" / "shared" / "train.jsonl").resolve()
    assert config.data.validation == (project / "data" / "validation.jsonl").resolve()
    assert config.data.test == absolute_test
    assert all(getattr(config.data, split).is_absolute() for split in ("train", "validation", "test"))


def test_a_data_path_given_with_set_resolves_against_the_current_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    path = project / "cfg.yaml"
    path.write_text(BASE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    config = load_config(path, ["data.train=mine/train.jsonl"])
    assert config.data.train == (tmp_path / "mine" / "train.jsonl").resolve()
    assert config.data.validation == (project / "data" / "validation.jsonl").resolve()


def test_relative_model_folder_resolves_against_the_config_folder_when_it_exists(write_config, tmp_path):
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    path = write_config(BASE + "teacher:\n  model: models/teacher\nstudent:\n  model: models/missing\n")
    config = load_config(path)
    assert config.teacher.model == str((tmp_path / "models" / "teacher").resolve())
    assert config.student.model == "models/missing"  # left for the model resolver to report


def test_embedded_demo_config_loads_and_points_at_the_bundled_data():
    config = load_config(None)
    assert DEMO_CONFIG.is_file()
    assert config.name == "sentiment-demo"
    assert config.task.type == "nli"
    assert config.task.labels == ["positive", "negative"]
    sentiment = (PROJECT_ROOT / "data" / "sentiment").resolve()
    for split in ("train", "validation", "test"):
        path = getattr(config.data, split)
        assert path == sentiment / f"{split}.jsonl"
        assert path.is_file(), f"{path} is missing"


def test_embedded_demo_config_accepts_overrides():
    config = load_config(None, ["training.epochs=1", "data.max_records=4"])
    assert config.training.epochs == 1
    assert config.data.max_records == 4


def test_embedded_demo_config_errors_name_the_demo():
    with pytest.raises(UserError) as caught:
        load_config(None, ["training.nope=1"])
    assert str(caught.value).startswith("--set training.nope: unknown key 'training.nope'")


# ---------------------------------------------------------------------------------------------------
# MLflow params


def test_config_to_params_flattens_dotted_keys_to_strings(write_config):
    config = load_config(write_config(), ["evaluation.promotion.min_agreement=0.75"])
    params = config_to_params(config)
    assert params["training.learning_rate"] == "0.001"
    assert params["training.batch_size"] == "4"
    assert params["synthesis.temperature"] == "0.5"
    assert params["evaluation.promotion.min_agreement"] == "0.75"
    assert params["evaluation.promotion.beat_baseline"] == "True"
    assert params["task.type"] == "nli"
    assert params["task.labels"] == "['positive', 'negative']"
    assert not any(key.startswith(("tracking.", "azure")) for key in params)  # where runs go, and possibly credentials
    assert params["name"] == "demo-test"
    assert params["data.train"] == str(config.data.train)
    assert all(isinstance(value, str) for value in params.values())
    # one entry per leaf: no section appears as a key of its own
    assert "training" not in params and "evaluation.promotion" not in params
    # the optional azure section counts as one leaf and is left out like tracking
    assert len(params) == _count_leaves(DistillConfig) - _count_leaves(TrackingConfig) - 1


def _count_leaves(model) -> int:
    """Fields of a config model, counting a nested section's fields instead of the section itself."""
    from pydantic import BaseModel

    total = 0
    for field in model.model_fields.values():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            total += _count_leaves(annotation)
        else:
            total += 1
    return total


# ---------------------------------------------------------------------------------------------------
# Duplicate keys: refused at any depth, naming both lines (a second section used to replace the first silently)


def test_a_repeated_section_is_refused_naming_both_lines(write_config):
    # The second `training:` used to win: learning_rate went back to its default without a word.
    path = write_config(BASE + "training:\n  epochs: 2\n")
    assert user_error(path) == f"{path}:14: duplicate key 'training' (first at line 9); merge the two sections"


def test_a_repeated_key_inside_a_section_is_refused(write_config):
    path = write_config(BASE.replace("  batch_size: 4\n", "  batch_size: 4\n  learning_rate: 0.1\n"))
    assert user_error(path) == (
        f"{path}:12: duplicate key 'training.learning_rate' (first at line 10); keep one of them"
    )


def test_a_repeated_key_two_levels_deep_is_refused(write_config):
    path = write_config(BASE + "teacher:\n  auth:\n    method: entra\n    scope: a\n    method: none\n")
    assert user_error(path) == f"{path}:18: duplicate key 'teacher.auth.method' (first at line 16); keep one of them"


def test_a_repeated_top_level_value_is_refused(write_config):
    path = write_config(BASE + "name: other\n")
    assert user_error(path) == f"{path}:14: duplicate key 'name' (first at line 1); keep one of them"


def test_overrides_of_the_same_key_are_not_duplicates(write_config):
    config = load_config(write_config(), ["training.learning_rate=0.1", "training.learning_rate=0.2"])
    assert config.training.learning_rate == 0.2


def test_a_duplicate_key_inside_an_override_value_is_refused(write_config):
    assert user_error(write_config(), ["task={type: qa, type: nli}"]) == (
        "--set task: duplicate key 'type' in the value; keep one of them"
    )


def test_yaml_merge_keys_are_not_duplicates():
    import yaml

    from azdistill.config.loading import StrictLoader

    text = "base: &b {epochs: 1, seed: 2}\ntraining:\n  <<: *b\n  epochs: 3\n"
    assert yaml.load(text, Loader=StrictLoader) == {"base": {"epochs": 1, "seed": 2}, "training": {"epochs": 3, "seed": 2}}


# ---------------------------------------------------------------------------------------------------
# YAML syntax errors name the line a person would fix (PyYAML's problem_mark is often a line or more late)

# (what was done to BASE, the line to report, a word the message must contain)
SYNTAX_MISTAKES = {
    # "type nli" and the next line are read as one key: PyYAML complains at the colon of line 4
    "missing colon": (("  type: nli", "  type nli"), 3, "':'"),
    "missing colon on a section": (("task:\n", "task\n"), 2, "':'"),
    # an unclosed quote runs to the end of the file
    "unclosed quote": (("  type: nli", '  type: "nli'), 3, "quote"),
    # an unclosed bracket is noticed on the next line
    "unclosed bracket": (("labels: [positive, negative]", "labels: [positive, negative"), 4, "'['"),
    "unclosed brace": (("  temperature: 0.5", "  temperature: {a: 1\nname2: x"), 13, "'{'"),
    "tab": (("  batch_size: 4", "\tbatch_size: 4"), 11, "tab"),
    "over-indented key": (("  batch_size: 4", "   batch_size: 4"), 11, "mapping values"),
    "under-indented key": (("  learning_rate: 0.001\n  batch_size: 4", "    learning_rate: 0.001\n  batch_size: 4"), 11, "block"),
}


@pytest.mark.parametrize("mistake", SYNTAX_MISTAKES)
def test_yaml_syntax_errors_name_the_line_to_fix(write_config, mistake):
    (old, new), line, word = SYNTAX_MISTAKES[mistake]
    assert old in BASE
    path = write_config(BASE.replace(old, new, 1))
    message = user_error(path)
    assert message.startswith(f"{path}:{line}: not valid YAML: "), message
    assert word in message, message


# ---------------------------------------------------------------------------------------------------
# workdir: a file, a path inside a file or a folder that cannot be written is refused when the config loads


def test_a_workdir_that_is_a_file_is_refused(write_config, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("x")
    path = write_config(BASE + f"workdir: {taken}\n")
    assert user_error(path) == (
        f"{path}:14: workdir: {taken} is a file, not a folder; set workdir to a folder or to a path that does not exist yet"
        f" (given: {str(taken)!r})"
    )


def test_a_workdir_inside_a_file_is_refused(write_config, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("x")
    message = user_error(write_config(), [f"workdir={taken / 'work'}"])
    assert message == (
        f"--set workdir: workdir: {taken} is a file, so no folder can be made inside it; set workdir to a folder"
        f" (given: {str(taken / 'work')!r})"
    )


def test_a_workdir_that_cannot_be_written_is_refused(write_config, tmp_path, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # The tests may run as root, for whom every folder is writable: the permission is faked for this one folder.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    message = user_error(write_config(), [f"workdir={locked / 'work'}"])
    assert message == (
        f"--set workdir: workdir: {locked} is not writable, so {locked / 'work'} cannot be created; "
        f"set workdir to a folder you can write to (given: {str(locked / 'work')!r})"
    )


def test_a_workdir_that_does_not_exist_yet_is_fine_and_is_not_created(write_config, tmp_path):
    config = load_config(write_config(BASE + f"workdir: {tmp_path / 'a' / 'b'}\n"))
    assert config.workdir == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------------
# data.max_prompt_chars


def test_max_prompt_chars_has_a_sane_default_and_can_be_set(write_config):
    assert load_config(write_config()).data.max_prompt_chars == 100_000
    assert load_config(write_config(), ["data.max_prompt_chars=5000"]).data.max_prompt_chars == 5000
    assert user_error(write_config(), ["data.max_prompt_chars=0"]).startswith(
        "--set data.max_prompt_chars: data.max_prompt_chars: Input should be greater than 0"
    )

