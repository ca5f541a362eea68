"""Start-up before a stage's first piece of work, checked without a clock (bench/stage_startup.py measures it):

- a hosted-teacher synthesize stage loads neither torch nor transformers before its first request, and a stage with
  nothing to do does not load MLflow at all;
- MLflow's set-up runs beside the stage: the teacher answers every record while the tracking server is still
  being asked, and MLflow's error still fails the stage afterwards (the answers are kept: a rerun asks nothing);
- a new local store is a copy of one migrated store, the same schema MLflow makes itself, migrated once;
- `validate` holds a few bytes per record, not the records.

Real sockets on 127.0.0.1: the fake teacher, and a stand-in tracking server that holds its answer.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from fake_teacher_server import FakeTeacherServer
from retrains import retrain_config

from azdistill.data.splits import DigestSet, check_split
from azdistill.tracking.headline import pipeline_tags

ROOT = Path(__file__).resolve().parents[1]
TRAIN, VALIDATION = 4, 2


# Each test leaves no MLflow run open and no tracking URI set (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_tracking_left_behind")


def hosted_config(folder: Path, teacher_url: str, tracking: str = "") -> Path:
    """A hosted-teacher config with TRAIN + VALIDATION distinct records; tracking on (the local store) unless `tracking`
    says otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    system = {"role": "system", "content": "Classify the sentiment of the review: positive or negative."}
    for split, count in (("train", TRAIN), ("validation", VALIDATION), ("test", 2)):
        prompts = [f"Review: {split} review {index}, good." for index in range(count)]
        rows = [{"messages": [system, {"role": "user", "content": prompt}]} for prompt in prompts]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = folder / "config.yaml"
    config.write_text(
        f"""name: startup
task: {{type: nli, labels: [positive, negative]}}
data: {{train: train.jsonl, validation: validation.jsonl, test: test.jsonl}}
teacher:
  kind: openai-compatible
  endpoint: {teacher_url}/v1
  model: teacher
  auth: {{method: none}}
  local_copy: builtin
workdir: {folder / "work"}
{tracking}
"""
    )
    return config


# Runs `azdistill ARGS` and writes which heavy modules were loaded when the first connection to the teacher's port
# opened, and at exit.
WATCHED = """
import json, sys
port, out, heavy = int(sys.argv[1]), sys.argv[2], ("torch", "transformers", "mlflow", "sqlalchemy")
seen = {}
def hook(event, args):
    if event == "socket.connect" and "first_request" not in seen and isinstance(args[1], tuple) and args[1][1] == port:
        seen["first_request"] = [name for name in heavy if name in sys.modules]
sys.addaudithook(hook)
from azdistill.cli import main
try:
    main(sys.argv[3:])
finally:
    seen["exit"] = [name for name in heavy if name in sys.modules]
    open(out, "w").write(json.dumps(seen))
"""


def watched(port: int, out: Path, *args: str) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    environment.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-c", WATCHED, str(port), str(out), *args]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_hosted_synthesize_loads_no_model_library_before_its_first_request_and_a_reused_one_no_mlflow(tmp_path):
    with FakeTeacherServer(answer=lambda messages: "positive") as server:
        config = hosted_config(tmp_path, server.url)
        first = watched(server.port, tmp_path / "first.json", "synthesize", str(config))
        assert "first_request" in first
        assert "torch" not in first["first_request"] and "transformers" not in first["first_request"]
        assert "mlflow" in first["exit"]  # the stage's run was logged
        asked = server.counts["requests"]
        again = watched(server.port, tmp_path / "again.json", "synthesize", str(config))
    assert server.counts["requests"] == asked and "first_request" not in again  # nothing to do
    assert again["exit"] == []  # not even MLflow: the stage never began, so there was nothing to log


class _Teacher(FakeTeacherServer):
    """The fake teacher, saying when every training and validation prompt has been answered."""

    def __init__(self) -> None:
        super().__init__(answer=lambda messages: "positive")
        self.all_asked = threading.Event()

    def _handler(self):
        base, server = super()._handler(), self

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_POST(self) -> None:
                super().do_POST()
                if len(server.per_prompt) >= TRAIN + VALIDATION:
                    server.all_asked.set()

        return Handler


@pytest.fixture
def held_tracking_server() -> Iterator[tuple[str, threading.Event, list]]:
    """A tracking server that answers nothing until the event is set, then refuses every request with a 400; yields
    its URL, the event, and, per request, whether the event was set when it answered."""
    release, answered = threading.Event(), []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _refuse(self) -> None:
            answered.append(release.wait(timeout=120))
            error = {"error_code": "INVALID_PARAMETER_VALUE", "message": "the stand-in tracking server refuses"}
            body = json.dumps(error).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _refuse

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", release, answered
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_the_teacher_answers_while_mlflow_sets_up_and_mlflow_still_fails_the_stage(tmp_path, held_tracking_server, monkeypatch):
    from mlflow.exceptions import MlflowException

    from azdistill.config.loading import load_config
    from azdistill.stages.run import run_synthesize

    tracking_url, release, answered = held_tracking_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with _Teacher() as teacher:
        # The tracking server answers once the teacher has answered every prompt: a stage waiting for MLflow first
        # would never ask the teacher, and the tracking server would answer only at its own time limit.
        threading.Thread(target=lambda: release.set() if teacher.all_asked.wait(timeout=120) else None, daemon=True).start()
        config = load_config(hosted_config(tmp_path, teacher.url, f"tracking: {{uri: '{tracking_url}'}}"), ())
        with pytest.raises(MlflowException, match="the stand-in tracking server refuses"):
            run_synthesize(config)
        assert answered and answered[0] is True  # its first answer came after the teacher's last one
        stage = config.stage_dir("synthesize")
        journals = [stage / f"{split}.journal.jsonl" for split in ("train", "validation")]
        assert [len(journal.read_text().splitlines()) for journal in journals] == [TRAIN, VALIDATION]
        asked = teacher.counts["requests"]
        # Nothing the teacher answered is lost: the same stage with tracking off finishes from the journal.
        run_synthesize(config.model_copy(update={"tracking": config.tracking.model_copy(update={"enabled": False})}))
        assert teacher.counts["requests"] == asked


def test_a_failed_set_up_fails_the_pipeline_even_when_nothing_is_logged(tmp_path, held_tracking_server, monkeypatch):
    from mlflow.exceptions import MlflowException

    from azdistill.config.sections import TrackingConfig
    from azdistill.tracking.tracker import make_tracker

    tracking_url, release, _ = held_tracking_server
    release.set()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config = retrain_config(tmp_path, "1").model_copy(update={"tracking": TrackingConfig(uri=tracking_url)})
    tracker = make_tracker(config)
    with pytest.raises(MlflowException, match="the stand-in tracking server refuses"):
        with tracker.pipeline(tags=pipeline_tags(config)):
            with tracker.stage("synthesize"):
                pass  # reused: nothing logged


def schema(store: Path) -> list[tuple]:
    """Every table and index of a store with its definition, and the schema's revision. A definition's lines are
    sorted: MLflow's own migrations write a table's constraints in an order that changes from one run to the next."""
    with sqlite3.connect(store) as connection:
        entries = connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    connection.close()
    return [(kind, name, table, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
            for kind, name, table, sql in entries] + revision


def test_a_new_local_store_is_a_copy_of_one_migrated_store_as_mlflow_makes_it(tmp_path, monkeypatch):
    """MLflow migrates a new store from its first schema on, every migration in turn: seconds per new workdir."""
    import mlflow.store.db.utils as db_utils
    from mlflow import MlflowClient

    from azdistill.tracking.tracker import Tracker, make_tracker

    monkeypatch.setenv("AZDISTILL_CACHE", str(tmp_path / "cache"))
    migrated: list[str] = []
    migrate = db_utils._initialize_tables

    def counted(engine) -> None:
        migrated.append(engine.url.database)
        migrate(engine)

    monkeypatch.setattr(db_utils, "_initialize_tables", counted)
    for name, tracker_for in (("a", Tracker), ("b", make_tracker), ("c", make_tracker)):
        config = retrain_config(tmp_path / name, "1")
        tracker = tracker_for(config)
        with tracker.pipeline(tags=pipeline_tags(config)):
            with tracker.stage("synthesize"):
                tracker.log_metrics({"synthetic_train_kept": 4.0})
        runs = MlflowClient(tracking_uri=config.tracking_uri).search_runs([tracker.experiment_id])
        assert [run.data.metrics for run in runs if run.data.metrics] == [{"synthetic_train_kept": 4.0}] and len(runs) == 2
    assert len(migrated) == 1 and "empty-store-mlflow-" in migrated[0]  # the template, once
    own = tmp_path / "own.db"
    MlflowClient(tracking_uri=f"sqlite:///{own}").search_experiments()  # a store MLflow creates itself
    assert len(migrated) == 2
    assert schema(tmp_path / "c" / "mlflow.db") == schema(own)


def test_digest_set_tells_new_digests_from_repeats_as_it_grows():
    digests = DigestSet()
    values = [(index * 0x9E3779B97F4A7C15) % 2**64 for index in range(5000)]  # index 0: digest 0, the empty slot's value
    assert all(digests.add(value) for value in values)
    assert not any(digests.add(value) for value in values)
    assert len(digests) == len(values)


def test_validate_holds_a_few_bytes_per_record_not_the_records(tmp_path):
    """Counted by tracemalloc: every allocation, none of the clock. A record held takes over 1 KB and a Python set of
    prompt digests peaked at about 170 bytes a record; a `DigestSet` peaks at 48 (old and new slots while it grows)."""
    from conftest import records

    count = 20_000
    rows = records("nli", 4)
    path = tmp_path / "train.jsonl"
    with path.open("w") as handle:
        for index in range(count):
            row = rows[index % 4]
            user = {**row["messages"][1], "content": f"{row['messages'][1]['content']} #{index}"}
            handle.write(json.dumps({"messages": [row["messages"][0], user, *row["messages"][2:]]}) + "\n")
    tracemalloc.start()
    try:
        summary = check_split(path, "nli")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.records == count and summary.duplicates == 0
    assert peak < count * 48 + 256 * 1024, f"{peak / count:.0f} bytes a record"



def test_a_run_reads_the_training_data_once_itself_and_still_trains_the_reference_baseline(make_config, monkeypatch, tmp_path):
    """`azdistill run` checks the data before the first stage; that same pass over the training data tells whether it
    has reference answers, so the run reads it once (its stages, stubbed here, read what they need themselves)."""
    import collections

    from azdistill.config.loading import load_config
    from azdistill.data import records
    from azdistill.stages import evaluate as evaluate_stage
    from azdistill.stages import finetune as finetune_stage
    from azdistill.stages import run
    from azdistill.stages import synthesize as synthesize_stage

    config = load_config(make_config(task="nli"), ())
    reads: collections.Counter = collections.Counter()
    scan = records.scan_records

    def counted_scan(path, *args, **kwargs):
        reads[Path(path).name] += 1
        return scan(path, *args, **kwargs)

    monkeypatch.setattr(records, "scan_records", counted_scan)
    monkeypatch.setattr(run, "prepare_models", lambda config: run.Models(None, tmp_path / "student"))
    monkeypatch.setattr(run, "synthesis_teacher", lambda config, teacher: (None, "stub"))
    monkeypatch.setattr(synthesize_stage, "synthesize", lambda *args, **kwargs: tmp_path / "synthetic")
    trained: list[bool] = []
    monkeypatch.setattr(finetune_stage, "finetune",
                        lambda *args, on_references=False, **kwargs: trained.append(on_references) or tmp_path / "finetuned")
    monkeypatch.setattr(evaluate_stage, "evaluate", lambda *args, **kwargs: "report")

    run._run_stages(config, force=False, tracker=None)
    assert trained == [False, True]  # the student, then the reference baseline: the training data has answers
    assert reads == {"train.jsonl": 1, "validation.jsonl": 1, "test.jsonl": 1}
