"""MLflow tells the truth: a run whose process was killed is closed as KILLED when the next run starts, and a rerun
that changed nothing leaves no run behind (a run starts in MLflow only once something is logged under it).

Real SQLite stores in tmp_path; the killed and the live run come from a second Python process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from retrains import QuickTracker, make_report, retrain_config

from azdistill.evaluation.publish import write_report
from azdistill.tracking.headline import pipeline_tags
from azdistill.tracking.tracker import Tracker, log_evaluation

ROOT = Path(__file__).resolve().parents[1]

# Starts a pipeline run and a finetune run under it, prints their ids, then kills itself ("kill") or holds the runs
# open until its stdin closes ("hold").
ELSEWHERE = """
import os, signal, sys
from retrains import retrain_config
from azdistill.tracking.headline import pipeline_tags
from azdistill.tracking.tracker import Tracker
config = retrain_config(sys.argv[1], "1")
tracker = Tracker(config)
with tracker.pipeline(tags=pipeline_tags(config)):
    with tracker.stage("finetune"):
        tracker.log_metrics({"train_loss": 2.0}, step=0)
        stage_id = tracker.run_id
        print(tracker.client.get_run(stage_id).data.tags["mlflow.parentRunId"], stage_id, flush=True)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.readline()
"""


# Each test leaves no MLflow run open and no tracking URI set (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_tracking_left_behind")


def elsewhere(workdir: Path, mode: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen(
        [sys.executable, "-c", ELSEWHERE, str(workdir), mode], cwd=ROOT, env=environment,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def client_for(config):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.tracking_uri)


def all_runs(config) -> list:
    """Every run of the config's experiment, newest first."""
    client = client_for(config)
    experiment = client.get_experiment_by_name(config.experiment_name)
    if experiment is None:
        return []
    return list(client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"]))


def status(config, run_id: str) -> str:
    return client_for(config).get_run(run_id).info.status


def test_a_killed_run_is_closed_as_killed_when_the_next_run_starts(tmp_path, caplog):
    config = retrain_config(tmp_path, "1")
    killed = elsewhere(tmp_path, "kill")
    output, _ = killed.communicate(timeout=180)
    assert killed.returncode == -signal.SIGKILL
    parent_id, stage_id = output.split()
    assert status(config, parent_id) == status(config, stage_id) == "RUNNING"  # what a kill leaves

    tracker = Tracker(config)
    with caplog.at_level(logging.INFO, logger="azdistill"):
        with tracker.pipeline(tags=pipeline_tags(config)):
            with tracker.stage("synthesize"):
                tracker.log_metrics({"synthetic_train_kept": 4.0})
                new_id = tracker.run_id
                assert status(config, new_id) == "RUNNING"
    assert status(config, parent_id) == status(config, stage_id) == "KILLED"
    assert status(config, new_id) == "FINISHED"
    for run_id in (parent_id, stage_id):
        assert f"closed run {run_id} (pid {killed.pid}) left RUNNING by an interrupted azdistill as KILLED" in caplog.messages


def test_a_run_whose_process_is_alive_is_left_running(tmp_path):
    config = retrain_config(tmp_path, "1")
    live = elsewhere(tmp_path, "hold")
    try:
        parent_id, stage_id = live.stdout.readline().split()
        tracker = Tracker(config)
        with tracker.pipeline(tags=pipeline_tags(config)):
            with tracker.stage("synthesize"):
                tracker.log_metrics({"synthetic_train_kept": 4.0})
        assert status(config, parent_id) == status(config, stage_id) == "RUNNING"
    finally:
        live.stdin.close()
        live.wait(timeout=120)
    assert live.returncode == 0
    assert status(config, parent_id) == status(config, stage_id) == "FINISHED"


def test_only_runs_of_this_workdir_and_host_whose_process_is_gone_are_closed(tmp_path):
    """A pid alive under another process (started at another time) is a gone run; another host's run or another
    workdir's is not ours to judge, and a run without the tags cannot be judged."""
    config = retrain_config(tmp_path, "1")
    tracker = Tracker(config)  # creates the experiment
    client = client_for(config)
    experiment_id = client.get_experiment_by_name(config.experiment_name).experiment_id
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    gone_pid = exited.stdout.strip()
    origin = {"azdistill.workdir": str(Path(config.workdir).resolve()), "azdistill.host": socket.gethostname(),
              "azdistill.pid": gone_pid, "azdistill.pid_create_time": "1000000000.0"}

    def left_running(**tags: str) -> str:
        return client.create_run(experiment_id, tags={**origin, **tags}).info.run_id

    gone = left_running()
    pid_reused = left_running(**{"azdistill.pid": str(os.getpid())})  # this process's pid, but it started in 2001
    other_host = left_running(**{"azdistill.host": "another-host"})
    other_workdir = left_running(**{"azdistill.workdir": str(tmp_path / "elsewhere")})
    untagged = client.create_run(experiment_id).info.run_id

    with tracker.pipeline(tags=pipeline_tags(config)):
        pass  # closing happens when a run would start, whether or not it logs anything
    assert status(config, gone) == status(config, pid_reused) == "KILLED"
    assert status(config, other_host) == status(config, other_workdir) == status(config, untagged) == "RUNNING"


def test_a_rerun_whose_stages_log_nothing_leaves_no_run(tmp_path):
    config = retrain_config(tmp_path, "1")
    tracker = Tracker(config)
    with tracker.pipeline(tags=pipeline_tags(config)):
        # synthesize and finetune return before entering their stage when they reuse their outputs; a stage that
        # enters and logs nothing must not leave a run either.
        with tracker.stage("evaluate"):
            pass
        assert tracker.run_id is None
    assert all_runs(config) == []


def test_a_stage_that_logs_starts_its_run_under_the_pipeline_run_from_when_it_was_entered(tmp_path):
    config = retrain_config(tmp_path, "1")
    tracker = Tracker(config)
    report = make_report(config, agreement=0.8, accuracy=0.85)
    with tracker.pipeline(tags=pipeline_tags(config)):
        with tracker.stage("synthesize"):
            pass  # reused
        entered = int(time.time() * 1000)
        with tracker.stage("finetune"):
            time.sleep(1.0)
            tracker.log_params({"stage.examples": 4})
            tracker.log_metrics({"train_loss": 1.0}, step=0)
        with tracker.stage("evaluate"):
            log_evaluation(tracker, report, write_report(report, tmp_path / "evaluate"))
        parent_id = tracker.run_id
    client = client_for(config)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    label = f"data-v1 #{parent_id[:6]}"
    assert sorted(run.info.run_name for run in children) == [f"{label} / evaluate", f"{label} / finetune"]
    assert len(all_runs(config)) == 3
    assert parent.info.run_name == f"{label} sentiment" and parent.data.params["data.version"] == "1"
    evaluate = next(run for run in children if run.data.tags["azdistill.stage"] == "evaluate")
    assert evaluate.data.metrics["student_agreement"] == 0.8 and "student_agreement" not in parent.data.metrics
    assert parent.data.tags["azdistill.promote"] == "true"
    assert "**Decision:** pending" in parent.data.tags["mlflow.note.content"]  # until the student is registered
    finetune = next(run for run in children if run.data.tags["azdistill.stage"] == "finetune")
    assert finetune.data.params["stage.examples"] == "4"
    assert finetune.info.start_time < entered + 700  # the time the stage began, not the time it first logged
    assert parent.info.start_time <= finetune.info.start_time
    for run in (parent, *children):
        assert run.info.status == "FINISHED"
        assert run.data.tags["azdistill.workdir"] == str(Path(config.workdir).resolve())
        assert run.data.tags["azdistill.host"] == socket.gethostname()
        assert run.data.tags["azdistill.pid"] == str(os.getpid())
        assert "azdistill.pid_create_time" in run.data.tags


def test_an_interrupted_run_ends_killed_and_a_failed_one_failed(tmp_path):
    config = retrain_config(tmp_path, "1")
    tracker = Tracker(config)
    for error, expected in ((KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")):
        with pytest.raises(error):
            with tracker.pipeline(tags=pipeline_tags(config)):
                with tracker.stage("finetune"):
                    tracker.log_metrics({"train_loss": 1.0}, step=0)
                    raise error()
        assert {run.info.status for run in all_runs(config)[:2]} == {expected}


def test_run_local_again_with_nothing_changed_says_so_and_adds_no_run(tmp_path, write_dataset, monkeypatch, caplog):
    """`run_local` twice with stand-in stages: the first does the work, the second reuses every stage as the real
    ones do (synthesize and finetune return before their stage, evaluate enters its stage and logs nothing)."""
    from azdistill.stages import evaluate as evaluate_module
    from azdistill.stages import finetune as finetune_module
    from azdistill.stages import run as local_runner
    from azdistill.stages import synthesize as synthesize_module

    base = retrain_config(tmp_path, "1")
    splits = write_dataset()
    config = base.model_copy(update={
        "data": base.data.model_copy(update=splits),
        "evaluation": base.evaluation.model_copy(update={"reference_baseline": False}),
    })
    (tmp_path / "student-init").mkdir()
    student = tmp_path / "finetune" / "model"
    student.mkdir(parents=True)
    (student / "config.json").write_text("{}")
    report = make_report(config, agreement=0.8, accuracy=0.85)
    work = {"todo": True}

    def synthesize(config, factory, tracker, force, teacher_identity=None):
        if work["todo"]:
            with tracker.stage("synthesize"):
                tracker.log_metrics({"synthetic_train_kept": 4.0})
        return tmp_path / "synthesize"

    def finetune(config, student_init, teacher, synthetic, tracker, force, on_references=False):
        if work["todo"]:
            with tracker.stage("finetune"):
                tracker.log_params({"stage.examples": 4})
                tracker.log_metrics({"train_loss": 1.0}, step=0)
        return tmp_path / "finetune"

    def evaluate(config, teacher, models, tracker, force):
        with tracker.stage("evaluate"):
            if work["todo"]:
                log_evaluation(tracker, report, write_report(report, tmp_path / "evaluate"))
        return report

    monkeypatch.setattr(local_runner, "prepare_models", lambda config: local_runner.Models(None, tmp_path / "student-init"))
    monkeypatch.setattr(local_runner, "synthesis_teacher", lambda config, teacher: (None, None))
    monkeypatch.setattr(synthesize_module, "synthesize", synthesize)
    monkeypatch.setattr(finetune_module, "finetune", finetune)
    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)

    first = local_runner.run_local(config, tracker=QuickTracker(config))
    assert first.run_id is not None and first.registered_version == "1" and first.promotion is not None
    runs_after_first = [run.info.run_id for run in all_runs(config)]
    assert len(runs_after_first) == 4  # the pipeline run and its three stages

    work["todo"] = False
    with caplog.at_level(logging.INFO, logger="azdistill"):
        second = local_runner.run_local(config, tracker=QuickTracker(config))
    assert [run.info.run_id for run in all_runs(config)] == runs_after_first
    name = f"data-v1 #{first.run_id[:6]} sentiment"
    assert f"nothing changed since run {first.run_id} ({name}): every stage reused; no new MLflow run" in caplog.messages
    first_run = client_for(config).get_run(first.run_id)
    assert first_run.data.metrics["promoted"] == 1.0 and first_run.data.metrics["agreement"] == 0.8
    assert "**Decision: champion.**" in first_run.data.tags["mlflow.note.content"]
    assert second.run_id == first.run_id and second.registered_version == "1"
    assert json.loads((config.run_dir / "run.json").read_text())["run_id"] == first.run_id
