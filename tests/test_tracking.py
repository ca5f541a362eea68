"""What a pipeline run leaves in MLflow: names, nested stage runs, metrics lined up for comparison, artifacts,
and a registered student that links back to its run and data version."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from retrains import make_report, record_retrain, retrain_config

from azdistill.tracking.headline import (
    evaluation_metrics,
    headline_metrics,
    pipeline_run_name,
    pipeline_tags,
    run_label,
    run_note,
    stage_run_name,
)
from azdistill.tracking.tracker import NullTracker


def test_pipeline_runs_are_named_and_tagged_after_the_config_and_its_data_version(tmp_path):
    config = retrain_config(tmp_path, "2024-06")
    # The data version and a short id first, where the runs table does not cut them; stages after their pipeline run.
    assert pipeline_run_name(config, "1a2b3c4d5e6f") == "data-v2024-06 #1a2b3c sentiment"
    assert stage_run_name(run_label(config, "1a2b3c4d5e6f"), "evaluate") == "data-v2024-06 #1a2b3c / evaluate"
    assert pipeline_tags(config) == {
        "azdistill.pipeline": "sentiment", "azdistill.task": "nli", "azdistill.teacher": "builtin",
        "azdistill.student": "pruned-teacher", "azdistill.data_version": "2024-06", "azdistill.mode": "local",
    }


def test_evaluation_metrics_are_named_role_underscore_metric(tmp_path):
    metrics = evaluation_metrics(make_report(retrain_config(tmp_path, "1"), agreement=0.8, accuracy=0.85))
    assert metrics["student_agreement"] == 0.8 and metrics["student_accuracy"] == 0.85
    assert metrics["teacher_latency_p50_s"] == 0.2 and metrics["baseline_parameters"] == 63_700_000
    assert metrics["promote"] == 1.0
    assert set(metrics) >= {f"{role}_{name}" for role in ("teacher", "student", "baseline")
                            for name in ("latency_p50_s", "latency_p95_s", "throughput_tokens_per_s", "peak_memory_mb", "parameters")}


def test_the_headline_metrics_are_rounded_and_named_apart_from_the_evaluations(tmp_path):
    from azdistill.tracking.registry import decide

    report = make_report(retrain_config(tmp_path, "1"), agreement=0.7333333333333333, accuracy=0.85, student_latency=0.07)
    decision = decide("3", "agreement", 0.7333, [], None, None)
    metrics = headline_metrics(report, decision)
    assert metrics["agreement"] == 0.7333 and metrics["quality_retained"] == 0.9444  # 0.85 / 0.9, 4 significant digits
    assert metrics["student_vs_teacher_speedup"] == 2.857 and metrics["student_vs_teacher_latency_ratio"] == 0.35
    assert metrics["student_vs_teacher_param_ratio"] == 0.4736 and metrics["student_vs_teacher_memory_ratio"] == 0.4736
    assert metrics["checks_passed"] == 1.0 and metrics["promoted"] == 1.0
    assert not set(metrics) & set(evaluation_metrics(report))  # a retrain is counted once in every chart
    assert "promoted" not in headline_metrics(report)  # not before the decision


def test_the_run_note_puts_student_and_teacher_side_by_side_with_the_decision(tmp_path):
    from azdistill.tracking.registry import decide

    report = make_report(retrain_config(tmp_path, "1"), agreement=0.8, accuracy=0.85)
    pending = run_note(report)
    assert "| Agreement with the teacher | — | 80.0% |  |" in pending
    assert "| Accuracy (primary metric) | 90.0% | 85.0% | 94.4% kept |" in pending
    assert "| Latency per response, p50 (s) | 0.2 | 0.05 | 4.00x faster |" in pending
    assert "| Parameters (M) | 134.5 | 63.7 | 0.47x the teacher's |" in pending
    assert "**Promotion checks:** all 4 passed." in pending and "**Decision:** pending" in pending
    decided = run_note(report, decide("1", "agreement", 0.8, [], None, None))
    # The run page shows the note's first lines and folds the rest: the decision comes first.
    assert decided.startswith("**Decision: champion.** Version 1 is the champion: first version to pass the promotion checks")
    assert pending.startswith("**Decision:** pending")


def test_a_tracker_leaves_the_environment_as_it_found_it(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: a second config in the same process took it for the
    user's own and tracked into the first config's store (seen when the hosted end-to-end test ran first)."""
    from azdistill.config.sections import TrackingConfig
    from azdistill.tracking.tracker import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = (retrain_config(tmp_path / name, "1").model_copy(update={"tracking": TrackingConfig()}) for name in ("a", "b"))
    Tracker(first)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert second.tracking_uri == f"sqlite:///{(tmp_path / 'b' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")  # the user's own is kept
    Tracker(first.model_copy(update={"tracking": TrackingConfig(uri=f"sqlite:///{tmp_path / 'c.db'}")}))
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////elsewhere/mlflow.db"


def test_null_tracker_promotes_nothing():
    assert NullTracker().promote_student("1", object()) is None


@pytest.fixture(scope="module")
def retrain(tmp_path_factory):
    from mlflow import MlflowClient

    workdir = tmp_path_factory.mktemp("tracking")
    run_id, _, _ = record_retrain(workdir, "1", agreement=0.8, accuracy=0.85)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    return client, client.get_run(run_id), workdir


def test_the_experiment_is_marked_as_model_training_for_the_mlflow_ui(retrain):
    client, parent, _ = retrain
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_experiment_created_without_the_kind_gets_it(tmp_path):
    """An experiment an older azdistill created has no kind: MLflow 3's UI opened it on its GenAI views."""
    from mlflow import MlflowClient

    from azdistill.tracking.tracker import Tracker

    config = retrain_config(tmp_path, "1")
    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment_id = client.create_experiment(config.experiment_name)
    assert "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags
    Tracker(config)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def children_of(client, parent) -> list:
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def test_each_stage_is_a_nested_run_named_after_its_pipeline_run(retrain):
    client, parent, _ = retrain
    children = children_of(client, parent)
    assert sorted(run.data.tags["azdistill.stage"] for run in children) == ["evaluate", "finetune", "synthesize"]
    label = f"data-v1 #{parent.info.run_id[:6]}"
    assert parent.info.run_name == f"{label} sentiment"
    assert sorted(run.info.run_name for run in children) == [f"{label} / {stage}" for stage in ("evaluate", "finetune", "synthesize")]
    finetune = next(run for run in children if run.data.tags["azdistill.stage"] == "finetune")
    assert [point.step for point in client.get_metric_history(finetune.info.run_id, "train_loss")] == [0, 5, 10, 15]


def test_the_parent_run_carries_its_headline_not_the_stages_metrics(retrain):
    """Each retrain is counted once in a chart: the evaluation's metrics stay on the evaluate run."""
    client, parent, _ = retrain
    (evaluate,) = [run for run in children_of(client, parent) if run.data.tags["azdistill.stage"] == "evaluate"]
    assert evaluate.data.metrics["student_agreement"] == 0.8 and evaluate.data.metrics["teacher_latency_p50_s"] == 0.2
    assert not set(parent.data.metrics) & set(evaluate.data.metrics)
    assert parent.data.metrics == {
        "agreement": 0.8, "quality_retained": 0.9444, "checks_passed": 1.0, "promoted": 1.0,
        "student_vs_teacher_speedup": 4.0, "student_vs_teacher_latency_ratio": 0.25,
        "student_vs_teacher_param_ratio": 0.4736, "student_vs_teacher_memory_ratio": 0.4736,
        "student_vs_teacher_weights_memory_ratio": 0.4736, "student_vs_teacher_throughput_ratio": 4.0,
        "stage_seconds_evaluate": 1.5,
    }
    assert all(len(client.get_metric_history(parent.info.run_id, name)) == 1 for name in parent.data.metrics)
    assert parent.data.tags["azdistill.data_version"] == "1" and parent.data.tags["azdistill.promote"] == "true"
    assert parent.data.params["data.version"] == "1"


def test_the_parent_run_note_is_the_headline_with_the_decision(retrain):
    client, parent, _ = retrain
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**Decision: champion.** Version 1 is the champion: first version to pass the promotion checks")
    assert "**sentiment**, data version 1: the distilled student against its teacher" in note
    assert "| Agreement with the teacher | — | 80.0% |  |" in note
    assert "| Latency per response, p50 (s) | 0.2 | 0.05 | 4.00x faster |" in note
    assert parent.data.tags["azdistill.promotion"] == "champion"


def test_the_students_logged_model_carries_the_students_figures_only(retrain):
    client, parent, _ = retrain
    (evaluate,) = [run for run in children_of(client, parent) if run.data.tags["azdistill.stage"] == "evaluate"]
    (output,) = parent.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "student" and model.source_run_id == parent.info.run_id
    names = {metric.key for metric in model.metrics}
    assert names == {name for name in evaluate.data.metrics if name.startswith("student_") and "_vs_" not in name}
    assert {"student_agreement", "student_accuracy", "student_latency_p50_s"} <= names
    assert {metric.run_id for metric in model.metrics} == {evaluate.info.run_id}  # measured there
    assert next(metric.value for metric in model.metrics if metric.key == "student_agreement") == 0.8
    # Linking added no point to the evaluate run's own history.
    assert all(len(client.get_metric_history(evaluate.info.run_id, name)) == 1 for name in evaluate.data.metrics)


def test_the_report_and_its_plot_are_artifacts_of_the_parent_and_the_evaluate_run(retrain):
    client, parent, _ = retrain
    (evaluate,) = client.search_runs([parent.info.experiment_id], "tags.`azdistill.stage` = 'evaluate'")
    for run_id in (parent.info.run_id, evaluate.info.run_id):
        names = {item.path for item in client.list_artifacts(run_id)}
        assert {"report.md", "report.json", "report.png"} <= names
    png = Path(client.download_artifacts(parent.info.run_id, "report.png"))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_registered_version_links_to_its_run_and_data_version(retrain):
    client, parent, _ = retrain
    (version,) = client.search_model_versions("name='sentiment-student'")
    assert version.run_id == parent.info.run_id
    assert version.tags["data_version"] == "1"
    assert version.tags["run_name"] == parent.info.run_name
    assert version.tags["metric.agreement"] == "0.8000"
    assert version.description == f"Student distilled from builtin on data version 1 by run {parent.info.run_name} ({parent.info.run_id})."


def tiny_chat_model(folder: Path) -> Path:
    """A one-layer llama with a word-level tokenizer and a chat template: loads and logs like a real student."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<|im_end|>", "positive", "negative", "review", "the", "is"]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }} <|im_end|> {% endfor %}"
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=1, eos_token_id=2, bos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_log_student_registers_a_real_transformers_model_with_its_lineage_and_the_students_figures_only(tmp_path):
    """The transformers flavour's `log_model` links every step-0 metric of its run to the model: with the evaluation
    and the headline logged as `run_local` logs them, the model still carries no teacher or baseline figure."""
    from mlflow import MlflowClient

    from azdistill.evaluation.publish import write_report
    from azdistill.tracking.tracker import Tracker, log_evaluation

    config = retrain_config(tmp_path, "7")
    tracker = Tracker(config)
    model = tiny_chat_model(tmp_path / "student")
    report = make_report(config, agreement=0.9, accuracy=0.85)
    with tracker.pipeline(tags=pipeline_tags(config)):
        with tracker.stage("evaluate"):
            log_evaluation(tracker, report, write_report(report, tmp_path / "evaluate"))
        version = tracker.log_student(model, {"teacher": "builtin", "data_version": "7", "promote": "true", "metric.agreement": "0.9000"})
        tracker.log_headline(report, tracker.promote_student(version, report))
        tracker.log_metrics({"stage_seconds_evaluate": 2.0})
        run_id = tracker.run_id
    tracker.mlflow.set_tracking_uri(None)
    assert version == "1"
    client = MlflowClient(tracking_uri=config.tracking_uri)
    registered = client.get_model_version("sentiment-student", "1")
    assert registered.run_id == run_id
    run_name = client.get_run(run_id).info.run_name
    assert run_name == f"data-v7 #{run_id[:6]} sentiment"
    assert {key: registered.tags[key] for key in ("data_version", "pipeline", "task", "run_name", "promote")} == {
        "data_version": "7", "pipeline": "sentiment", "task": "nli", "run_name": run_name, "promote": "true",
    }
    assert "data version 7" in registered.description
    (output,) = client.get_run(run_id).outputs.model_outputs
    names = {metric.key for metric in client.get_logged_model(output.model_id).metrics}
    assert {"student_agreement", "student_accuracy", "student_latency_p50_s", "student_parameters"} <= names
    assert not {name for name in names if name.startswith(("teacher_", "baseline_")) or not name.startswith("student_")}
    assert not {name for name in names if "_vs_" in name}  # nor the student's comparisons with them
