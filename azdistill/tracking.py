"""MLflow tracking: one parent run per pipeline, a nested run per stage, the student in the model registry.

Stages talk to a `Tracker`; `NullTracker` has the same methods and does nothing, for runs with tracking off
and for unit tests that do not look at MLflow.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from azdistill.config import DistillConfig, config_to_params

log = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters; longer values (system prompts) are cut rather than failing the run.
MAX_PARAM_LENGTH = 6000


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


class Tracker(NullTracker):
    """Logs to MLflow at the config's tracking URI (a local SQLite store by default)."""

    def __init__(self, config: DistillConfig):
        import mlflow

        self.config = config
        self.mlflow = mlflow
        # MLflow sets up its own loggers on import; keep only errors (e.g. no model card offline, an expected miss).
        for name in ("mlflow", "mlflow.transformers", "alembic"):
            logging.getLogger(name).setLevel(logging.ERROR)
        uri = config.tracking_uri
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        # Artifacts of a local SQLite store go beside it, not into ./mlruns of whatever folder we run from.
        experiment = mlflow.get_experiment_by_name(config.experiment_name)
        if experiment is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
            mlflow.create_experiment(config.experiment_name, artifact_location=location)
        mlflow.set_experiment(config.experiment_name)

    @property
    def run_id(self) -> Optional[str]:  # type: ignore[override]
        run = self.mlflow.active_run()
        return run.info.run_id if run else None

    @contextmanager
    def pipeline(self, run_name: str, tags: dict[str, str]) -> Iterator["Tracker"]:
        with self.mlflow.start_run(run_name=run_name, tags=tags):
            self.log_params(config_to_params(self.config))
            yield self

    @contextmanager
    def stage(self, name: str) -> Iterator["Tracker"]:
        nested = self.mlflow.active_run() is not None
        with self.mlflow.start_run(run_name=name, nested=nested, tags={"azdistill.stage": name}):
            if not nested:  # a stage run on its own carries the config itself
                self.log_params(config_to_params(self.config))
            yield self

    def log_params(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params({key: str(value)[:MAX_PARAM_LENGTH] for key, value in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        clean = {key: float(value) for key, value in metrics.items() if value is not None}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if Path(path).is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def log_student(self, model_dir: Path, tags: dict[str, str]) -> Optional[str]:
        """Log the student as an MLflow transformers model and register it; returns the registry version."""
        from transformers import AutoModelForCausalLM

        from azdistill.models import load_tokenizer

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
        if version is not None:
            client = self.mlflow.MlflowClient()
            for key, value in tags.items():
                client.set_model_version_tag(self.config.registered_model_name, str(version), key, str(value))
        return str(version) if version is not None else None


def make_tracker(config: DistillConfig) -> NullTracker:
    if not config.tracking.enabled:
        return NullTracker()
    # Quiet MLflow's per-run "View run at ..." banners when no server is involved.
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    return Tracker(config)
