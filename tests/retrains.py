"""A local MLflow store holding retrains of one config, logged through azdistill's own Tracker without training.

Used by tests/test_registry.py, tests/test_runs.py and tests/test_mlflow_ui.py. `record_retrain` logs what
`run_local` logs (parent run, nested stage runs, a train_loss history, the evaluation report and its metrics,
the registered student and the champion decision) with made-up numbers, in about a second.
`QuickTracker` logs a stand-in student (a tiny pyfunc model, through the same `Model.log` as the transformers flavour,
so MLflow links run metrics to it the same way) instead of a transformers model; tests/test_tracking.py covers the
real model logging once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from azdistill.config.schema import DistillConfig
from azdistill.evaluation.promotion import promotion_checks
from azdistill.evaluation.publish import write_report
from azdistill.evaluation.report import ModelResult, Report
from azdistill.tracking.headline import pipeline_tags
from azdistill.tracking.tracker import Tracker, log_evaluation

NAME = "sentiment"


def retrain_config(workdir: Path, data_version: str, name: str = NAME, **promotion) -> DistillConfig:
    """A config for retrain `data_version`, tracking to `<workdir>/mlflow.db` (data files need not exist)."""
    return DistillConfig.model_validate(
        {
            "name": name,
            "workdir": str(workdir),
            "task": {"type": "nli", "labels": ["positive", "negative"]},
            "data": {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl", "version": data_version},
            "evaluation": {"promotion": {"min_agreement": 0.6, "max_latency_ratio": 0.8, **promotion}},
            "tracking": {"uri": f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"},
        }
    )


class QuickTracker(Tracker):
    """Logs a stand-in student (a pyfunc model of a few files) instead of a transformers model."""

    def _log_model(self, model_dir: Path) -> tuple[Optional[str], Optional[str]]:
        import mlflow.pyfunc

        class Student(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input: list[str], params=None) -> list[str]:
                return ["positive"] * len(model_input)

        info = mlflow.pyfunc.log_model(
            name="student", python_model=Student(), pip_requirements=[], registered_model_name=self.config.registered_model_name
        )
        return str(info.registered_model_version), info.model_id


def make_report(config: DistillConfig, agreement: float, accuracy: float, student_latency: float = 0.05) -> Report:
    """A report for teacher, student and baseline; the checks come from the evaluate stage's own rule."""

    def model(role: str, parameters: int, latency: float, metrics: dict) -> ModelResult:
        return ModelResult(role, f"{role} model", f"/models/{role}", parameters, parameters * 4 / 2**20,
                           parameters * 4 / 2**20, parameters * 5 / 2**20, latency, latency * 1.3, 200 / latency, 40, metrics)

    models = {
        "teacher": model("teacher", 134_515_008, 0.2, {"accuracy": 0.9, "parse_rate": 1.0}),
        "student": model("student", 63_700_000, student_latency, {"accuracy": accuracy, "agreement": agreement, "parse_rate": 0.95}),
        "baseline": model("baseline", 63_700_000, 0.05, {"accuracy": 0.3, "agreement": 0.35, "parse_rate": 0.5}),
    }
    checks = promotion_checks(config, models, "accuracy")
    return Report(
        pipeline=config.name, task="nli", data_version=config.data.version, created="2026-11-22T10:00:00+00:00",
        primary_metric="accuracy", models=list(models.values()), promote=all(check.passed for check in checks),
        checks=checks, device="cpu (2 cores)",
    )


def record_retrain(workdir: Path, data_version: str, agreement: float, accuracy: float, **promotion):
    """Log one retrain the way `run_local` does; returns (run id, PromotionDecision, report)."""
    config = retrain_config(workdir, data_version, **promotion)
    tracker = QuickTracker(config)
    report = make_report(config, agreement, accuracy)
    with tracker.pipeline(tags=pipeline_tags(config)):
        with tracker.stage("synthesize"):
            tracker.log_metrics({"synthetic_train_kept": 150.0, "synthetic_success_ratio": 0.62})
        with tracker.stage("finetune"):
            for step, loss in enumerate([2.4, 1.7, 1.2, 0.9 - agreement / 10]):
                tracker.log_metrics({"train_loss": loss}, step=step * 5)
        with tracker.stage("evaluate"):
            out_dir = Path(workdir) / "runs" / f"{config.name}-v{data_version}" / "evaluate"
            log_evaluation(tracker, report, write_report(report, out_dir))
        version = tracker.log_student(Path(workdir), {"teacher": "builtin", "data_version": data_version,
                                                      "promote": str(report.promote).lower(),
                                                      **{f"metric.{k}": f"{v:.4f}" for k, v in report.models[1].metrics.items()}})
        decision = tracker.promote_student(version, report)
        tracker.log_headline(report, decision)
        tracker.log_metrics({"stage_seconds_evaluate": 1.5})
        run_id = tracker.run_id
    tracker.mlflow.set_tracking_uri(None)
    return run_id, decision, report
