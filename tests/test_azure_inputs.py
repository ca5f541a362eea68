"""The settings users tune as typed pipeline inputs, through the real azure-ai-ml SDK with the workspace faked at
the HTTP layer (tests/azure_wire.py).

The config file stays the single source of defaults: each pipeline input's value is the config's when the pipeline
is built. The studio or a schedule can change the inputs without a new file; each step passes them to its
`azdistill` command as `--set key=value` after the config, so inside the step the input wins. The assertions read
what went over the wire, then run each step's command line the way the job would, with the inputs substituted.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import pytest
import yaml
from click.testing import CliRunner
from test_azure_submit import AZURE_SECTION, TEACHER_KEY, bound, component_payloads, component_version, job_payload, submit, wire  # noqa: F401

import azdistill.config.loading as config_module
from azdistill.azure import build, injob
from azdistill.cli import cli
from azdistill.config.loading import load_config
from azdistill.config.sections import PROJECT_ROOT, SynthesisConfig, TrainingConfig

# The tuned settings, different from the schema's defaults so that the config's own values are seen.
TUNED = """
synthesis:
  temperature: 0.3
  max_new_tokens: 64
training:
  epochs: 3
  learning_rate: 0.0001
  kd_weight: 0.25
  method: lora
"""
# pipeline input -> (its config key, the value sent: the config's)
SETTINGS = {
    "synthesis_temperature": ("synthesis.temperature", "0.3"),
    "synthesis_max_new_tokens": ("synthesis.max_new_tokens", "64"),
    "training_epochs": ("training.epochs", "3.0"),
    "training_learning_rate": ("training.learning_rate", "0.0001"),
    "training_kd_weight": ("training.kd_weight", "0.25"),
    "training_topk_weight": ("training.topk_weight", "0.0"),
    "training_method": ("training.method", "lora"),
}
SYNTHESIS = ("synthesis_temperature", "synthesis_max_new_tokens")
TRAINING = ("training_epochs", "training_learning_rate", "training_kd_weight", "training_topk_weight", "training_method")
# step -> the settings it takes (validate checks them all before any teacher call is paid for)
STEP_SETTINGS = {
    "validate": tuple(SETTINGS),
    "synthesize": SYNTHESIS,
    "synthesize_shards": SYNTHESIS,
    "finetune": TRAINING,
    "finetune_references": TRAINING,
    "evaluate": (),
    "merge_shards": (),
    "register": (),
}
# What the studio or a schedule sets instead: each beats the config's value inside the step.
CHANGED = {
    "synthesis_temperature": 0.9,
    "synthesis_max_new_tokens": 32,
    "training_epochs": 1,
    "training_learning_rate": 5e-05,
    "training_kd_weight": 0.5,
    "training_topk_weight": 0.0,
    "training_method": "full",
}
REGISTRY_STUDENT = "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1"
ASSETS = """
  data:
    train: azureml:sentiment-train@latest
    validation: azureml:sentiment-validation@latest
    test: azureml:sentiment-test@latest
"""


def tuned_config(make_config, extra: str = "", shards: int = 1) -> Path:
    return make_config(extra=TUNED + AZURE_SECTION.replace("synthesis_shards: 1", f"synthesis_shards: {shards}") + extra)


def config_value(config, key: str):
    section, field = key.split(".")
    return getattr(getattr(config, section), field)


def assert_steps_bind_their_settings(steps: dict) -> None:
    for name, step in steps.items():
        taken = {port for port in step["inputs"] if port in SETTINGS}
        assert taken == set(STEP_SETTINGS[name]), name
        for port in taken:
            assert bound(step, port) == f"${{{{parent.inputs.{port}}}}}", (name, port)


@pytest.mark.parametrize("pipeline", ["distill", "retrain"])
def test_the_tuned_settings_are_pipeline_inputs_with_the_configs_values_bound_by_the_steps_that_use_them(wire, make_config, pipeline):
    extra = f"  student_model: {REGISTRY_STUDENT}\n" + (ASSETS if pipeline == "retrain" else "")
    result = submit(tuned_config(make_config, extra), "--pipeline", pipeline)
    assert result.exit_code == 0, result.output
    job = job_payload(wire)
    for name, (_, value) in SETTINGS.items():
        assert job["inputs"][name] == {"jobInputType": "literal", "value": value}, name
    assert_steps_bind_their_settings(job["jobs"])
    # the student: an mlflow_model pipeline input, bound by the steps that load it (inside, it beats student.model)
    assert job["inputs"]["student_model"]["jobInputType"] == "mlflow_model" and job["inputs"]["student_model"]["uri"] == REGISTRY_STUDENT
    for name, step in job["jobs"].items():
        expected = "${{parent.inputs.student_model}}" if name in ("finetune", "finetune_references", "evaluate") else None
        assert (bound(step, "student_model") if "student_model" in step["inputs"] else None) == expected, name
    assert TEACHER_KEY not in wire.all_text()


def test_the_pipeline_inputs_are_typed_like_the_config(make_config, tmp_path):
    config = load_config(tuned_config(make_config))
    job = build.build_pipeline(config, "distill", tmp_path / "built")
    inputs = job.component.inputs
    expected_types = {
        "synthesis_temperature": "number", "synthesis_max_new_tokens": "integer", "training_epochs": "number",
        "training_learning_rate": "number", "training_kd_weight": "number", "training_topk_weight": "number",
        "training_method": "string",
    }  # fmt: skip
    for name, (key, _) in SETTINGS.items():
        assert inputs[name].type == expected_types[name], name
        assert job.inputs[name].result() == config_value(config, key), name


def test_each_component_declares_the_settings_it_takes_typed_as_in_the_config_schema(wire, make_config):
    """The studio shows a step's inputs from its component spec: the type, range and choices of the config key."""
    assert submit(tuned_config(make_config)).exit_code == 0
    specs = component_payloads(wire)
    fields = {**{f"synthesis_{name}": field for name, field in SynthesisConfig.model_fields.items()},
              **{f"training_{name}": field for name, field in TrainingConfig.model_fields.items()}}  # fmt: skip
    for component in ("validate", "synthesize", "finetune"):
        spec = specs[f"azdistill_{component}"]
        assert spec["version"] == component_version(spec["name"])
        for name in STEP_SETTINGS[component]:
            port, key = spec["inputs"][name], SETTINGS[name][0]
            annotation = fields[name].annotation
            kind = {float: "number", int: "integer"}.get(annotation, "string")
            assert port["type"] == kind and port.get("optional") is True, (component, name)
            assert key in port["description"], (component, name)
            if kind == "string":
                assert port["enum"] == list(get_args(annotation)), (component, name)
            assert f"$[[--set {key}=${{{{inputs.{name}}}}}]]" in " ".join(spec["command"].split()), (component, name)


def test_the_sharded_synthesis_takes_the_synthesis_settings_always_present_with_the_schemas_defaults():
    """The parallel component's program arguments do not rely on `$[[...]]`: the inputs are always given; the
    pipelines bind them, and their defaults are the config schema's."""
    spec = yaml.safe_load((build.COMPONENTS_DIR / "synthesize_shards" / "spec.yaml").read_text())
    arguments = " ".join(spec["task"]["program_arguments"].split())
    for name in SYNTHESIS:
        port = spec["inputs"][name]
        assert not port.get("optional") and port["default"] == SynthesisConfig.model_fields[name.removeprefix("synthesis_")].default
        assert f"--{name.replace('_', '-')} ${{{{inputs.{name}}}}}" in arguments
        assert f"$[[--{name.replace('_', '-')}" not in arguments


def test_a_sharded_pipeline_binds_the_synthesis_settings_to_every_shard(wire, make_config):
    result = submit(tuned_config(make_config, shards=3))
    assert result.exit_code == 0, result.output
    steps = job_payload(wire)["jobs"]
    assert "synthesize_shards" in steps
    assert_steps_bind_their_settings(steps)


def test_a_schedule_carries_the_settings_so_it_can_change_them(wire, make_config):
    config = tuned_config(make_config, "  schedule: {cron: '0 3 * * 1'}\n" + ASSETS)
    result = CliRunner().invoke(cli, ["schedule", "create", str(config)])
    assert result.exit_code == 0, result.output
    definition = wire.sent("PUT", r"/schedules/unit-test-retrain$")[-1].body["properties"]["action"]["jobDefinition"]
    for name, (_, value) in SETTINGS.items():
        assert definition["inputs"][name] == {"jobInputType": "literal", "value": value}, name
    assert_steps_bind_their_settings(definition["jobs"])


# ---------------------------------------------------------------------------------------------------
# Inside the step: the command line the job runs, with the inputs substituted


def substitute(command: str, values: dict[str, str]) -> str:
    """What Azure ML runs: `$[[...]]` kept when every input in it is given (dropped otherwise), then each
    `${{inputs.x}}` / `${{outputs.x}}` replaced by its value."""

    def optional(match: re.Match) -> str:
        names = re.findall(r"\$\{\{(?:inputs|outputs)\.(\w+)\}\}", match[1])
        return match[1] if all(name in values for name in names) else ""

    command = re.sub(r"\$\[\[(.*?)\]\]", optional, " ".join(command.split()))
    return re.sub(r"\$\{\{(?:inputs|outputs)\.(\w+)\}\}", lambda match: shlex.quote(values[match[1]]), command)


def stage_argv(command: str, values: dict[str, str], stage: str) -> list[str]:
    """The arguments `azdistill <stage>` gets when a job runs the component's command line with these input values:
    bash runs it (quoting, `$(...)`, `&&` as in the job) with `python` replaced by a function printing its arguments."""
    script = 'python() { printf "%s\\037" "$@"; printf "\\n"; }\n' + substitute(command, values)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        call = line.rstrip("\x1f").split("\x1f")
        last = len(call) - 1 - call[::-1].index("azdistill")  # `with-teacher-key -- python -m azdistill <stage>`
        if call[last + 1] == stage:
            return call[last + 1:]
    raise AssertionError(f"the command line never runs `azdistill {stage}`: {done.stdout}")


class Loaded(Exception):
    pass


def loaded_by_cli(argv: list[str], monkeypatch) -> object:
    """The config the CLI loads for `azdistill <argv>` (the stage itself is not run)."""
    seen = []

    def spy(path=None, overrides=()):
        seen.append(real(path, overrides))
        raise Loaded

    real = config_module.load_config
    monkeypatch.setattr(config_module, "load_config", spy)
    result = CliRunner().invoke(cli, argv)
    monkeypatch.setattr(config_module, "load_config", real)
    assert isinstance(result.exception, Loaded), result.output
    return seen[0]


@pytest.fixture
def job_config(make_config, tmp_path):
    """The config file every step reads (written by `azdistill submit`: epochs 3, temperature 0.3, ...), the data
    folder the steps mount and a mounted registry student."""
    path = make_config(extra=TUNED + AZURE_SECTION + f"  student_model: {REGISTRY_STUDENT}\n")
    written = build.write_job_config(load_config(path), tmp_path / "job")
    student = tmp_path / "mnt" / "student_model"
    student.mkdir(parents=True)
    return SimpleNamespace(path=written, data=str(path.parent / "data"), student=str(student), out=str(tmp_path / "out"))


@pytest.mark.parametrize(("component", "stage"), [("validate", "validate"), ("synthesize", "synthesize"), ("finetune", "finetune")])
def test_inside_the_step_the_inputs_override_the_config_file(job_config, monkeypatch, component, stage):
    spec = yaml.safe_load(build.component_spec(component).read_text())
    ports = {name: job_config.data for name in ("data", "train", "validation", "test")}
    ports.update(config=str(job_config.path), student_model=job_config.student, data_version="1", shards="1", train_on="teacher_answers")
    ports.update({name: job_config.out for name in spec["outputs"]})
    ports["data"] = job_config.data  # validate's data output is where its splits are
    in_file = load_config(job_config.path)
    assert (in_file.training.epochs, in_file.synthesis.temperature, in_file.training.method) == (3.0, 0.3, "lora")

    # the pipeline always binds the inputs: each beats the file's value
    given = {name: str(CHANGED[name]) for name in STEP_SETTINGS[component]}
    config = loaded_by_cli(stage_argv(spec["command"], {**ports, **given}, stage), monkeypatch)
    for name in STEP_SETTINGS[component]:
        assert config_value(config, SETTINGS[name][0]) == CHANGED[name], name
    assert config.data.train == Path(job_config.data) / "train.jsonl"
    if component == "finetune":
        assert config.student.model == job_config.student  # the mounted base student beats the file's reference

    # left out (the component used on its own): the config file's values stand
    config = loaded_by_cli(stage_argv(spec["command"], ports, stage), monkeypatch)
    for name in STEP_SETTINGS[component]:
        assert config_value(config, SETTINGS[name][0]) == config_value(in_file, SETTINGS[name][0]), name


def test_inside_each_shard_the_synthesis_inputs_override_the_config_file(job_config, monkeypatch, tmp_path):
    manifest = tmp_path / "manifests" / "shard-00000.json"
    manifest.parent.mkdir()
    manifest.write_text('{"shard": 0, "train": "train.jsonl", "validation": "validation.jsonl"}')
    spec = yaml.safe_load(build.component_spec("synthesize_shards").read_text())
    given = {name: str(CHANGED[name]) for name in SYNTHESIS}
    arguments = substitute(spec["task"]["program_arguments"], {"config": str(job_config.path), "data": job_config.data, "shards": job_config.out, **given})
    ran = []
    monkeypatch.setattr(injob.subprocess, "run", lambda command, **kwargs: (ran.append(command), SimpleNamespace(returncode=0, stderr=""))[1])
    entry_spec = importlib.util.spec_from_file_location("shards_entry", build.COMPONENTS_DIR / "synthesize_shards" / "entry.py")
    entry = importlib.util.module_from_spec(entry_spec)
    entry_spec.loader.exec_module(entry)
    monkeypatch.setattr(sys, "argv", ["driver", "--mini_batch_size", "1", *shlex.split(arguments)])
    entry.init()
    entry.run([str(manifest)])
    command = ran[0]
    argv = command[len(command) - command[::-1].index("azdistill"):]  # after the last `-m azdistill`
    assert argv[0] == "synthesize"
    config = loaded_by_cli(argv, monkeypatch)
    assert (config.synthesis.temperature, config.synthesis.max_new_tokens) == (0.9, 32)


def test_the_docs_name_every_setting_input():
    docs = (PROJECT_ROOT / "docs" / "azure.md").read_text(encoding="utf-8")
    assert "Changing settings in the studio or on a schedule" in docs
    for name, (key, _) in SETTINGS.items():
        assert f"`{name}`" in docs and key in docs, name
