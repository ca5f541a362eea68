"""Opening the MLflow a tracker logs to, beside a stage's own work: MLflow imported, the store opened (a new local one
copied from a migrated template), the experiment made and the runs of killed processes closed, in a background
thread whose failure is raised where MLflow is next used.

Why a thread: importing MLflow and opening a store take about 1.5 s on an idle 2-core machine and many more on a
loaded one, and a new store's migrations more again. A stage's first piece of work (its teacher's first request, its model
loading) does not need MLflow; only what the stage logs does. Python runs one thread at a time, so the set-up
overlaps the stage's waiting (on the teacher, on the disk) rather than its computing.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Optional, TypeVar

from azdistill.config.schema import DistillConfig
from azdistill.tracking.store import create_local_store, local_artifact_location, local_store_path

log = logging.getLogger(__name__)

# Tells MLflow 3's UI an experiment is model training, so it opens on the runs table, not its GenAI views.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Where a run runs from: what `close_interrupted_runs` needs to tell a killed run from a live one.
WORKDIR_TAG = "azdistill.workdir"
HOST_TAG = "azdistill.host"
PID_TAG = "azdistill.pid"
PID_CREATE_TIME_TAG = "azdistill.pid_create_time"  # psutil's create_time: a pid reused by another process differs


def origin_tags(workdir: Path) -> dict[str, str]:
    """The tags that say where a run runs from: this workdir, this host, this process and when it started."""
    import psutil

    return {
        WORKDIR_TAG: str(Path(workdir).resolve()),
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PID_CREATE_TIME_TAG: repr(psutil.Process().create_time()),
    }


@dataclass
class Opened:
    """MLflow, ready for a config: the module, a client of its store, and its experiment."""

    mlflow: Any
    client: Any
    experiment_id: str


def open_experiment(config: DistillConfig) -> Opened:
    """Import MLflow, open the config's store (a new local one copied from a template: `store.create_local_store`) and
    make sure its experiment exists, all through a client. Nothing here changes MLflow's process-wide settings, so it
    may run in a background thread; `use_for_fluent_api` changes them, in the thread that logs."""
    import mlflow

    uri = config.tracking_uri
    store = local_store_path(uri)
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
        if not store.exists():
            create_local_store(store)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(config.experiment_name)
    if experiment is None:
        location, tags = local_artifact_location(uri), {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        experiment_id = client.create_experiment(config.experiment_name, artifact_location=location, tags=tags)
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
            # Created by an older azdistill, without the kind: the UI would open it on its GenAI views.
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return Opened(mlflow, client, experiment_id)


def use_for_fluent_api(opened: Opened, tracking_uri: str) -> None:
    """Point MLflow's fluent API (the active run, `log_model`) at the store and the experiment."""
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    opened.mlflow.set_tracking_uri(tracking_uri)
    # MLflow also exports the URI to the environment; a later config in this process (two runs from one notebook,
    # the tests) would take it for the user's own MLFLOW_TRACKING_URI (DistillConfig.tracking_uri) and track into
    # this store instead of its own. MLflow keeps the URI it was given; the environment stays as it was.
    if exported is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = exported
    opened.mlflow.set_experiment(experiment_id=opened.experiment_id)


def close_interrupted_runs(opened: Opened, origin: dict[str, str]) -> list[str]:
    """Close as KILLED the runs of this workdir left RUNNING by an azdistill process that is gone; returns their ids.

    Only runs tagged with the workdir and host of `origin` are judged: their process is gone when its pid is not
    alive, or is alive but started at another time (the pid now belongs to another process). A run of a live
    process, of another machine, or without these tags is left as it is.
    """
    if os.environ.get("MLFLOW_RUN_ID"):
        return []  # inside an Azure ML job: Azure ML keeps its runs' status
    running = opened.client.search_runs([opened.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    closed = []
    for run in running:
        tags = run.data.tags
        if tags.get(WORKDIR_TAG) != origin[WORKDIR_TAG] or tags.get(HOST_TAG) != origin[HOST_TAG]:
            continue
        if _process_alive(tags.get(PID_TAG), tags.get(PID_CREATE_TIME_TAG)):
            continue
        opened.client.set_terminated(run.info.run_id, status="KILLED")
        log.info("closed run %s (pid %s) left RUNNING by an interrupted azdistill as KILLED", run.info.run_id, tags.get(PID_TAG))
        closed.append(run.info.run_id)
    return closed


def _process_alive(pid: Optional[str], create_time: Optional[str]) -> bool:
    """Whether process `pid` still runs and is the one that started at `create_time` (not a later one given its pid).
    Tags that cannot be read count as alive: a run we cannot judge is not ours to close."""
    import psutil

    try:
        process = psutil.Process(int(pid))  # type: ignore[arg-type]
        started = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped by its parent
            return False
        return abs(started - float(create_time)) < 1.0  # type: ignore[arg-type]
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except (TypeError, ValueError, psutil.AccessDenied):
        return True


T = TypeVar("T")


class Background(Generic[T]):
    """`work()` running in a thread from now on; `wait()` returns its result, or raises its exception (the very one,
    at every call).

    A daemon thread, so that Ctrl-C ends the process at once, as it did when the work ran in the main thread (set
    `interrupted`); at any other exit the process waits for it, so it never stops halfway (a store's files are whole
    anyway: see `store.create_local_store`)."""

    def __init__(self, work: Callable[[], T], name: str):
        self._work = work
        self._result: Optional[T] = None
        self._error: Optional[BaseException] = None
        self.interrupted = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        atexit.register(self._finish_at_exit)

    def _run(self) -> None:
        try:
            self._result = self._work()
        except BaseException as error:  # raised in the waiting thread by `wait`
            self._error = error

    def wait(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _finish_at_exit(self) -> None:
        if not self.interrupted:
            self._thread.join()
