"""A hosted teacher (an OpenAI-compatible endpoint) distilled into a registry student on Azure ML, through the real
azure-ai-ml SDK with the workspace faked at the HTTP layer (tests/azure_wire.py).

The assertions read what went over the wire: which steps get the key's reference and the name of the variable the
teacher reads its key from (only those that call the teacher), each shard's share of the endpoint's limits, the
registry student bound as an mlflow_model input, and that the key itself is in no request.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner
from conftest import stand_in_model_folders
from test_azure_submit import TEACHER_KEY, bound, component_payloads, component_version, job_payload, submit, wire  # noqa: F401

from azdistill.azure import build, injob
from azdistill.cli import cli
from azdistill.config.loading import load_config
from azdistill.errors import UserError

OPENAI_KEY = "sk-OPENAI-KEY-of-the-hosted-teacher-7c1d9e"
REGISTRY_STUDENT = "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1"
IDENTITY = "33333333-3333-3333-3333-333333333333"
HOSTED_TEACHER = """
teacher:
  kind: openai-compatible
  endpoint: https://teacher.example/v1
  model: gpt-4o
  auth: {method: api_key_env, api_key_env: OPENAI_KEY}
  requests_per_minute: 600
  tokens_per_minute: 90000
  max_concurrency: 16
  price_per_million_prompt_tokens: 2.5
  price_per_million_completion_tokens: 10.0
student:
  model: phi-4-mini-instruct
synthesis:
  max_cost: 20.0
"""
RETRAIN_DATA = """
  data:
    train: azureml:sentiment-train@latest
    validation: azureml:sentiment-validation@latest
    test: azureml:sentiment-test:3
"""


def hosted_config(make_config, shards: int = 1, key_reference: str = "  teacher_connection: teacher-endpoint\n", data: str = "") -> Path:
    azure = (
        "azure:\n"
        "  experiment: distill-tests\n"
        f"  synthesis_shards: {shards}\n"
        "  compute:\n"
        "    cpu: {cluster: cpu-cluster}\n"
        "    gpu: {cluster: gpu-cluster}\n"
        "    synthesize: {cluster: cpu-cluster, instance_count: 2}\n"
        f"  student_model: {REGISTRY_STUDENT}\n"
        f"  identity_client_id: {IDENTITY}\n"
        + key_reference
        + data
    )
    return make_config(extra=HOSTED_TEACHER + azure)


@pytest.fixture
def hosted_wire(wire, monkeypatch):
    """The fake workspace, with the hosted teacher's key in the submitting user's environment."""
    monkeypatch.setenv("OPENAI_KEY", OPENAI_KEY)
    return wire


TEACHER_STEPS = ("synthesize", "synthesize_shards", "evaluate")


def assert_key_references_only_where_the_teacher_is_called(steps: dict, reference: dict) -> None:
    for name, step in steps.items():
        expected = {"AZURE_CLIENT_ID": IDENTITY}
        if name in TEACHER_STEPS:
            expected.update(reference, AZDISTILL_TEACHER_KEY_ENV="OPENAI_KEY")
        assert step["environment_variables"] == expected, name


@pytest.mark.parametrize("pipeline", ["distill", "retrain"])
def test_a_hosted_teacher_gets_its_key_by_reference_only_in_the_steps_that_call_it(hosted_wire, make_config, pipeline):
    config = hosted_config(make_config, data=RETRAIN_DATA if pipeline == "retrain" else "")
    result = submit(config, "--pipeline", pipeline)
    assert result.exit_code == 0, result.output
    job = job_payload(hosted_wire)
    steps = job["jobs"]
    assert set(steps) == {"validate", "synthesize", "finetune", "finetune_references", "evaluate", "register"}
    assert_key_references_only_where_the_teacher_is_called(steps, {"AZDISTILL_TEACHER_CONNECTION": "teacher-endpoint"})

    # every step's command: the teacher steps start under with-teacher-key, no other step can read the key
    specs = component_payloads(hosted_wire)
    commands = {name.removeprefix("azdistill_"): " ".join(spec["command"].split()) for name, spec in specs.items()}
    assert set(commands) == {"validate", "synthesize", "finetune", "evaluate", "register"}
    with_key = "python -m azdistill job with-teacher-key -- python -m azdistill"
    assert commands["synthesize"].startswith(f"{with_key} synthesize ${{{{inputs.config}}}}")
    assert commands["evaluate"].startswith(f"{with_key} evaluate ${{{{inputs.config}}}}")
    assert commands["finetune"].startswith("python -m azdistill finetune ${{inputs.config}}")
    assert commands["validate"].startswith("python -m azdistill job prepare-data --config ${{inputs.config}}")
    assert commands["register"].startswith("python -m azdistill job register --model ${{inputs.mlflow_model}}")
    for name in ("validate", "finetune", "register"):
        assert "with-teacher-key" not in commands[name], name
    for name in ("finetune", "evaluate"):
        assert "$[[--set student.model=${{inputs.student_model}}]]" in commands[name]

    # the registry student, bound as an mlflow_model input of the pipeline and of every step that loads it
    student = job["inputs"]["student_model"]
    assert student["jobInputType"] == "mlflow_model" and student["uri"] == REGISTRY_STUDENT
    for name in ("finetune", "finetune_references", "evaluate"):
        assert bound(steps[name], "student_model") == "${{parent.inputs.student_model}}", name
    for name in ("finetune", "evaluate"):
        assert specs[f"azdistill_{name}"]["inputs"]["student_model"]["type"] == "mlflow_model"
        assert specs[f"azdistill_{name}"]["version"] == component_version(f"azdistill_{name}") == {"finetune": "1.2.0", "evaluate": "1.1.0"}[name]

    # the config every step reads names the model and the key's variable, not a folder and not the key
    uploaded = [sent for sent in hosted_wire.requests if sent.method == "PUT" and sent.path.endswith("job-config.yaml")]
    job_config = yaml.safe_load(uploaded[0].text)
    assert job_config["teacher"]["model"] == "gpt-4o" and job_config["teacher"]["auth"]["api_key_env"] == "OPENAI_KEY"
    assert job_config["student"]["model"] == REGISTRY_STUDENT  # replaced by the mounted folder in finetune and evaluate
    assert steps["register"]["inputs"]["teacher"]["value"] == "openai-compatible:gpt-4o"  # lineage names the kind of teacher too

    sent = hosted_wire.all_text()
    assert OPENAI_KEY not in sent and TEACHER_KEY not in sent


def test_sharded_synthesis_splits_the_endpoints_limits_and_the_budget_between_the_shards(hosted_wire, make_config):
    key_secret = "  teacher_key_secret: https://kv-distill.vault.azure.net/secrets/teacher-key\n"
    result = submit(hosted_config(make_config, shards=4, key_reference=key_secret, data=RETRAIN_DATA), "--pipeline", "retrain")
    assert result.exit_code == 0, result.output
    steps = job_payload(hosted_wire)["jobs"]
    assert set(steps) == {"validate", "synthesize_shards", "merge_shards", "finetune", "finetune_references", "evaluate", "register"}
    assert_key_references_only_where_the_teacher_is_called(
        steps, {"AZDISTILL_TEACHER_KEY_SECRET": "https://kv-distill.vault.azure.net/secrets/teacher-key"}
    )
    shards = steps["synthesize_shards"]
    # 4 shards on 2 nodes x 1 process: 2 at once share 600 requests/min, 90000 tokens/min and 16 in flight;
    # each of the 4 equal shards may spend a quarter of the 20.0 budget
    assert shards["resources"] == {"instance_count": 2} and shards["max_concurrency_per_instance"] == 1
    shares = {name: bound(shards, name) for name in build.SHARD_LIMITS}
    assert shares == {
        "shard_requests_per_minute": "300",
        "shard_tokens_per_minute": "45000",
        "shard_max_concurrency": "8",
        "shard_max_cost": "5.0",
    }
    spec = component_payloads(hosted_wire)["azdistill_synthesize_shards"]
    assert spec["version"] == component_version("azdistill_synthesize_shards") == "1.2.0"
    assert spec["inputs"]["shard_requests_per_minute"] == {
        "type": "integer", "optional": True, "min": "1",
        "description": spec["inputs"]["shard_requests_per_minute"]["description"],
    }  # fmt: skip
    assert spec["inputs"]["shard_max_cost"]["type"] == "number"
    arguments = " ".join(spec["task"]["program_arguments"].split())
    for name in build.SHARD_LIMITS:
        assert f"$[[--{name.replace('_', '-')} ${{{{inputs.{name}}}}}]]" in arguments
    sent = hosted_wire.all_text()
    assert OPENAI_KEY not in sent and TEACHER_KEY not in sent


def test_shard_shares_follow_the_shards_running_at_once_and_pass_only_what_the_config_sets(make_config):
    config = load_config(hosted_config(make_config, shards=3), ["azure.compute.synthesize.instance_count=8", "teacher.tokens_per_minute=null"])
    # 3 shards on 8 nodes: all 3 at once
    assert build.shard_shares(config) == {"shard_requests_per_minute": 200, "shard_max_concurrency": 6, "shard_max_cost": pytest.approx(20.0 / 3)}
    sparse = load_config(
        hosted_config(make_config, shards=4),
        ["teacher.requests_per_minute=1", "teacher.tokens_per_minute=null", "synthesis.max_cost=null", "teacher.max_concurrency=1"],
    )
    assert build.shard_shares(sparse) == {"shard_requests_per_minute": 1, "shard_max_concurrency": 1}


SHARDS_WITHOUT_QUOTA = (
    "warning: azure.synthesis_shards: 2 shards run at once against the teacher's endpoint and teacher.requests_per_minute "
    "is not set, so each finds the endpoint's limit from 429s on its own and they share it unequally; set it to the "
    "deployment's quota and each shard paces at its share (docs/azure.md)"
)


def test_validate_and_submit_warn_when_shards_share_an_endpoint_whose_quota_the_config_does_not_give(make_config, tmp_path):
    """Shards that run at once without teacher.requests_per_minute each find the limit on their own and share it
    unequally (docs/benchmarks.md): `validate` says so, in one line naming both keys, and still passes; `submit` says it
    too, before it builds anything. No warning with the quota given, nor when the shards run one after another (one
    node)."""
    runner, student = CliRunner(), stand_in_model_folders(tmp_path, ["student"])["student"]

    def warned(*arguments: str) -> list[str]:
        result = runner.invoke(cli, [arguments[0], str(hosted_config(make_config, shards=4)), *arguments[1:]])
        assert result.exit_code == 0, result.output
        return [line for line in result.stderr.splitlines() if "synthesis_shards" in line]

    # (a local student folder: validate checks student.model on this machine; the warning does not depend on it)
    validate = ("validate", "--set", f"student.model={student}")
    assert warned(*validate, "--set", "teacher.requests_per_minute=null") == [SHARDS_WITHOUT_QUOTA]
    assert warned(*validate) == []
    assert warned(*validate, "--set", "teacher.requests_per_minute=null", "--set", "azure.compute.synthesize.instance_count=1") == []
    # a dry run: no network, no credentials
    dry_run = ("submit", "--dry-run", "--output-dir", str(tmp_path / "dry"))
    assert warned(*dry_run, "--set", "teacher.requests_per_minute=null") == [SHARDS_WITHOUT_QUOTA]


def test_each_shard_runs_synthesize_with_its_share_as_set_overrides(tmp_path, monkeypatch):
    """The parallel job's entry script forwards the shard_* inputs to each shard's `azdistill synthesize`."""
    manifest = tmp_path / "manifests" / "shard-00002.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"shard": 2, "train": "shards/train-00002.jsonl", "validation": "shards/validation-00002.jsonl"}))
    ran = []
    monkeypatch.setattr(injob.subprocess, "run", lambda command, **kwargs: (ran.append(command), SimpleNamespace(returncode=0, stderr=""))[1])
    spec = importlib.util.spec_from_file_location("shards_entry", build.COMPONENTS_DIR / "synthesize_shards" / "entry.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    engine = ["--mini_batch_size", "1", "--logging_level", "INFO"]  # the parallel engine's own arguments
    ours = ["--config", "job-config.yaml", "--data", "/mnt/data", "--output", "/mnt/out",
            "--shard-requests-per-minute", "300", "--shard-max-concurrency", "8", "--shard-max-cost", "5.0"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["driver", *engine, *ours])
    entry.init()
    assert entry.run([str(manifest)]) == ["shard-00002: done"]
    command = ran[0]
    assert command[:6] == [sys.executable, "-m", "azdistill", "job", "with-teacher-key", "--"]
    sets = [command[index + 1] for index, part in enumerate(command) if part == "--set"]
    assert sets == [
        "data.train=/mnt/data/shards/train-00002.jsonl",
        "data.validation=/mnt/data/shards/validation-00002.jsonl",
        "data.test=/mnt/data/test.jsonl",
        "teacher.requests_per_minute=300",
        "teacher.max_concurrency=8",
        "synthesis.max_cost=5.0",
    ]  # tokens_per_minute not given: the config's own value stands
    assert command[-2:] == ["--output-dir", "/mnt/out/shard-00002"]

    # a reference the service left unresolved fails the worker instead of running a shard without its share
    monkeypatch.setattr(sys, "argv", ["driver", *ours, "$[[--shard-tokens-per-minute", "${{inputs.shard_tokens_per_minute}}]]"])
    with pytest.raises(RuntimeError, match="left unresolved"):
        entry.init()
    with pytest.raises(UserError, match="unknown shard limit 'shard_tokens'"):
        injob.shard_command({"shard": 0, "train": "t", "validation": "v"}, "c", "d", "o", {"shard_tokens": 5})


def test_the_teacher_key_reaches_the_stage_under_the_configured_name_never_its_command_line(monkeypatch, capfd):
    monkeypatch.setenv("AZDISTILL_TEACHER_CONNECTION", "teacher-endpoint")
    monkeypatch.setenv("AZDISTILL_TEACHER_KEY_ENV", "OPENAI_KEY")
    monkeypatch.delenv("OPENAI_KEY", raising=False)
    monkeypatch.delenv("AZDISTILL_TEACHER_KEY", raising=False)
    asked = []

    def client_factory():
        connections = SimpleNamespace(get=lambda name, populate_secrets: (asked.append(name), SimpleNamespace(api_key=OPENAI_KEY))[1])
        return SimpleNamespace(connections=connections), object()

    probe = (
        "import hashlib, os, sys; key = os.environ['OPENAI_KEY']; "
        "print(hashlib.sha256(key.encode()).hexdigest(), 'AZDISTILL_TEACHER_KEY' in os.environ, any(key in a for a in sys.argv))"
    )
    assert injob.run_with_teacher_key([sys.executable, "-c", probe], client_factory=client_factory) == 0
    assert asked == ["teacher-endpoint"]
    output = capfd.readouterr().out
    assert output.split() == [hashlib.sha256(OPENAI_KEY.encode()).hexdigest(), "False", "False"]
    assert OPENAI_KEY not in output
    assert "OPENAI_KEY" not in __import__("os").environ  # only the child had it

    monkeypatch.setenv("AZDISTILL_TEACHER_KEY_ENV", "sk-not a variable name")
    with pytest.raises(UserError, match="AZDISTILL_TEACHER_KEY_ENV must name an environment variable"):
        injob.run_with_teacher_key(["true"], client_factory=client_factory)


def test_a_hosted_teacher_without_a_key_reference_is_refused_before_anything_is_written(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_KEY", OPENAI_KEY)
    config = hosted_config(make_config, key_reference="")
    out = tmp_path / "review"
    result = CliRunner().invoke(cli, ["submit", str(config), "--dry-run", "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in result.output
    assert "$OPENAI_KEY (teacher.auth.api_key_env)" in message
    assert "set azure.teacher_connection" in message and "azure.teacher_key_secret" in message
    assert OPENAI_KEY not in result.output
    assert not out.exists() and not (tmp_path / "work" / "azure").exists()


def test_a_hosted_teachers_model_is_a_name_and_only_a_local_copy_folder_is_refused(make_config, tmp_path):
    folder = tmp_path / "models" / "gpt-oss-120b"
    folder.mkdir(parents=True)
    config = load_config(hosted_config(make_config), [f"teacher.model={folder}"])
    written = build.write_job_config(config, tmp_path / "out")  # a server may name its model like a path
    assert yaml.safe_load(written.read_text())["teacher"]["model"] == str(folder)

    local_copy = load_config(hosted_config(make_config), [f"teacher.local_copy={folder}"])
    with pytest.raises(UserError, match=r"teacher.local_copy is a local folder \(.*gpt-oss-120b\) that an Azure ML job cannot read"):
        build.write_job_config(local_copy, tmp_path / "out")
    builtin = load_config(hosted_config(make_config), ["teacher.local_copy=builtin"])
    assert yaml.safe_load(build.write_job_config(builtin, tmp_path / "out").read_text())["teacher"]["local_copy"] == "builtin"


@pytest.mark.parametrize(
    ("reference", "accepted"),
    [
        ("azureml:phi-4-mini-hf:1", True),
        ("azureml:phi-4-mini-hf@latest", True),
        (REGISTRY_STUDENT, True),
        ("Phi-4-mini-instruct", False),
        ("azureml://registries/azureml/models/Phi-4-mini-instruct", False),
        ("azureml:phi-4-mini-hf@newest", False),
    ],
)
def test_azure_student_model_takes_a_workspace_or_registry_model_reference(make_config, reference, accepted):
    path = hosted_config(make_config)
    if accepted:
        assert load_config(path, [f"azure.student_model={reference}"]).azure.student_model == reference
    else:
        with pytest.raises(UserError, match=r"azure.student_model.*azureml://registries/<registry>/models/<name>/versions/<version>"):
            load_config(path, [f"azure.student_model={reference}"])
