"""`azdistill runs list` and `runs compare` on a local store holding three retrains."""

from __future__ import annotations

import io
import re

import pytest
from click.testing import CliRunner

from azdistill.cli import cli
from azdistill.errors import UserError
from azdistill.tracking.runs import direction, list_runs, resolve_run, runs_table, ui_compare_url, ui_experiment_url


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """v1 becomes champion, v2 beats it, v3 loses to v2."""
    from mlflow import MlflowClient
    from retrains import record_retrain

    workdir = tmp_path_factory.mktemp("runs")
    run_ids = [record_retrain(workdir, str(index), agreement, accuracy)[0]
               for index, (agreement, accuracy) in enumerate([(0.70, 0.84), (0.85, 0.86), (0.78, 0.88)], start=1)]
    return MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db"), run_ids, workdir


def name_of(run_ids: list[str], data_version: int) -> str:
    """The run name of retrain `data_version` of the store (see tracker.pipeline_run_name)."""
    return f"data-v{data_version} #{run_ids[data_version - 1][:6]} sentiment"


def overrides(workdir) -> list[str]:
    """`--set` options that point the (embedded demo) config at the test store."""
    return ["--set", "name=sentiment", "--set", f"tracking.uri=sqlite:///{workdir}/mlflow.db"]


def invoke(*args):
    # A wide terminal, so rich keeps each table row on one line and the assertions can read it.
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, [str(arg) for arg in args], catch_exceptions=False)
    return result


def row_of(output: str, text: str) -> str:
    (line,) = [line for line in output.splitlines() if text in line]
    return line


def test_list_runs_gives_every_retrain_newest_first_with_metrics_and_registry_state(store):
    client, run_ids, _ = store
    rows = list_runs(client, "sentiment", "sentiment-student")
    assert [row.run_id for row in rows] == run_ids[::-1]
    assert [row.data_version for row in rows] == ["3", "2", "1"]
    assert [(row.version, row.registry_state) for row in rows] == [("3", "challenger"), ("2", "champion"), ("1", "former champion")]
    assert rows[0].registry_reason == "agreement 0.78 does not beat champion version 2 (0.85)"
    assert rows[2].registry_reason == "replaced by version 2"
    assert rows[1].metrics["student_agreement"] == 0.85
    assert rows[1].params["data.version"] == "2"


def test_runs_logged_before_metrics_were_copied_to_the_parent_get_them_from_their_evaluate_run(store):
    client, run_ids, _ = store
    # A pipeline run as older versions left it: evaluation metrics on the nested evaluate run only.
    experiment_id = client.get_experiment_by_name("sentiment").experiment_id
    parent = client.create_run(experiment_id, run_name="sentiment@data-v0", tags={"azdistill.pipeline": "sentiment", "azdistill.data_version": "0"})
    child = client.create_run(experiment_id, run_name="evaluate", tags={"mlflow.parentRunId": parent.info.run_id, "azdistill.stage": "evaluate"})
    client.log_metric(child.info.run_id, "student_agreement", 0.5)
    client.set_terminated(child.info.run_id)
    client.set_terminated(parent.info.run_id)
    try:
        rows = list_runs(client, "sentiment", "sentiment-student")
        old = next(row for row in rows if row.run_id == parent.info.run_id)
        assert old.metrics == {"student_agreement": 0.5} and old.version is None
        assert len(rows) == 4  # stage runs are never listed as runs of their own
    finally:
        client.delete_run(child.info.run_id)
        client.delete_run(parent.info.run_id)


@pytest.mark.parametrize("ref, data_version", [
    ("data-v2", "2"), ("v1", "1"), ("@champion", "2"), ("V3", "3"),
])
def test_a_run_is_found_by_data_version_registered_version_or_alias(store, ref, data_version):
    client, _, _ = store
    rows = list_runs(client, "sentiment", "sentiment-student")
    assert resolve_run(rows, ref, "sentiment-student").data_version == data_version


def test_a_run_is_found_by_id_or_a_unique_prefix(store):
    client, run_ids, _ = store
    rows = list_runs(client, "sentiment", "sentiment-student")
    assert resolve_run(rows, run_ids[0]).run_id == run_ids[0]
    assert resolve_run(rows, run_ids[1][:10]).run_id == run_ids[1]
    assert resolve_run(rows, f"#{run_ids[2][:6]}").run_id == run_ids[2]  # as the run name shows it
    assert resolve_run(rows, name_of(run_ids, 1)).run_id == run_ids[0]


@pytest.mark.parametrize("ref, message", [
    ("nope", "nope: no pipeline run with that id or name (runs: data-v3 #{3} sentiment, data-v2 #{2} sentiment, data-v1 #{1} sentiment)"),
    ("v9", "v9: no run in this experiment registered version 9 of 'sentiment-student' (registered: v3, v2, v1)"),
    ("@prod", "@prod: the only alias azdistill sets is @champion"),
])
def test_an_unknown_run_is_a_user_error_that_lists_what_exists(store, ref, message):
    client, _, _ = store
    rows = list_runs(client, "sentiment", "sentiment-student")
    with pytest.raises(UserError) as error:
        resolve_run(rows, ref, "sentiment-student")
    run_ids = store[1]
    assert str(error.value) == message.format(None, *(run_id[:6] for run_id in run_ids))


def test_runs_table_puts_the_champion_metric_first(store):
    from rich.console import Console

    client, _, _ = store
    rows = list_runs(client, "sentiment", "sentiment-student")
    console = Console(file=io.StringIO(), width=250)
    console.print(runs_table(rows, "sentiment", "accuracy"))
    header = row_of(console.file.getvalue(), "started")
    assert re.search(r"accuracy\*\s+┃\s+agreement\s+┃\s+p50 s", header), header


def test_runs_list_command_prints_one_row_per_retrain(store):
    _, run_ids, workdir = store
    result = invoke("runs", "list", *overrides(workdir))
    assert result.exit_code == 0, result.output
    champion = row_of(result.output, name_of(run_ids, 2))
    assert run_ids[1][:8] in champion and "0.85" in champion and "passed" in champion and "v2 ★ champion" in champion
    assert "v3 challenger" in row_of(result.output, name_of(run_ids, 3))
    assert "v1 former champion" in row_of(result.output, name_of(run_ids, 1))
    # Below the table, why each version is where it is.
    assert "\n  v3 challenger: agreement 0.78 does not beat champion version 2 (0.85)\n" in result.output
    assert "\n  v2 champion: agreement 0.85 beats champion version 1 (0.7)\n" in result.output
    assert "\n  v1 former champion: replaced by version 2\n" in result.output
    assert "In the MLflow UI (azdistill ui): http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning" in result.output


def test_runs_list_limit(store):
    _, run_ids, workdir = store
    result = invoke("runs", "list", *overrides(workdir), "--limit", "1")
    assert name_of(run_ids, 3) in result.output and name_of(run_ids, 2) not in result.output
    assert "(2 older runs not shown; --limit 3 shows all)" in result.output


def test_runs_compare_command_shows_every_metric_the_change_and_the_settings_that_differ(store):
    _, run_ids, workdir = store
    result = invoke("runs", "compare", "v2", "data-v3", *overrides(workdir))
    assert result.exit_code == 0, result.output
    assert f"A: {name_of(run_ids, 2)}" in result.output and f"B: {name_of(run_ids, 3)}" in result.output
    assert re.search(r"student_agreement \*\s+│\s+0\.85\s+│\s+0\.78\s+│\s+-0\.07 \(-8%\)", result.output)
    assert re.search(r"student_accuracy\s+│\s+0\.86\s+│\s+0\.88\s+│\s+\+0\.02 \(\+2%\)", result.output)
    assert re.search(r"teacher_latency_p50_s\s+│\s+0\.2\s+│\s+0\.2\s+│\s+=", result.output)
    assert re.search(r"data\.version\s+│\s+2\s+│\s+3", result.output)
    assert "v2 ★ champion" in row_of(result.output, "registry")
    rows = list_runs(store[0], "sentiment", "sentiment-student")
    url = ui_compare_url([resolve_run(rows, "v2"), resolve_run(rows, "v3")])
    assert f"Same comparison in the MLflow UI (azdistill ui): {url}" in result.output
    assert run_ids[1] in url and run_ids[2] in url


def test_runs_compare_refuses_the_same_run_twice(store):
    _, run_ids, workdir = store
    result = invoke("runs", "compare", "v2", "@champion", *overrides(workdir))
    assert result.exit_code == 2
    assert f"error: v2 and @champion are the same run ({name_of(run_ids, 2)}," in result.stderr


def test_runs_commands_on_a_store_that_does_not_exist_say_what_to_run(tmp_path):
    missing = tmp_path / "none.db"
    for args in (["runs", "list"], ["runs", "compare", "v1", "v2"]):
        result = invoke(*args, "--set", f"tracking.uri=sqlite:///{missing}")
        assert result.exit_code == 2
        assert result.stderr == f"error: no runs yet: {missing} does not exist; run `azdistill run` first\n"
    assert not missing.exists()


def test_runs_list_on_an_unknown_experiment_names_the_ones_there(store):
    _, _, workdir = store
    result = invoke("runs", "list", "--set", f"tracking.uri=sqlite:///{workdir}/mlflow.db")
    assert result.exit_code == 2
    assert "error: no experiment 'sentiment-demo' in the tracking store; experiments in this store: Default, sentiment" in result.stderr


@pytest.mark.parametrize("command", ["list", "compare"])
def test_runs_subcommands_have_help_with_overrides(command):
    result = invoke("runs", command, "--help")
    assert result.exit_code == 0 and "--set KEY.PATH=VALUE" in result.output


def test_direction_of_change():
    assert direction("student_agreement") == 1
    assert direction("student_latency_p50_s") == -1 and direction("teacher_peak_memory_mb") == -1
    assert direction("stage_seconds_finetune") == -1
    assert direction("student_parameters") == 0 and direction("promote") == 0
    # The pipeline run's headline: student against teacher.
    assert direction("student_vs_teacher_speedup") == 1 and direction("quality_retained") == 1 and direction("agreement") == 1
    assert direction("student_vs_teacher_latency_ratio") == -1 and direction("student_vs_teacher_ttft_ratio") == -1
    assert direction("student_vs_teacher_latency_per_token_ratio") == -1 and direction("student_vs_teacher_memory_ratio") == -1
    assert direction("student_vs_teacher_param_ratio") == 0


def test_ui_addresses():
    assert ui_experiment_url("4") == "http://127.0.0.1:5000/#/experiments/4?workflowType=machine_learning"


# ---------------------------------------------------------------------------------------------------
# A workspace's MLflow: what the Azure ML pipeline leaves there (no aliases; the champion is a tag)


class WorkspaceModels:
    """`MLClient.models` as `azure/injob.py register_student` uses it, kept in an MLflow registry the way a
    workspace's MLflow shows it: versions with tags and no alias (Azure ML's MLflow has none)."""

    def __init__(self, client):
        self.client = client

    def create_or_update(self, model):
        from mlflow.exceptions import MlflowException

        if model.version is None:
            try:
                self.client.create_registered_model(model.name)
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            model.version = str(self.client.create_model_version(model.name, f"azureml://models/{model.name}", tags=model.tags).version)
        else:
            for key, value in model.tags.items():
                self.client.set_model_version_tag(model.name, str(model.version), key, value)
        return model

    def list(self, name):
        from azure.ai.ml.entities import Model

        versions = sorted(self.client.search_model_versions(f"name='{name}'"), key=lambda version: -int(version.version))
        return [Model(name=name, version=str(version.version), path=version.source, tags=dict(version.tags)) for version in versions]


def record_azure_retrain(client, workdir, data_version: str, agreement: float, accuracy: float) -> str:
    """One retrain as the Azure ML pipeline leaves it in the workspace's MLflow; returns the pipeline run id.

    The pipeline job is the parent run (the job's display name and tags, no params, no metrics); each step is a
    child run; the evaluate step logs through azdistill's Tracker into the run Azure ML made for it
    (MLFLOW_RUN_ID), and the register step applies the champion rule with tags, exactly as in a job.
    """
    import json as json_module
    from types import SimpleNamespace

    from retrains import make_report, retrain_config

    from azdistill.azure import injob
    from azdistill.azure.build import pipeline_tags
    from azdistill.evaluation.publish import write_report
    from azdistill.tracking.tracker import Tracker, log_evaluation

    config = retrain_config(workdir, data_version)
    experiment_id = client.get_experiment_by_name(config.experiment_name).experiment_id
    pipeline = client.create_run(experiment_id, run_name=f"{config.name}@data-{data_version}", tags=pipeline_tags(config, "distill"))
    parent = {"mlflow.parentRunId": pipeline.info.run_id}
    steps = {name: client.create_run(experiment_id, run_name=name, tags=parent) for name in ("validate", "finetune", "evaluate", "register")}
    report = make_report(config, agreement, accuracy)
    out_dir = workdir / f"azure-{data_version}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_RUN_ID", steps["finetune"].info.run_id)
        tracker = Tracker(config)
        with tracker.stage("finetune"):
            for step, loss in enumerate([2.4, 1.7, 1.2]):
                tracker.log_metrics({"train_loss": loss}, step=step)
        patch.setenv("MLFLOW_RUN_ID", steps["evaluate"].info.run_id)
        with tracker.stage("evaluate"):
            log_evaluation(tracker, report, write_report(report, out_dir / "evaluate"))
        patch.setenv("AZUREML_ROOT_RUN_ID", pipeline.info.run_id)
        (out_dir / "data.json").write_text(json_module.dumps({"version": data_version}))
        models = SimpleNamespace(models=WorkspaceModels(client))
        injob.register_student(
            out_dir, out_dir / "evaluate" / "report.json", out_dir / "data.json", config.registered_model_name, "builtin",
            "agreement", "champion_challenger", out_dir / "decision", client_factory=lambda: (models, None),
        )
    tracker.mlflow.set_tracking_uri(None)
    for step in steps.values():
        client.set_terminated(step.info.run_id)
    client.set_terminated(pipeline.info.run_id)
    return pipeline.info.run_id


@pytest.fixture(scope="module")
def workspace_store(tmp_path_factory):
    """Three retrains run on Azure ML: v1 becomes champion, v2 beats it, v3 loses to v2; no aliases anywhere."""
    from mlflow import MlflowClient

    workdir = tmp_path_factory.mktemp("workspace")
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    client.create_experiment("sentiment")  # `azdistill submit` names it (azure.experiment, default the config name)
    run_ids = [record_azure_retrain(client, workdir, str(index), agreement, accuracy)
               for index, (agreement, accuracy) in enumerate([(0.70, 0.84), (0.85, 0.86), (0.78, 0.88)], start=1)]
    assert client.get_registered_model("sentiment-student").aliases == {}
    return client, run_ids, workdir


def test_the_workspace_store_holds_the_champion_as_a_tag_only(workspace_store):
    client, _, _ = workspace_store
    tags = {str(version.version): version.tags for version in client.search_model_versions("name='sentiment-student'")}
    assert {version: tag["azdistill.champion"] for version, tag in tags.items()} == {"1": "false", "2": "true", "3": "false"}
    assert tags["1"]["promotion.replaced_by"] == "2" and tags["3"]["promotion.decision"] == "challenger"


def test_champion_version_reads_the_azure_tag_where_the_store_has_no_alias(workspace_store):
    from azdistill.tracking.registry import champion_version

    client, _, _ = workspace_store  # written by the Azure register step (azure/injob.py), read by the registry's reader
    assert champion_version(client, "sentiment-student") == "2"


def test_list_runs_on_a_workspace_store_takes_the_champion_from_the_tag_and_metrics_from_the_evaluate_step(workspace_store):
    client, run_ids, _ = workspace_store
    rows = list_runs(client, "sentiment", "sentiment-student")
    assert [row.run_id for row in rows] == run_ids[::-1]  # step runs are never listed as runs of their own
    assert [row.name for row in rows] == ["sentiment@data-3", "sentiment@data-2", "sentiment@data-1"]
    assert [(row.version, row.registry_state) for row in rows] == [("3", "challenger"), ("2", "champion"), ("1", "former champion")]
    assert rows[0].registry_reason == "agreement 0.78 does not beat champion version 2 (0.85)"
    assert rows[1].metrics["student_agreement"] == 0.85 and rows[1].metrics["promote"] == 1.0
    assert rows[1].params["data.version"] == "2"  # the config the steps ran with (the pipeline run has no params)
    assert resolve_run(rows, "@champion", "sentiment-student").run_id == run_ids[1]


def test_runs_list_command_reads_a_workspace_shaped_store(workspace_store):
    _, run_ids, workdir = workspace_store
    result = invoke("runs", "list", *overrides(workdir))
    assert result.exit_code == 0, result.output
    champion = row_of(result.output, "sentiment@data-2")
    assert run_ids[1][:8] in champion and "0.85" in champion and "passed" in champion and "v2 ★ champion" in champion
    assert "v3 challenger" in row_of(result.output, "sentiment@data-3")
    assert "v1 former champion" in row_of(result.output, "sentiment@data-1")
    assert "\n  v2 champion: agreement 0.85 beats champion version 1 (0.7)\n" in result.output
    assert "\n  v1 former champion: replaced by version 2\n" in result.output


def test_runs_compare_champion_with_v1_on_a_workspace_shaped_store(workspace_store):
    _, _, workdir = workspace_store
    result = invoke("runs", "compare", "@champion", "v1", *overrides(workdir))
    assert result.exit_code == 0, result.output
    assert "A: sentiment@data-2" in result.output and "B: sentiment@data-1" in result.output
    assert "v2 ★ champion" in row_of(result.output, "registry")
    assert re.search(r"student_agreement \*\s+│\s+0\.85\s+│\s+0\.7\s+│\s+-0\.15 \(-18%\)", result.output)
    assert re.search(r"data\.version\s+│\s+2\s+│\s+1", result.output)


def test_runs_workspace_flag_reads_the_workspace_store_and_its_experiment(workspace_store, monkeypatch):
    import azdistill.azure.workspace

    _, run_ids, workdir = workspace_store
    asked = []

    def fake_workspace_tracking_uri(azure_config, credential=None):
        asked.append(azure_config)
        return f"sqlite:///{workdir}/mlflow.db"

    monkeypatch.setattr(azdistill.azure.workspace, "workspace_tracking_uri", fake_workspace_tracking_uri)
    # The config's own store does not exist: --workspace must not read it. The experiment is azure.experiment.
    local = ["--set", "name=other", "--set", f"tracking.uri=sqlite:///{workdir}/none.db", "--set", "azure.experiment=sentiment",
             "--set", "tracking.registered_model=sentiment-student"]
    result = invoke("runs", "list", "--workspace", *local)
    assert result.exit_code == 0, result.output
    assert "v2 ★ champion" in row_of(result.output, "sentiment@data-2")
    assert asked and asked[0].experiment == "sentiment"
    assert "127.0.0.1" not in result.output  # no local UI serves a workspace's store
    result = invoke("runs", "compare", "--workspace", "@champion", "v1", *local)
    assert result.exit_code == 0, result.output
    assert "A: sentiment@data-2" in result.output and "B: sentiment@data-1" in result.output


def test_the_workspace_tracking_uri_is_built_from_subscription_resource_group_and_workspace(monkeypatch):
    import responses
    from azure_wire import RESOURCE_GROUP, SUBSCRIPTION, WORKSPACE, WS_PATH, FakeCredential, FakeWorkspace, workspace_env

    import azdistill.azure.workspace as workspace_module
    from azdistill.azure.workspace import workspace_tracking_uri

    monkeypatch.setattr(workspace_module, "CLIENT_OPTIONS", {"retry_total": 0})
    workspace_env(monkeypatch)
    wire = FakeWorkspace()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        wire.install(mock)
        uri = workspace_tracking_uri(None, credential=FakeCredential())
    assert not wire.unmatched
    assert [sent.path for sent in wire.sent("GET", ".*")] == [WS_PATH]
    assert WS_PATH == f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.MachineLearningServices/workspaces/{WORKSPACE}"
    # azureml-mlflow answers MLflow 2 and 3 clients on the v2.0 route of the same workspace.
    assert uri == f"azureml://westeurope.api.azureml.ms/mlflow/v2.0{WS_PATH}"


def test_a_workspace_that_is_not_there_is_a_user_error(monkeypatch):
    import responses
    from azure_wire import FakeCredential, FakeWorkspace, workspace_env

    import azdistill.azure.workspace as workspace_module
    from azdistill.azure.workspace import workspace_tracking_uri

    monkeypatch.setattr(workspace_module, "CLIENT_OPTIONS", {"retry_total": 0})
    workspace_env(monkeypatch)
    wire = FakeWorkspace()
    wire.fail("GET", r"/workspaces/[^/]+$", 404)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        wire.install(mock)
        with pytest.raises(UserError, match=r"workspace ws-distill .* was not found \(404\)"):
            workspace_tracking_uri(None, credential=FakeCredential())


def test_runs_links_follow_the_ui_port(store):
    _, _, workdir = store
    result = invoke("runs", "list", *overrides(workdir), "--ui-port", "5055")
    assert "In the MLflow UI (azdistill ui --port 5055): http://127.0.0.1:5055/#/experiments/1?workflowType=machine_learning" in result.output
    result = invoke("runs", "compare", "v1", "v2", *overrides(workdir), "--ui-port", "5055")
    assert "Same comparison in the MLflow UI (azdistill ui --port 5055): http://127.0.0.1:5055/#/compare-runs?" in result.output
