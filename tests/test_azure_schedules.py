"""Schedules, job status and logs through the real azure-ai-ml SDK, with the workspace faked at the HTTP layer."""

from __future__ import annotations

import pytest
from azure_wire import FakeWorkspace
from click.testing import CliRunner
from test_azure_submit import TEACHER_KEY, bound, wire  # noqa: F401  (wire: the fixture)

from azdistill.cli import cli

DATA = """
  data:
    train: azureml:sentiment-train@latest
    validation: azureml:sentiment-validation@latest
    test: azureml:sentiment-test@latest
  teacher_connection: teacher-endpoint
"""


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def schedule_payload(wire: FakeWorkspace, name: str) -> dict:
    puts = wire.sent("PUT", rf"/schedules/{name}$")
    assert puts, f"no schedule {name} was sent"
    return puts[-1].body["properties"]


def test_a_cron_schedule_runs_the_retrain_pipeline_in_its_time_zone(wire, make_config):
    config = make_config(extra="azure:\n  schedule: {cron: '0 3 * * 1', time_zone: W. Europe Standard Time}\n" + DATA)
    result = invoke("schedule", "create", config)
    assert result.exit_code == 0, result.output
    sent = schedule_payload(wire, "unit-test-retrain")
    assert "unit-test-retrain: enabled, cron '0 3 * * 1' (W. Europe Standard Time)" in result.stdout
    assert sent["trigger"]["triggerType"] == "Cron"
    assert sent["trigger"]["expression"] == "0 3 * * 1" and sent["trigger"]["timeZone"] == "W. Europe Standard Time"
    assert sent.get("isEnabled", True) is True  # absent means enabled
    definition = sent["action"]["jobDefinition"]
    assert sent["action"]["actionType"] == "CreateJob" and definition["jobType"] == "Pipeline"
    # the latest data at trigger time: the asset references stay unresolved text in the schedule
    assert definition["inputs"]["train_asset"]["value"] == "azureml:sentiment-train@latest"
    assert bound(definition["jobs"]["validate"], "train_asset") == "${{parent.inputs.train_asset}}"
    assert bound(definition["jobs"]["register"], "promotion") == "champion_challenger"
    assert not wire.sent("GET", r"/data/")
    assert TEACHER_KEY not in wire.all_text()


def test_a_recurrence_schedule_sends_its_pattern(wire, make_config):
    schedule = "azure:\n  schedule: {name: weekly, frequency: week, interval: 2, week_days: [monday, thursday], hours: [4], minutes: [30], time_zone: Tokyo Standard Time}\n"
    result = invoke("schedule", "create", make_config(extra=schedule + DATA))
    assert result.exit_code == 0, result.output
    trigger = schedule_payload(wire, "weekly")["trigger"]
    assert trigger["triggerType"] == "Recurrence"
    assert (trigger["frequency"].lower(), trigger["interval"], trigger["timeZone"]) == ("week", 2, "Tokyo Standard Time")
    assert trigger["schedule"] == {"hours": [4], "minutes": [30], "weekDays": ["monday", "thursday"]}


def test_schedule_lifecycle_list_show_disable_enable_trigger_delete(wire, make_config):
    config = make_config(extra="azure:\n  schedule: {cron: '15 2 * * *'}\n" + DATA)
    assert invoke("schedule", "create", config).exit_code == 0
    listed = invoke("schedule", "list")
    assert listed.exit_code == 0 and "unit-test-retrain: enabled, cron '15 2 * * *' (UTC)" in listed.stdout
    shown = invoke("schedule", "show", "unit-test-retrain")
    assert "unit-test-retrain: enabled" in shown.stdout
    disabled = invoke("schedule", "disable", "unit-test-retrain")
    assert disabled.exit_code == 0, disabled.output
    assert schedule_payload(wire, "unit-test-retrain")["isEnabled"] is False
    assert "unit-test-retrain: disabled" in disabled.stdout
    assert invoke("schedule", "enable", "unit-test-retrain").exit_code == 0
    assert schedule_payload(wire, "unit-test-retrain")["isEnabled"] is True
    triggered = invoke("schedule", "trigger", "unit-test-retrain")
    assert triggered.exit_code == 0 and "job unit-test-retrain-manual-1" in triggered.stdout
    assert wire.sent("POST", r"/schedules/unit-test-retrain/trigger$")
    deleted = invoke("schedule", "delete", "unit-test-retrain")
    assert deleted.exit_code == 0 and wire.sent("DELETE", r"/schedules/unit-test-retrain$")


def test_an_unknown_schedule_is_a_clear_error(wire):
    result = invoke("schedule", "show", "nope")
    assert result.exit_code == 2
    assert "no schedule 'nope' in workspace ws-distill" in result.stderr


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("{cron: '0 3 * *'}", "cron needs 5 fields"),
        ("{cron: '0 3 * * 1', frequency: day}", "give either cron"),
        ("{frequency: day, time_zone: Mars Standard Time}", "'Mars Standard Time' is not a Windows time zone name"),
    ],
)
def test_bad_schedules_are_user_errors(make_config, schedule, message):
    result = invoke("schedule", "create", make_config(extra=f"azure:\n  schedule: {schedule}\n" + DATA), "--dry-run")
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_the_retrain_pipeline_needs_data_assets(make_config):
    result = invoke("schedule", "create", make_config(extra="azure:\n  schedule: {cron: '0 3 * * 1'}\n"), "--dry-run")
    assert result.exit_code == 2
    assert "set azure.data.train" in result.stderr


def test_status_lists_the_steps_and_logs_prints_each_step(wire, make_config):
    config = make_config(extra="azure:\n  experiment: distill-tests\n")
    submitted = invoke("submit", config)
    assert submitted.exit_code == 0, submitted.output
    name = wire.sent("PUT", r"/jobs/[^/]+$")[0].path.rsplit("/", 1)[1]
    wire.jobs[name]["properties"]["status"] = "Running"
    wire.children[name] = [
        {"runId": f"{name}_validate", "status": "Completed", "displayName": "validate", "properties": {"azureml.nodeid": "validate"}},
        {"runId": f"{name}_synthesize", "status": "Running", "displayName": "synthesize", "properties": {"azureml.nodeid": "synthesize"}},
    ]
    wire.log_texts[f"/logs/{name}_validate/std_log.txt"] = "train: 4 records\nconfig OK\n"

    status = invoke("status", name)
    assert status.exit_code == 0, status.output
    assert f"job {name}: Running" in status.stdout
    assert "validate: Completed" in status.stdout and "synthesize: Running" in status.stdout

    logs = invoke("logs", name, "--step", "validate")
    assert logs.exit_code == 0, logs.output
    assert "===== validate" in logs.stdout and "config OK" in logs.stdout

    missing = invoke("status", "no-such-job")
    assert missing.exit_code == 2
    assert "no job 'no-such-job' in workspace ws-distill" in missing.stderr
