"""MLflow tracking: one parent run per pipeline, a nested run per stage, the student in the model registry.

Stages talk to a `Tracker`; `NullTracker` has the same methods and does nothing, for runs with tracking off
and for unit tests that do not look at MLflow. What the runs say (names, metrics, the headline) is in
`tracking.headline`: the pipeline run `data-v3 #1a2b3c <name>`, its stages `data-v3 #1a2b3c / evaluate`, the
evaluation's `<role>_<metric>` metrics on the evaluate run, the training loss as the finetune run's `train_loss`.

Each retrain is counted once in every chart: a stage's metrics stay on its stage run, and the pipeline run logs
only its own headline metrics and note (`log_headline`). The evaluate stage's report files and tags also go on the
pipeline run, so a parent run shows its report without opening a child. The student's logged model (an MLflow 3
LoggedModel) carries the student's own figures of the evaluate run (`link_student_metrics`). MLflow links to a model
every step-0 metric its run holds when it is logged, and any metric the fluent API logs later at that step: the
pipeline run logs its metrics through the client, after the student.

What MLflow shows is what happened:

- a run starts in MLflow only once something is logged under it (dated from when its pipeline or stage began),
  so a rerun whose stages all reuse their outputs leaves no run behind;
- MLflow is opened beside the first stage's own work (`tracking.connection`), and its failure still fails the
  command;
- every run is tagged with where it runs from (`azdistill.workdir`, `azdistill.host`, `azdistill.pid` and the
  process's start time); a run left RUNNING by a process that is gone (killed) is closed as KILLED when the next
  pipeline or stage of that workdir begins. A run whose process is alive is never touched.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from azdistill.config.loading import config_to_params
from azdistill.config.schema import DistillConfig
from azdistill.evaluation.promotion import failed_check_descriptions
from azdistill.evaluation.report import error_bar_metrics, is_finite
from azdistill.tracking import connection
from azdistill.tracking.connection import WORKDIR_TAG, Background, Opened, open_experiment, origin_tags, use_for_fluent_api
from azdistill.tracking.headline import (
    MAX_NOTE_LENGTH,
    evaluation_metrics,
    headline_metrics,
    is_model_metric,
    pipeline_run_name,
    run_label,
    run_note,
    stage_run_name,
)
from azdistill.tracking.registry import apply_promotion

log = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters; longer values (system prompts) are cut rather than failing the run.
MAX_PARAM_LENGTH = 6000
# Stages whose results describe the whole pipeline: their report files and tags also go on the pipeline run (never
# their metrics), `azdistill runs list` reads their metrics, and the student's logged model carries their student_*
# figures. See the module docstring.
SUMMARY_STAGES = ("evaluate",)
STAGE_TAG = "azdistill.stage"
NOTE_TAG = "mlflow.note.content"  # the run's description, shown as Markdown on its overview page


def log_evaluation(tracker: "NullTracker", report: Any, paths: dict[str, Path]) -> None:
    """Log an evaluation report to the active (evaluate) run: its metrics with the student's error bars
    (`student_<metric>_ci_low` / `_ci_high`, `student_vs_<role>_<metric>_p_value`), the promote tag and the report
    files (`report.md`, `report.json`, and `report.png`, which the MLflow UI shows as an image). The pipeline run's
    note gets the headline, its decision pending (`Tracker.log_headline` writes it again once decided)."""
    metrics = {**evaluation_metrics(report), **error_bar_metrics(report)}
    tracker.log_metrics({key: value for key, value in metrics.items() if is_finite(value)})
    tracker.set_tags({"azdistill.promote": str(report.promote).lower()})
    for path in paths.values():
        tracker.log_artifact(path)
    tracker.set_pipeline_note(run_note(report))


class NullTracker:
    """Does nothing; same interface as `Tracker`."""

    run_id: Optional[str] = None

    @contextmanager
    def pipeline(self, tags: dict[str, str]) -> Iterator["NullTracker"]:
        yield self

    @contextmanager
    def stage(self, name: str) -> Iterator["NullTracker"]:
        yield self

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def set_pipeline_note(self, note: str) -> None:
        """Write the pipeline run's description (Markdown; see `run_note`)."""

    def log_headline(self, report: Any, decision: Any = None) -> None:
        """Log the pipeline run's headline metrics and note (`headline_metrics`, `run_note`)."""

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

    stage: Optional[str]  # None: a pipeline
    tags: dict[str, str]
    params: dict[str, Any]  # logged when the run starts: the config, on a run that is not nested
    summary: bool  # a SUMMARY_STAGES stage inside a pipeline: its tags and report files also go on the pipeline run
    began_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    run_id: Optional[str] = None


class Tracker(NullTracker):
    """Logs to MLflow at the config's tracking URI (a local SQLite store by default).

    `pipeline` and `stage` only note that a run would start; the run (and any pipeline run above it, parents
    first) starts in MLflow on the first `log_*`, `set_tags`, `log_student` or `promote_student` inside it, with
    the start time of the context, and is then named after its id (`pipeline_run_name`, `stage_run_name`). A stage
    that reuses its outputs and logs nothing leaves no run.

    A tracker made by `make_tracker` (the commands) opens MLflow in the background from when its first pipeline or
    stage begins (`connection.Background`), while the stage works; anything that needs MLflow waits for it first: a
    log, a run start, the end of the outermost pipeline or stage. A set-up that fails raises its own exception there,
    so the command fails with MLflow's error as before, only later; the stage's journal and outputs keep its work for
    the rerun. A command whose stage reuses its outputs never begins that stage, and never loads MLflow.
    """

    def __init__(self, config: DistillConfig, open_now: bool = True):
        """`open_now`: open MLflow here (a tracker made in a notebook or a test, which may look at the store at once);
        False (`make_tracker`, the commands): in the background once the first pipeline or stage begins."""
        self.config = config
        self._contexts: list[_Context] = []
        self._evaluation_run_id: Optional[str] = None  # this pipeline's evaluate run, once it has started
        self._opened: Optional[Opened] = None
        self._setup: Optional[Background[Opened]] = None
        self._fluent_api_set = False
        # A run can be active before this tracker starts one only if MLflow was imported before it (a caller's run).
        self._mlflow_imported_before = "mlflow" in sys.modules
        self.origin = origin_tags(config.workdir)
        # MLflow sets up its own loggers on import; keep only errors (e.g. no model card offline, an expected miss).
        for name in ("mlflow", "mlflow.transformers", "alembic"):
            logging.getLogger(name).setLevel(logging.ERROR)
        if open_now:
            self._ready()

    def _begin(self) -> None:
        """What the outermost pipeline or stage does as it begins: open MLflow if it is not open yet (in the background),
        then close the runs of killed processes."""
        if self._opened is None and self._setup is None:
            self._setup = Background(self._open_and_close_interrupted_runs, "azdistill-mlflow-setup")
        else:
            self.close_interrupted_runs()

    def _open_and_close_interrupted_runs(self) -> Opened:
        opened = open_experiment(self.config)
        connection.close_interrupted_runs(opened, self.origin)
        return opened

    def _ready(self) -> Opened:
        """MLflow, open: waits for the background set-up, raising its exception if it failed (at every call); opens it
        here when nothing began yet. The fluent API is pointed at the store in this thread, the one that logs."""
        if self._opened is None:
            self._opened = self._setup.wait() if self._setup is not None else open_experiment(self.config)
        if not self._fluent_api_set:
            self._fluent_api_set = True
            use_for_fluent_api(self._opened, self.config.tracking_uri)
        return self._opened

    @property
    def mlflow(self) -> Any:
        """The `mlflow` module, once MLflow is ready."""
        return self._ready().mlflow

    @property
    def experiment_id(self) -> str:
        return self._ready().experiment_id

    def _active_run(self) -> Any:
        """MLflow's active run in this thread, without waiting for the set-up: one that our contexts started, or one that
        whoever imported MLflow before this tracker was made started (a notebook's run); with neither, there is none."""
        if any(context.run_id for context in self._contexts):
            return self.mlflow.active_run()
        if self._mlflow_imported_before:
            import mlflow  # imported already: the active run needs no store

            return mlflow.active_run()
        return None

    @property
    def run_id(self) -> Optional[str]:  # type: ignore[override]
        """The innermost run started in MLflow; None while nothing has been logged."""
        run = self._active_run()
        return run.info.run_id if run else None

    @contextmanager
    def pipeline(self, tags: dict[str, str]) -> Iterator["Tracker"]:
        with self._context(_Context(None, tags, config_to_params(self.config), summary=False)):
            yield self

    @contextmanager
    def stage(self, name: str) -> Iterator["Tracker"]:
        nested = bool(self._contexts) or self._active_run() is not None
        # A stage run on its own carries the config itself.
        params = {} if nested else config_to_params(self.config)
        with self._context(_Context(name, {STAGE_TAG: name}, params, summary=nested and name in SUMMARY_STAGES)):
            yield self

    @contextmanager
    def _context(self, context: _Context) -> Iterator[None]:
        outermost = not self._contexts
        if outermost:
            self._begin()
            self._evaluation_run_id = None
        self._contexts.append(context)
        status = "FINISHED"
        try:
            yield
            if outermost:
                self._ready()  # a set-up that failed in the background fails the command, even with nothing logged
        except KeyboardInterrupt:
            status = "KILLED"  # Ctrl-C: the run was stopped, it did not fail
            if self._setup is not None:
                self._setup.interrupted = True  # exit at once, as before
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._contexts.pop()
            if context.run_id is not None:
                self.mlflow.end_run(status)
                if context.summary:
                    self._evaluation_run_id = context.run_id

    def _start_runs(self) -> None:
        """Start in MLflow the runs of the contexts we are in that have not started yet, parents first."""
        for context in self._contexts:
            if context.run_id is None:
                self._start(context)

    def _run_name(self, context: _Context, run_id: str, parent: Any) -> str:
        """A pipeline run is named after its own id; a stage run after its pipeline run's (or its own, alone)."""
        if context.stage is None:
            return pipeline_run_name(self.config, run_id)
        return stage_run_name(run_label(self.config, parent.info.run_id if parent is not None else run_id), context.stage)

    def _start(self, context: _Context) -> None:
        parent = self.mlflow.active_run()
        tags = {**context.tags, **self.origin}
        if parent is None and os.environ.get("MLFLOW_RUN_ID"):
            # Inside an Azure ML job MLflow resumes the job's own run, named by MLFLOW_RUN_ID; it began with the job. A
            # step is named after its pipeline job (AZUREML_ROOT_RUN_ID), as a stage after its pipeline run here.
            pipeline_id = os.environ.get("AZUREML_ROOT_RUN_ID") or os.environ["MLFLOW_RUN_ID"]
            run = self.mlflow.start_run(run_name=self._run_name(context, pipeline_id, None), tags=tags)
        else:
            from mlflow.tracking.context.registry import resolve_tags
            from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

            if parent is not None:
                tags[MLFLOW_PARENT_RUN_ID] = parent.info.run_id
            # Created through the client to date it from when the context began (`start_run` dates it now, when the
            # first thing is logged); resolve_tags adds the source and user tags `start_run` would add. The name
            # holds the run's id, known once it exists.
            created = self.client.create_run(
                self.experiment_id, start_time=context.began_ms, tags=resolve_tags(tags), run_name=context.stage or "pipeline"
            )
            self.client.update_run(created.info.run_id, name=self._run_name(context, created.info.run_id, parent))
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

    @property
    def _pipeline_run(self) -> Optional[str]:
        """Run id of the outermost run we are in (the pipeline run; a stage run on its own), started if need be."""
        if not self._contexts:
            return self.run_id
        self._start_runs()
        return self._contexts[0].run_id

    def close_interrupted_runs(self) -> list[str]:
        """Close as KILLED the runs of this workdir left RUNNING by an azdistill process that is gone (see
        `connection.close_interrupted_runs`); returns their ids."""
        return connection.close_interrupted_runs(self._ready(), self.origin)

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
        self._log_batch(self.run_id, clean, step or 0)  # type: ignore[arg-type]

    def _log_batch(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log `metrics` to `run_id` through the client: `mlflow.log_metrics` would also give them to any model logged
        in that run at that step (the student, in the pipeline run), and they are not the model's."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(key, value, now, step, run_id=run_id) for key, value in metrics.items()]
        )

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

    def set_pipeline_note(self, note: str) -> None:
        """Write `note` as the description of the pipeline run (of a stage run on its own: its own)."""
        run_id = self._pipeline_run
        if run_id is not None:
            self.client.set_tag(run_id, NOTE_TAG, note[:MAX_NOTE_LENGTH])

    def log_headline(self, report: Any, decision: Any = None) -> None:
        """Log the pipeline run's headline metrics (`headline_metrics`; those already logged with the same value are
        not logged again) and write its note with the decision (`run_note`). Call it after `log_student`: see the
        module docstring."""
        run_id = self._pipeline_run
        if run_id is None:
            return
        logged = self.client.get_run(run_id).data.metrics
        metrics = {key: value for key, value in headline_metrics(report, decision).items() if logged.get(key) != value}
        if metrics:
            self._log_batch(run_id, metrics)
        self.set_pipeline_note(run_note(report, decision))

    @property
    def client(self):
        """The MLflow client of the config's store, once MLflow is ready."""
        return self._ready().client

    def log_student(self, model_dir: Path, tags: dict[str, str]) -> Optional[str]:
        """Log the student as an MLflow model under the active run and register it; returns the registry version.

        Besides `tags`, the version records its lineage (run id and name, pipeline, task, student; the data
        version comes with `tags`) and a description a person reads in the registry. The logged model carries
        the student's own figures from this pipeline's evaluate run (`link_student_metrics`).
        """
        self._start_runs()
        version, model_id = self._log_model(Path(model_dir))
        if version is None:
            return None
        client = self.client
        name = self.config.registered_model_name
        run = self.mlflow.active_run()
        lineage = {
            "run_id": run.info.run_id if run else "",
            "run_name": client.get_run(run.info.run_id).info.run_name if run else "",
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
        if model_id:
            self.link_student_metrics(model_id)
        return version

    def link_student_metrics(self, model_id: str) -> list[str]:
        """Give the logged model `model_id` the student's figures (`is_model_metric`) that this pipeline's evaluate run
        logged: the same points, now also the model's, so the run's own history gains nothing. Returns their names;
        none when the evaluation was reused from an earlier run (it logged nothing in this one)."""
        from mlflow.entities import Metric

        run_id = self._evaluation_run_id
        if run_id is None:
            log.info("register: the evaluation was reused, so the logged student carries no metrics of this run")
            return []
        names = sorted(name for name in self.client.get_run(run_id).data.metrics if is_model_metric(name))
        points = [
            Metric(point.key, point.value, point.timestamp, point.step, model_id=model_id, run_id=run_id)
            for name in names
            for point in self.client.get_metric_history(run_id, name)
        ]
        for start in range(0, len(points), 1000):  # MLflow takes up to 1,000 metrics a batch
            self.client.log_batch(run_id, metrics=points[start : start + 1000])
        return names

    def promote_student(self, version: str, report: Any) -> Any:
        """Make `version` the champion if it passed the report's checks and beats the current champion.

        Returns the `registry.PromotionDecision`; the decision and its reason are also tags of the pipeline run.
        """
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

    def _log_model(self, model_dir: Path) -> tuple[Optional[str], Optional[str]]:
        """Log the student with MLflow's transformers flavour, registered under the config's model name; returns the
        registry version and the logged model's id."""
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
        return (str(version) if version is not None else None), info.model_id


def make_tracker(config: DistillConfig) -> NullTracker:
    if not config.tracking.enabled:
        return NullTracker()
    # Quiet MLflow's per-run "View run at ..." banners when no server is involved.
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    return Tracker(config, open_now=False)
