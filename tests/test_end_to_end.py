"""One end-to-end local run: the real built-in teacher, the embedded demo config cut down, a real MLflow store."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from azdistill.cli import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    overrides = [
        f"workdir={workdir}",
        "data.max_records=12",
        "training.epochs=1",
        "evaluation.latency_samples=3",
        # A dozen records is too few for the 70% floor to mean anything with a 135M teacher.
        "synthesis.min_success_ratio=0.2",
    ]
    args = ["run"] + [item for override in overrides for item in ("--set", override)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return workdir, args, result


def test_run_prints_report_location_headline_and_how_to_open_mlflow(finished_run):
    workdir, _, result = finished_run
    assert result.exit_code == 0, result.output
    assert f"Report: {workdir}/runs/sentiment-demo/evaluate/report.md" in result.output
    # Faster or slower: a dozen records and three timed answers on a busy machine decide that, not the code.
    assert "per response (p50" in result.output and "agreement with teacher" in result.output
    # The hint repeats the overrides, so it opens this run's store, not the default one.
    assert f"Open the MLflow UI with: azdistill ui --set workdir={workdir} --set data.max_records=12" in result.output


def test_report_has_every_model_and_every_figure(finished_run):
    workdir, _, _ = finished_run
    report = json.loads((workdir / "runs/sentiment-demo/evaluate/report.json").read_text())
    assert [model["role"] for model in report["models"]] == ["teacher", "student", "baseline", "reference_sft"]
    for model in report["models"]:
        for key in ("parameters", "size_on_disk_mb", "weights_memory_mb", "peak_memory_mb", "latency_p50_s",
                    "latency_p95_s", "throughput_tokens_per_s"):
            assert model[key] > 0 and math.isfinite(model[key]), (model["role"], key)
        assert model["n"] == 12
        expected = {"accuracy", "parse_rate"} | ({"agreement"} if model["role"] != "teacher" else set())
        assert set(model["metrics"]) == expected
    teacher, student = report["models"][0], report["models"][1]
    assert student["parameters"] / teacher["parameters"] < 0.5
    assert {check["name"] for check in report["checks"]} >= {"agreement", "latency_ratio"}
    markdown = (workdir / "runs/sentiment-demo/evaluate/report.md").read_text()
    assert markdown.count("\n| ") >= 5  # header and one row per model
    assert (workdir / "runs/sentiment-demo/evaluate/report.png").read_bytes()[:4] == b"\x89PNG"


def test_mlflow_holds_a_parent_run_with_nested_stage_runs_and_the_registered_student(finished_run):
    import mlflow
    from mlflow import MlflowClient

    workdir, _, _ = finished_run
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("sentiment-demo")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["training.learning_rate"] == "0.0003"
    assert parent.data.tags["azdistill.data_version"] == "1"
    children = {run.data.tags["azdistill.stage"]: run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"synthesize", "finetune", "finetune-reference", "evaluate"}
    assert len(client.get_metric_history(children["finetune"].info.run_id, "train_loss")) >= 2
    assert "student_agreement" in children["evaluate"].data.metrics
    artifacts = {item.path for item in client.list_artifacts(children["evaluate"].info.run_id)}
    assert {"report.md", "report.json", "report.png"} <= artifacts
    versions = client.search_model_versions("name='sentiment-demo-student'")
    assert len(versions) == 1 and versions[0].run_id == parent.info.run_id
    assert versions[0].tags["data_version"] == "1"
    mlflow.set_tracking_uri(None)


def test_a_second_run_with_nothing_changed_skips_every_stage(finished_run, caplog):
    workdir, args, _ = finished_run
    run_dir = workdir / "runs/sentiment-demo"
    stages = ["synthesize", "finetune", "finetune-reference", "evaluate"]
    # What each stage wrote, down to the nanosecond: a stage that reran would write these again.
    written = {path: path.stat().st_mtime_ns for stage in stages for path in (run_dir / stage).rglob("*") if path.is_file()}
    answers = {path: path.read_bytes() for path in (run_dir / "evaluate/predictions").glob("*.json")}
    assert len(answers) == 4  # teacher, student, baseline, reference_sft
    with caplog.at_level("INFO", logger="azdistill"):
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0
    assert result.output.count("Report:") == 1
    # Every stage is reused, the evaluation's report included, and MLflow gets no new run.
    reused = [record.getMessage() for record in caplog.records if "reusing" in record.getMessage() and "answers" not in record.getMessage()]
    assert [message.split(":")[0] for message in reused] == stages, reused
    assert "nothing changed since run" in result.output and "no new run" in result.output
    assert not any("answers" in record.getMessage() and "held-out prompts" in record.getMessage() for record in caplog.records)
    assert {path: path.stat().st_mtime_ns for path in written} == written
    assert {path: path.read_bytes() for path in answers} == answers


def test_a_moved_model_cache_reruns_no_stage(finished_run, tmp_path, monkeypatch):
    """Models are known by their content: the same teacher in another cache folder (copied with its files' times, as
    `mv` or `cp -a` keep them) leaves the pruned student, and so every stage, as they were."""
    import shutil

    from azdistill.models.builtin import builtin_teacher_path
    from azdistill.models.files import cache_dir

    workdir, args, _ = finished_run
    run_dir = workdir / "runs/sentiment-demo"
    teacher = builtin_teacher_path()
    moved = tmp_path / "moved-cache"
    shutil.copytree(teacher, moved / teacher.relative_to(cache_dir()), copy_function=shutil.copy2)
    monkeypatch.setenv("AZDISTILL_CACHE", str(moved))
    assert builtin_teacher_path() != teacher and builtin_teacher_path().is_relative_to(moved)
    # The pruned student and what every stage wrote, down to the nanosecond (run.json and the lock file are the
    # runner's own, written by every run).
    folders = ["student-init", "synthesize", "finetune", "finetune-reference", "evaluate"]
    written = {path: path.stat().st_mtime_ns for folder in folders for path in (run_dir / folder).rglob("*") if path.is_file()}
    assert len(written) > 20
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "nothing changed since run" in result.output and "no new run" in result.output
    rewritten = sorted(str(path.relative_to(run_dir)) for path, mtime in written.items() if path.stat().st_mtime_ns != mtime)
    assert rewritten == []


@pytest.mark.parametrize("task", ["nli", "qa", "math", "summarization", "conversation", "chat"])
def test_every_sample_task_runs_through_every_stage(task, tmp_path):
    """Each bundled sample config, cut to a few records, goes through synthesize, finetune and evaluate."""
    from azdistill.config.sections import PROJECT_ROOT

    overrides = [
        f"workdir={tmp_path}", "data.max_records=6", "training.epochs=1", "evaluation.latency_samples=1",
        "evaluation.reference_baseline=false", "synthesis.min_success_ratio=0", "tracking.enabled=false",
    ]
    args = ["run", str(PROJECT_ROOT / "data" / task / "config.yaml")] + [x for o in overrides for x in ("--set", o)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (report_path,) = tmp_path.glob("runs/*/evaluate/report.json")
    report = json.loads(report_path.read_text())
    assert [model["role"] for model in report["models"]] == ["teacher", "student", "baseline"]
    student = report["models"][1]
    assert "agreement" in student["metrics"]
    assert report["primary_metric"] in student["metrics"]
