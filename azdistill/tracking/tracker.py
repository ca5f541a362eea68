"""MLflow tracking: one parent run per pipeline, a nested run per stage, the student in the model registry.

Stages talk to a `Tracker`; `NullTracker` has the same methods and does nothing, for runs with tracking off
and for unit tests that do not look at MLflow.

Names are fixed so MLflow's compare view lines retrains up side by side:

- the parent run is `<name>@data-v<version>` (`pipeline_run_name`), tagged `azdistill.*` (`pipeline_tags`);
- each stage is a nested run named after the stage and tagged `azdistill.stage`;
- evaluation metrics are `<role>_<metric>` (`student_agreement`, `teacher_latency_p50_s`, ...), and the
  training loss is the `train_loss` history of the finetune run;
- what the evaluate stage logs (metrics without a step, tags, the report files) is also logged on the parent
  run, so comparing parent runs compares retrains, and a parent run shows its report without opening a child.

What MLflow shows is what happened:

- a run starts in MLflow only once something is logged under it (dated from when its pipeline or stage began),
  so a rerun whose stages all reuse their outputs leaves no run behind;
- every run is tagged with where it runs from (`azdistill.workdir`, `azdistill.host`, `azdistill.pid` and the
  process's start time); a run left RUNNING by a process that is gone (killed) is closed as KILLED when the next
  pipeline or stage of that workdir begins. A run whose process is alive is never touched.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from azdistill.config.loading import config_to_params
from azdistill.config.schema import DistillConfig
from azdistill.evaluation.report import error_bar_metrics, is_finite
from azdistill.tracking.store import local_artifact_location, local_store_path

log = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters; longer values (system prompts) are cut rather than failing the run.
MAX_PARAM_LENGTH = 6000
# Stages whose results describe the whole pipeline; see the module docstring.
SUMMARY_STAGES = ("evaluate",)
STAGE_TAG = "azdistill.stage"
# Where a run runs from: what `Tracker.close_interrupted_runs` needs to tell a killed run from a live one.
WORKDIR_TAG = "azdistill.workdir"
HOST_TAG = "azdistill.host"
PID_TAG = "azdistill.pid"
PID_CREATE_TIME_TAG = "azdistill.pid_create_time"  # psutil's create_time: a pid reused by another process differs


def pipeline_run_name(config: DistillConfig) -> str:
    """Name of a pipeline's parent run: the retrains of one config differ by their data version."""
    return f"{config.name}@data-v{config.data.version}"


def pipeline_tags(config: DistillConfig, mode: str = "local") -> dict[str, str]:
    """Tags of a pipeline's parent run: what was distilled into what, on which data, where."""
    return {
        "azdistill.pipeline": config.name,
        "azdistill.task": config.task.type,
        "azdistill.teacher": config.teacher.label,
        "azdistill.student": config.student.model,
        "azdistill.data_version": config.data.version,
        "azdistill.mode": mode,
    }


def evaluation_metrics(report: Any) -> dict[str, float]:
    """What an evaluation logs: `<role>_<metric>` for each model's quality metrics and its cost figures
    (latency p50/p95, throughput, peak memory, parameters, cost per 1,000 answers), and `promote` (1 if every check passed)."""
    metrics: dict[str, float] = {}
    for model in report.models:
        metrics.update({f"{model.role}_{name}": value for name, value in model.metrics.items()})
        metrics.update(
            {
                f"{model.role}_latency_p50_s": model.latency_p50_s,
                f"{model.role}_latency_p95_s": model.latency_p95_s,
                f"{model.role}_throughput_tokens_per_s": model.throughput_tokens_per_s,
                f"{model.role}_peak_memory_mb": model.peak_memory_mb,
                f"{model.role}_parameters": model.parameters,
                f"{model.role}_cost_per_1k_answers": model.cost_per_1k_answers,
            }
        )
    metrics["promote"] = float(report.promote)
    return metrics


def log_evaluation(tracker: "NullTracker", report: Any, paths: dict[str, Path]) -> None:
    """Log an evaluation report to the active (evaluate) run: its metrics with the student's error bars
    (`student_<metric>_ci_low` / `_ci_high`, `student_vs_<role>_<metric>_p_value`), the promote tag and the report
    files (`report.md`, `report.json`, and `report.png`, which the MLflow UI shows as an image)."""
    metrics = {**evaluation_metrics(report), **error_bar_metrics(report)}
    tracker.log_metrics({key: value for key, value in metrics.items() if is_finite(value)})
    tracker.set_tags({"azdistill.promote": str(report.promote).lower()})
    for path in paths.values():
        tracker.log_artifact(path)



class NullTracker:
    """Does nothing; same interface as `Tracker`."""

    run_id: Optional[str] = None

    @contextmanager
    def pipeline(self, run_name: str, tags: dict[str, str]) -> Iterator["NullTracker"]:
        yield self

    @contextmanager
    def stage(self, name: str) -> Iterator["NullTracker"]:
        yield self

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_student(self, model_dir: Path, tags: dict[str, str]) -> Optional[str]:
        return None

    def promote_student(self, version: str, report: Any) -> Any:
        """Apply the champion/challenger rule to a registered version (see `azdistill.registry`)."""
        return None

    def last_pipeline_run(self, tags: dict[str, str]) -> Any:
        """The latest finished pipeline run of this workdir with `tags` (an MLflow Run), or None."""
        return None


@dataclass
class _Context:
    """A pipeline or stage `Tracker` is inside of; its MLflow run starts when something is first logged in it."""

    name: str
    tags: dict[str, str]
    params: dict[str, Any]  # logged when the run starts: the config, on a run that is not nested
    summary: bool  # a SUMMARY_STAGES stage inside a pipeline: what it logs also goes on the pipeline run
    began_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    run_id: Optional[str] = None


class Tracker(NullTracker):
    """Logs to MLflow at the config's tracking URI (a local SQLite store by default).

    `pipeline` and `stage` only note that a run would start; the run (and any pipeline run above it, parents
    first) starts in MLflow on the first `log_*`, `set_tags`, `log_student` or `promote_student` inside it, with
    the start time of the context. A stage that reuses its outputs and logs nothing leaves no run.
    """

    def __init__(self, config: DistillConfig):
        import mlflow
        import psutil

        self.config = config
        self.mlflow = mlflow
        self._client = None
        self._contexts: list[_Context] = []
        self.origin = {
            WORKDIR_TAG: str(Path(config.workdir).resolve()),
            HOST_TAG: socket.gethostname(),
            PID_TAG: str(os.getpid()),
            PID_CREATE_TIME_TAG: repr(psutil.Process().create_time()),
        }
        # MLflow sets up its own loggers on import; keep only errors (e.g. no model card offline, an expected miss).
        for name in ("mlflow", "mlflow.transformers", "alembic"):
            logging.getLogger(name).setLevel(logging.ERROR)
        uri = config.tracking_uri
        store = local_store_path(uri)
        if store is not None:
            store.parent.mkdir(parents=True, exist_ok=True)
        exported = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        # MLflow also exports the URI to the environment; a later config in this process (two runs from one notebook,
        # the tests) would take it for the user's own MLFLOW_TRACKING_URI (DistillConfig.tracking_uri) and track into
        # this store instead of its own. MLflow keeps the URI it was given; the environment stays as it was.
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported
        experiment = mlflow.get_experiment_by_name(config.experiment_name)
        if experiment is None:
            location = local_artifact_location(uri)
            # The kind tells MLflow 3's UI this is model training, not a GenAI app (its default view).
            mlflow.create_experiment(
                config.experiment_name, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"}
            )
        self.experiment_id = mlflow.set_experiment(config.experiment_name).experiment_id

    @property
    def run_id(self) -> Optional[str]:  # type: ignore[override]
        """The innermost run started in MLflow; None while nothing has been logged."""
        run = self.mlflow.active_run()
        return run.info.run_id if run else None

    @contextmanager
    def pipeline(self, run_name: str, tags: dict[str, str]) -> Iterator["Tracker"]:
        with self._context(_Context(run_name, tags, config_to_params(self.config), summary=False)):
            yield self

    @contextmanager
    def stage(self, name: str) -> Iterator["Tracker"]:
        nested = bool(self._contexts) or self.mlflow.active_run() is not None
        # A stage run on its own carries the config itself.
        params = {} if nested else config_to_params(self.config)
        with self._context(_Context(name, {STAGE_TAG: name}, params, summary=nested and name in SUMMARY_STAGES)):
            yield self

    @contextmanager
    def _context(self, context: _Context) -> Iterator[None]:
        if not self._contexts:
            self.close_interrupted_runs()
        self._contexts.append(context)
        status = "FINISHED"
        try:
            yield
        except KeyboardInterrupt:
            status = "KILLED"  # Ctrl-C: the run was stopped, it did not fail
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._contexts.pop()
            if context.run_id is not None:
                self.mlflow.end_run(status)

    def _start_runs(self) -> None:
        """Start in MLflow the runs of the contexts we are in that have not started yet, parents first."""
        for context in self._contexts:
            if context.run_id is None:
                self._start(context)

    def _start(self, context: _Context) -> None:
        parent = self.mlflow.active_run()
        tags = {**context.tags, **self.origin}
        if parent is None and os.environ.get("MLFLOW_RUN_ID"):
            # Inside an Azure ML job MLflow resumes the job's own run, named by MLFLOW_RUN_ID; it began with the job.
            run = self.mlflow.start_run(run_name=context.name, tags=tags)
        else:
            from mlflow.tracking.context.registry import resolve_tags
            from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

            if parent is not None:
                tags[MLFLOW_PARENT_RUN_ID] = parent.info.run_id
            # Created through the client to date it from when the context began (`start_run` dates it now, when the
            # first thing is logged); resolve_tags adds the source and user tags `start_run` would add.
            created = self.client.create_run(
                self.experiment_id, start_time=context.began_ms, tags=resolve_tags(tags), run_name=context.name
            )
            run = self.mlflow.start_run(run_id=created.info.run_id, nested=parent is not None)
        context.run_id = run.info.run_id
        if context.params:
            self.mlflow.log_params({key: str(value)[:MAX_PARAM_LENGTH] for key, value in context.params.items()})

    @property
    def _summary_parent(self) -> Optional[str]:
        """Run id of the pipeline run while a summary stage (see SUMMARY_STAGES) is the innermost context, else None."""
        if len(self._contexts) >= 2 and self._contexts[-1].summary:
            return self._contexts[-2].run_id
        return None

    def close_interrupted_runs(self) -> list[str]:
        """Close as KILLED the runs of this workdir left RUNNING by an azdistill process that is gone; returns their ids.

        Only runs tagged with this workdir and this host are judged: their process is gone when its pid is not
        alive, or is alive but started at another time (the pid now belongs to another process). A run of a live
        process, of another machine, or without these tags is left as it is.
        """
        if os.environ.get("MLFLOW_RUN_ID"):
            return []  # inside an Azure ML job: Azure ML keeps its runs' status
        running = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
        closed = []
        for run in running:
            tags = run.data.tags
            if tags.get(WORKDIR_TAG) != self.origin[WORKDIR_TAG] or tags.get(HOST_TAG) != self.origin[HOST_TAG]:
                continue
            if _process_alive(tags.get(PID_TAG), tags.get(PID_CREATE_TIME_TAG)):
                continue
            self.client.set_terminated(run.info.run_id, status="KILLED")
            log.info("closed run %s (pid %s) left RUNNING by an interrupted azdistill as KILLED", run.info.run_id, tags.get(PID_TAG))
            closed.append(run.info.run_id)
        return closed

    def last_pipeline_run(self, tags: dict[str, str]) -> Any:
        """The latest FINISHED pipeline run of this workdir with `tags` (the run whose results a rerun that changed
        nothing still shows), or None."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        wanted = {**tags, WORKDIR_TAG: self.origin[WORKDIR_TAG]}
        pipeline = tags.get("azdistill.pipeline", self.config.name)  # a config name: letters, digits, '.', '_', '-'
        runs = self.client.search_runs(
            [self.experiment_id],
            f"attributes.status = 'FINISHED' and tags.`azdistill.pipeline` = '{pipeline}'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
        for run in runs:
            if MLFLOW_PARENT_RUN_ID not in run.data.tags and all(run.data.tags.get(key) == value for key, value in wanted.items()):
                return run
        return None

    def log_params(self, params: dict[str, Any]) -> None:
        self._start_runs()
        self.mlflow.log_params({key: str(value)[:MAX_PARAM_LENGTH] for key, value in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        clean = {key: float(value) for key, value in metrics.items() if value is not None}
        if not clean:
            return
        self._start_runs()
        self.mlflow.log_metrics(clean, step=step)
        if self._summary_parent and step is None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self._summary_parent, metrics=[Metric(key, value, now, 0) for key, value in clean.items()])

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self._start_runs()
        if Path(path).is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self.mlflow.log_artifact(str(path), artifact_path=artifact_path)
            if self._summary_parent:  # the report files, not the folders of raw predictions
                self.client.log_artifact(self._summary_parent, str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._start_runs()
        self.mlflow.set_tags(tags)
        if self._summary_parent:
            for key, value in tags.items():
                self.client.set_tag(self._summary_parent, key, value)

    @property
    def client(self):
        if self._client is None:
            self._client = self.mlflow.MlflowClient(tracking_uri=self.config.tracking_uri)
        return self._client

    def log_student(self, model_dir: Path, tags: dict[str, str]) -> Optional[str]:
        """Log the student as an MLflow model under the active run and register it; returns the registry version.

        Besides `tags`, the version records its lineage (run id and name, pipeline, task, student; the data
        version comes with `tags`) and a description a person reads in the registry.
        """
        self._start_runs()
        version = self._log_model(Path(model_dir))
        if version is None:
            return None
        client = self.client
        name = self.config.registered_model_name
        run = self.mlflow.active_run()
        lineage = {
            "run_id": run.info.run_id if run else "",
            "run_name": run.info.run_name if run else "",
            "pipeline": self.config.name,
            "task": self.config.task.type,
            "student": self.config.student.model,
        }
        for key, value in {**lineage, **tags}.items():
            client.set_model_version_tag(name, version, key, str(value))
        data_version = tags.get("data_version", self.config.data.version)
        client.update_model_version(
            name,
            version,
            description=f"Student distilled from {tags.get('teacher', self.config.teacher.model)} on data version "
            f"{data_version} by run {lineage['run_name']} ({lineage['run_id']}).",
        )
        return version

    def promote_student(self, version: str, report: Any) -> Any:
        """Make `version` the champion if it passed the report's checks and beats the current champion.

        Returns the `registry.PromotionDecision`; the decision and its reason are also tags of the pipeline run.
        """
        from azdistill.tracking.registry import apply_promotion, failed_check_descriptions

        self._start_runs()
        decision = apply_promotion(
            self.client,
            self.config.registered_model_name,
            version,
            self.config.evaluation.promotion.champion_metric,
            failed_check_descriptions(report.checks),
        )
        self.mlflow.set_tags(decision.run_tags())
        return decision

    def _log_model(self, model_dir: Path) -> Optional[str]:
        """Log the student with MLflow's transformers flavour, registered under the config's model name."""
        from transformers import AutoModelForCausalLM

        from azdistill.models.loading import load_tokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = load_tokenizer(Path(model_dir))
        import torch
        import transformers

        info = self.mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="student",
            task="text-generation",
            registered_model_name=self.config.registered_model_name,
            # Requirement inference imports every candidate package and fails on torchvision, which has no
            # CPU build here; the student needs only these.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"],
        )
        version = getattr(info, "registered_model_version", None)
        return str(version) if version is not None else None


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


def make_tracker(config: DistillConfig) -> NullTracker:
    if not config.tracking.enabled:
        return NullTracker()
    # Quiet MLflow's per-run "View run at ..." banners when no server is involved.
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    return Tracker(config)
