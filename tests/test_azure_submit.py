"""Submitting to Azure ML through the real azure-ai-ml SDK, with the workspace faked at the HTTP layer.

The assertions read what went over the wire: the component specs, the compute of every step, the bindings
between steps, the distribution settings, and that the teacher key is in no request.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from azure_wire import RESOURCE_GROUP, SUBSCRIPTION, WORKSPACE, WS_PATH, FakeWorkspace, installed
from click.testing import CliRunner

import azdistill.azure.workspace as workspace_module
from azdistill.azure.build import ENVIRONMENTS_DIR, component_spec
from azdistill.cli import cli

TEACHER_KEY = "sk-THE-TEACHER-KEY-4f9a1c2e8b7d6a5f"
AZURE_SECTION = """
azure:
  experiment: distill-tests
  synthesis_shards: 1
  compute:
    cpu: {cluster: cpu-cluster}
    gpu: {cluster: gpu-cluster}
    finetune: {cluster: gpu-cluster, instance_count: 2, processes_per_instance: 4}
    evaluate: {instance_type: Standard_NC24ads_A100_v4}
  teacher_connection: teacher-endpoint
  identity_client_id: 33333333-3333-3333-3333-333333333333
"""


def component_version(sent_name: str) -> str:
    """The version in the component's own spec: what was sent must be what is in the repository."""
    return str(yaml.safe_load(component_spec(sent_name.removeprefix("azdistill_")).read_text())["version"])


def environment_version(image: str) -> str:
    return str(yaml.safe_load((ENVIRONMENTS_DIR / image / "environment.yaml").read_text())["version"])


@pytest.fixture
def wire(monkeypatch):
    """The fake workspace; any request it does not know fails the test."""
    monkeypatch.setenv("AZURE_ML_DISABLE_CONCURRENT_COMPONENT_REGISTRATION", "true")
    # The key is in the submitting user's environment, as for a local run: it must still go nowhere.
    monkeypatch.setenv("AZDISTILL_TEACHER_KEY", TEACHER_KEY)
    with installed(monkeypatch) as fake:
        yield fake


@pytest.fixture
def azure_config(make_config):
    return make_config(extra=AZURE_SECTION)


def submit(config_path: Path, *args: str):
    return CliRunner().invoke(cli, ["submit", str(config_path), *args])


def job_payload(wire: FakeWorkspace) -> dict:
    puts = wire.sent("PUT", r"/jobs/[^/]+$")
    assert len(puts) == 1
    return puts[0].body["properties"]


def component_payloads(wire: FakeWorkspace) -> dict[str, dict]:
    """The component specs sent, by component name."""
    specs = {}
    for sent in wire.sent("PUT", r"/components/[^/]+/versions/"):
        spec = sent.body["properties"]["componentSpec"]
        specs[spec["name"]] = spec
    return specs


def bound(step: dict, port: str):
    """What a step's input is bound to in the REST payload (a binding expression or a literal)."""
    value = step["inputs"][port]
    return value.get("uri") or value.get("value") or value.get("path") if isinstance(value, dict) else value


def test_submit_sends_the_pipeline_with_compute_bindings_and_distribution(wire, azure_config):
    result = submit(azure_config)
    assert result.exit_code == 0, result.output
    job = job_payload(wire)
    name = wire.sent("PUT", r"/jobs/[^/]+$")[0].path.rsplit("/", 1)[1]
    assert f"job {name}" in result.output and f"https://ml.azure.com/runs/{name}" in result.output
    assert job["jobType"] == "Pipeline" and job["experimentName"] == "distill-tests"
    steps = job["jobs"]
    assert set(steps) == {"validate", "synthesize", "finetune", "finetune_references", "evaluate", "register"}

    # compute per stage: clusters by ARM id, serverless with its instance type
    def compute(step):
        return steps[step].get("computeId")

    assert compute("validate").endswith("/computes/cpu-cluster") and compute("synthesize").endswith("/computes/cpu-cluster")
    assert compute("finetune").endswith("/computes/gpu-cluster") and compute("register").endswith("/computes/cpu-cluster")
    assert compute("evaluate").endswith("/computes/serverless")
    assert steps["evaluate"]["resources"] == {"instance_count": 1, "instance_type": "Standard_NC24ads_A100_v4"}

    # distribution: 2 nodes x 4 processes for both fine-tunes
    for step in ("finetune", "finetune_references"):
        assert steps[step]["distribution"] == {"distribution_type": "PyTorch", "process_count_per_instance": 4}
        assert steps[step]["resources"] == {"instance_count": 2}

    # bindings: every stage reads the validated data; each stage consumes the one before
    def binding(step, port):
        return bound(steps[step], port)

    for step in ("synthesize", "finetune", "finetune_references", "evaluate", "register"):
        assert binding(step, "data") == "${{parent.jobs.validate.outputs.data}}"
    assert binding("finetune", "synthetic") == "${{parent.jobs.synthesize.outputs.synthetic}}"
    assert binding("evaluate", "student") == "${{parent.jobs.finetune.outputs.model}}"
    assert binding("evaluate", "reference") == "${{parent.jobs.finetune_references.outputs.model}}"
    assert binding("register", "mlflow_model") == "${{parent.jobs.finetune.outputs.mlflow_model}}"
    assert binding("register", "report") == "${{parent.jobs.evaluate.outputs.report}}"
    assert steps["finetune"]["inputs"]["train_on"]["value"] == "teacher_answers"
    assert steps["finetune_references"]["inputs"]["train_on"]["value"] == "references"
    assert steps["register"]["inputs"]["model_name"]["value"] == "unit-test-student"
    for step in ("validate", "synthesize", "finetune", "evaluate"):
        assert binding(step, "config") == "${{parent.inputs.config_file}}"

    # the student is a pipeline output of MLflow model type
    assert job["outputs"]["student"]["jobOutputType"] == "mlflow_model"
    assert steps["finetune"]["outputs"]["mlflow_model"]["value"] == "${{parent.outputs.student}}"

    # steps run as the managed identity; only those calling the teacher get the key's reference (a connection
    # name) and the variable to put the key in, never the key
    for name, step in steps.items():
        assert step["identity"] == {"client_id": "33333333-3333-3333-3333-333333333333", "identity_type": "Managed"}
        expected = {"AZURE_CLIENT_ID": "33333333-3333-3333-3333-333333333333"}
        if name in ("synthesize", "evaluate"):
            expected.update(AZDISTILL_TEACHER_CONNECTION="teacher-endpoint", AZDISTILL_TEACHER_KEY_ENV="AZDISTILL_TEACHER_KEY")
        assert step["environment_variables"] == expected, name
    assert TEACHER_KEY not in wire.all_text()


def test_submit_sends_each_component_spec_with_its_version_command_and_environment(wire, azure_config):
    assert submit(azure_config).exit_code == 0
    specs = component_payloads(wire)
    assert set(specs) == {"azdistill_validate", "azdistill_synthesize", "azdistill_finetune", "azdistill_evaluate", "azdistill_register"}
    for name, spec in specs.items():
        assert spec["version"] == component_version(name)
        assert all(port.get("description") for port in {**spec["inputs"], **spec["outputs"]}.values()), name
    assert "python -m azdistill synthesize" in specs["azdistill_synthesize"]["command"]
    assert "python -m azdistill finetune" in specs["azdistill_finetune"]["command"]
    assert "python -m azdistill evaluate" in specs["azdistill_evaluate"]["command"]
    assert "python -m azdistill validate" in specs["azdistill_validate"]["command"]
    assert specs["azdistill_finetune"]["inputs"]["train_on"]["enum"] == ["teacher_answers", "references"]
    cpu, gpu = environment_version("cpu"), environment_version("gpu")
    assert specs["azdistill_finetune"]["environment"].endswith(f"/environments/azdistill-gpu/versions/{gpu}")
    assert specs["azdistill_synthesize"]["environment"].endswith(f"/environments/azdistill-cpu/versions/{cpu}")
    # both environments registered under their names and versions, built from the repository's Dockerfiles
    environments = {sent.path.split("/environments/")[1]: sent.body["properties"] for sent in wire.sent("PUT", r"/environments/[^/]+/versions/[^/]+$")}
    assert set(environments) == {f"azdistill-cpu/versions/{cpu}", f"azdistill-gpu/versions/{gpu}"}
    assert all(env["build"]["dockerfilePath"] == "Dockerfile" for env in environments.values())
    # the config every step reads was uploaded, and holds no key and no azure section
    uploads = [sent for sent in wire.requests if sent.method == "PUT" and sent.path.endswith("job-config.yaml")]
    assert uploads, "the job config was not uploaded"
    uploaded = yaml.safe_load(uploads[0].text)
    assert "azure" not in uploaded and uploaded["tracking"]["experiment"] == "distill-tests"
    assert TEACHER_KEY not in wire.all_text()


SHARDED_SECTION = """
azure:
  synthesis_shards: 8
  compute:
    synthesize: {cluster: cpu-cluster, instance_count: 4}
    finetune: {instance_type: Standard_ND96asr_v4, instance_count: 2, processes_per_instance: 8}
  data:
    train: azureml:sentiment-train@latest
    validation: azureml:sentiment-validation@latest
    test: azureml:sentiment-test:3
  teacher_key_secret: https://kv-distill.vault.azure.net/secrets/teacher-key
"""


def test_sharded_synthesis_runs_as_a_parallel_job_over_the_shard_manifests(wire, make_config):
    config = make_config(extra=SHARDED_SECTION)
    result = submit(config, "--pipeline", "retrain")
    assert result.exit_code == 0, result.output
    steps = job_payload(wire)["jobs"]
    assert set(steps) >= {"validate", "synthesize_shards", "merge_shards", "finetune", "evaluate", "register"}
    shards = steps["synthesize_shards"]
    assert shards["type"] == "parallel"
    assert shards["computeId"].endswith("/computes/cpu-cluster") and shards["resources"] == {"instance_count": 4}
    assert shards["mini_batch_size"] == 1 and shards["input_data"] == "${{inputs.shard_manifests}}"
    assert bound(shards, "shard_manifests") == "${{parent.jobs.validate.outputs.shard_manifests}}"
    assert bound(steps["merge_shards"], "shards") == "${{parent.jobs.synthesize_shards.outputs.shards}}"
    assert bound(steps["finetune"], "synthetic") == "${{parent.jobs.merge_shards.outputs.synthetic}}"
    assert bound(steps["validate"], "shards") == "8"
    # serverless multi-node fine-tuning: 2 nodes x 8 GPUs
    assert steps["finetune"]["computeId"].endswith("/computes/serverless")
    assert steps["finetune"]["resources"] == {"instance_count": 2, "instance_type": "Standard_ND96asr_v4"}
    assert steps["finetune"]["distribution"]["process_count_per_instance"] == 8
    # the parallel component's spec went over the wire with its entry script and retry policy
    spec = component_payloads(wire)["azdistill_synthesize_shards"]
    assert spec["task"]["entry_script"] == "components/synthesize_shards/entry.py"
    assert spec["error_threshold"] == 0 and spec["retry_settings"]["max_retries"] == 2
    # retrain: the data asset references travel as text, resolved by the validate step when it runs
    pipeline_inputs = job_payload(wire)["inputs"]
    assert pipeline_inputs["train_asset"] == {"jobInputType": "literal", "value": "azureml:sentiment-train@latest"}
    # the assets are looked up (a misspelt one fails now, not when the job runs) but not pinned
    assert {sent.path.removeprefix(WS_PATH) for sent in wire.sent("GET", r"/data/")} == {
        "/data/sentiment-train", "/data/sentiment-train/versions/3", "/data/sentiment-validation",
        "/data/sentiment-validation/versions/3", "/data/sentiment-test/versions/3",
    }  # fmt: skip
    assert all(pipeline_inputs[f"{split}_asset"]["jobInputType"] == "literal" for split in ("train", "validation", "test"))
    for name, step in steps.items():
        secret = step.get("environment_variables", {}).get("AZDISTILL_TEACHER_KEY_SECRET")
        expected = "https://kv-distill.vault.azure.net/secrets/teacher-key" if name in ("synthesize_shards", "evaluate") else None
        assert secret == expected, name
    assert TEACHER_KEY not in wire.all_text()


@pytest.mark.parametrize(
    ("method", "pattern", "status", "expected"),
    [
        ("PUT", r"/jobs/", 401, "Azure did not accept the credentials (401): sign in with `az login`"),
        ("PUT", r"/jobs/", 403, "has no permission on workspace ws-distill (resource group rg-distill, subscription 00000000-0000-0000-0000-0000000000aa) (403): ask an owner for the 'AzureML Data Scientist' role"),
        ("PUT", r"/jobs/", 404, "(404): check azure.subscription_id, azure.resource_group and azure.workspace_name"),
    ],
)
def test_authentication_permission_and_workspace_errors_say_what_to_fix(wire, azure_config, method, pattern, status, expected):
    wire.fail(method, pattern, status)
    result = submit(azure_config)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert expected in result.stderr


def test_a_missing_compute_is_named_with_the_fix(wire, make_config):
    wire.computes.pop("gpu-cluster")
    result = submit(make_config(extra=AZURE_SECTION))
    assert result.exit_code == 2, result.output
    assert "no compute 'gpu-cluster' in workspace ws-distill" in result.stderr
    assert "create it (infra/ deploys cpu-cluster and gpu-cluster)" in result.stderr


@pytest.mark.parametrize("pipeline", ["distill", "retrain"])
def test_dry_run_writes_a_yaml_that_load_job_reads_back_without_network_or_credentials(make_config, monkeypatch, tmp_path, pipeline):
    from azure.ai.ml import load_job

    for name in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME", "AZURE_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no config.json anywhere
    monkeypatch.setattr(workspace_module, "make_credential", lambda *a, **k: pytest.fail("a dry run asked for credentials"))
    config = make_config(extra=SHARDED_SECTION)
    out = tmp_path / "review"
    result = CliRunner().invoke(cli, ["submit", str(config), "--dry-run", "--pipeline", pipeline, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    path = out / f"{pipeline}.pipeline.yaml"
    assert f"job YAML: {path}" in result.stdout
    job = load_job(source=path)
    assert job.type == "pipeline"
    assert set(job.jobs) >= {"validate", "synthesize_shards", "merge_shards", "finetune", "evaluate", "register"}
    assert job.jobs["finetune"].distribution.process_count_per_instance == 8
    # local files travel with the YAML (relative paths), so the folder can be reviewed and submitted as is
    data = yaml.safe_load(path.read_text())
    assert data["inputs"]["config_file"]["path"] == "job-config.yaml"
    assert (out / "code" / "azdistill" / "cli" / "app.py").is_file()
    assert TEACHER_KEY not in path.read_text()


def test_without_a_workspace_submit_names_every_way_to_give_one(make_config, monkeypatch, tmp_path):
    for name in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    result = submit(make_config())
    assert result.exit_code == 2
    assert "no Azure ML workspace given: set azure.subscription_id (or AZURE_SUBSCRIPTION_ID)" in result.stderr
    assert "config.json" in result.stderr


def test_the_workspace_comes_from_config_json_when_nothing_else_names_it(monkeypatch, tmp_path):
    from azdistill.azure.workspace import resolve_workspace

    for name in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".azureml").mkdir()
    (tmp_path / ".azureml" / "config.json").write_text(json.dumps({"subscription_id": SUBSCRIPTION, "resource_group": RESOURCE_GROUP, "workspace_name": WORKSPACE}))
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    workspace = resolve_workspace(None)
    assert (workspace.subscription_id, workspace.resource_group, workspace.workspace_name) == (SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE)
    monkeypatch.setenv("AZUREML_WORKSPACE_NAME", "from-env")
    assert resolve_workspace(None).workspace_name == "from-env"


def test_a_key_vault_reference_must_not_be_a_key(make_config):
    config = make_config(extra=f"azure:\n  teacher_key_secret: {TEACHER_KEY}\n")
    result = CliRunner().invoke(cli, ["submit", str(config), "--dry-run"])
    assert result.exit_code == 2
    assert "never the key itself" in result.stderr
    assert TEACHER_KEY not in result.output


@pytest.mark.parametrize("pipeline", ["distill", "retrain"])
def test_the_example_config_dry_runs_each_pipeline_in_a_fresh_process(tmp_path, pipeline):
    """As a user on a clean clone would: the real CLI in its own process, no workspace, no credentials."""
    import os
    import subprocess
    import sys

    from azure.ai.ml import load_job

    from azdistill.config.sections import PROJECT_ROOT

    environment = {key: value for key, value in os.environ.items() if not key.startswith(("AZURE", "AZUREML"))}
    done = subprocess.run(
        [sys.executable, "-m", "azdistill", "submit", str(PROJECT_ROOT / "pipelines" / "sentiment.azure.yaml"), "--dry-run",
         "--pipeline", pipeline, "--output-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = load_job(source=tmp_path / f"{pipeline}.pipeline.yaml")
    assert "synthesize_shards" in job.jobs and job.experiment_name == "sentiment-distill"
    # what the user sees: our lines only, no SDK notices about experimental classes, no terminal colour codes
    assert "\x1b[" not in done.stdout + done.stderr
    assert "experimental class" not in done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------------
# The dry-run YAML as `az ml job create -f` takes it, registered data assets, and what the user sees

ASSETS_SECTION = """
azure:
  synthesis_shards: 1
  compute:
    cpu: {cluster: cpu-cluster}
    gpu: {cluster: gpu-cluster}
  data:
    train: azureml:sentiment-train@latest
    validation: azureml:sentiment-validation:2
    test: azureml:sentiment-test@latest
"""
SCHEDULE_LINE = "  schedule: {cron: '0 3 * * 1', time_zone: UTC}\n"


def dry_run(config: Path, out: Path, pipeline: str) -> Path:
    """Write a dry run's YAML into `out` (`schedule create --dry-run` for pipeline 'schedule'); its path."""
    if pipeline == "schedule":
        result = CliRunner().invoke(cli, ["schedule", "create", str(config), "--dry-run", "--set", f"workdir={out.parent / 'work'}"])
        assert result.exit_code == 0, result.output
        return Path(result.stdout.split("its job YAML: ")[1].strip())
    result = CliRunner().invoke(cli, ["submit", str(config), "--dry-run", "--pipeline", pipeline, "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    return out / f"{pipeline}.pipeline.yaml"


@pytest.mark.parametrize(
    ("pipeline", "section"),
    [
        ("distill", AZURE_SECTION),
        ("distill", SHARDED_SECTION),
        ("retrain", ASSETS_SECTION),
        ("retrain", SHARDED_SECTION),
        ("schedule", SHARDED_SECTION + SCHEDULE_LINE),
    ],
    ids=["distill", "distill-sharded", "retrain", "retrain-sharded", "schedule-sharded"],
)
def test_every_dry_run_yaml_validates_from_any_folder(make_config, monkeypatch, tmp_path, pipeline, section):
    """`az ml job create -f` runs load_job and then the SDK's validation from wherever the user stands."""
    from azure.ai.ml import load_job

    path = dry_run(make_config(extra=section), tmp_path / "review", pipeline)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = load_job(source=path)
    # jobs.validate / jobs.create_or_update: this local validation, then only the look-up of each compute
    validation = job._validate()
    assert validation.passed, validation.error_messages
    assert job._to_rest_object().properties.jobs
    for name, node in job.jobs.items():
        if node.type == "parallel":  # the parallel step's code is the staged folder beside the YAML
            assert Path(path.parent, node.task.code).resolve() == (path.parent / "code").resolve(), name


def data_lookups(wire: FakeWorkspace) -> set[str]:
    return {sent.path.removeprefix(WS_PATH) for sent in wire.sent("GET", r"/data/")}


def test_registered_data_assets_are_looked_up_by_name_and_pinned_to_their_version(wire, make_config):
    result = submit(make_config(extra=ASSETS_SECTION))
    assert result.exit_code == 0, result.output
    # the asset's own name (never a container called 'azureml:sentiment-train'), @latest resolved to the newest
    assert data_lookups(wire) == {
        "/data/sentiment-train", "/data/sentiment-train/versions/3", "/data/sentiment-validation/versions/2",
        "/data/sentiment-test", "/data/sentiment-test/versions/3",
    }  # fmt: skip
    job = job_payload(wire)
    for split, version in (("train", "3"), ("validation", "2"), ("test", "3")):
        assert job["inputs"][split]["jobInputType"] == "uri_file"
        assert job["inputs"][split]["uri"] == f"{WS_PATH}/data/sentiment-{split}/versions/{version}", split
        assert bound(job["jobs"]["validate"], split) == f"${{{{parent.inputs.{split}}}}}"


def test_the_dry_run_yaml_submitted_from_another_folder_sends_what_azdistill_submit_sends(wire, make_config, monkeypatch, tmp_path):
    """The same sharded pipeline two ways: `azdistill submit`, and its dry-run YAML as `az ml job create -f` sends it
    (load_job, then jobs.create_or_update) from another folder."""
    from azure.ai.ml import load_job

    config = make_config(extra=SHARDED_SECTION)
    path = dry_run(config, tmp_path / "review", "distill")
    assert submit(config).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    client = workspace_module.ml_client(workspace_module.resolve_workspace(None))
    client.jobs.create_or_update(load_job(source=path))
    by_azdistill, by_yaml = (sent.body["properties"] for sent in wire.sent("PUT", r"/jobs/[^/]+$"))
    for split, version in (("train", "3"), ("validation", "3"), ("test", "3")):
        assert by_azdistill["inputs"][split] == by_yaml["inputs"][split]
        assert by_yaml["inputs"][split]["uri"] == f"{WS_PATH}/data/sentiment-{split}/versions/{version}"
    assert set(by_azdistill["jobs"]) == set(by_yaml["jobs"])
    assert not [sent.path for sent in wire.requests if "azureml%3A" in sent.path or "azureml:" in sent.path]


@pytest.mark.parametrize("pipeline", ["distill", "retrain"])
@pytest.mark.parametrize(
    ("split", "reference"),
    [("train", "azureml:sentiment-train@latest"), ("validation", "azureml:sentiment-validation:2")],
    ids=["no-such-name", "no-such-version"],
)
def test_a_missing_data_asset_is_one_line_naming_it_before_anything_is_uploaded(wire, make_config, pipeline, split, reference):
    if split == "train":
        wire.data_assets.pop("sentiment-train")
    else:
        wire.data_assets["sentiment-validation"] = ["1"]
    result = submit(make_config(extra=ASSETS_SECTION), "--pipeline", pipeline)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert message.startswith(f"error: azure.data.{split}: no data asset {reference} in workspace ws-distill"), message
    assert "(404)" in message
    assert not wire.sent("PUT", r"/jobs/") and not wire.sent("POST", r"startPendingUpload")


class _Records(__import__("logging").Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


def test_submit_and_dry_run_print_no_sdk_notices_or_colour_codes(wire, azure_config, monkeypatch):
    import logging

    from azure.ai.ml._utils import _experimental

    # The SDK prints each experimental notice once per process, through a handler bound to the stderr of the
    # moment azure.ai.ml was imported: forget what it printed already and listen on its logger.
    monkeypatch.setattr(_experimental, "_warning_cache", set())
    records = _Records()
    sdk_logger = logging.getLogger("azure.ai.ml")
    sdk_logger.addHandler(records)
    try:
        dry = submit(azure_config, "--dry-run")
        real = submit(azure_config)
    finally:
        sdk_logger.removeHandler(records)
    assert dry.exit_code == 0 and real.exit_code == 0, dry.output + real.output
    for result in (dry, real):
        assert "\x1b[" not in result.output, result.output
        assert "experimental class" not in result.output
    assert not [message for message in records.messages if "experimental" in message]
    assert "submitted distill pipeline: job" in real.stdout
