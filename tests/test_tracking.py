"""What a pipeline run leaves in MLflow: names, nested stage runs, metrics lined up for comparison, artifacts,
and a registered student that links back to its run and data version."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from retrains import make_report, record_retrain, retrain_config

from azdistill.tracking.tracker import NullTracker, evaluation_metrics, pipeline_run_name, pipeline_tags


def test_pipeline_runs_are_named_and_tagged_after_the_config_and_its_data_version(tmp_path):
    config = retrain_config(tmp_path, "2024-06")
    assert pipeline_run_name(config) == "sentiment@data-v2024-06"
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


def test_each_stage_is_a_nested_run_tagged_with_its_stage(retrain):
    client, parent, _ = retrain
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.data.tags["azdistill.stage"] for run in children) == ["evaluate", "finetune", "synthesize"]
    assert sorted(run.info.run_name for run in children) == ["evaluate", "finetune", "synthesize"]
    finetune = next(run for run in children if run.info.run_name == "finetune")
    assert [point.step for point in client.get_metric_history(finetune.info.run_id, "train_loss")] == [0, 5, 10, 15]


def test_the_parent_run_carries_the_evaluation_so_retrains_compare_side_by_side(retrain):
    client, parent, _ = retrain
    assert parent.info.run_name == "sentiment@data-v1"
    assert parent.data.tags["azdistill.data_version"] == "1"
    assert parent.data.tags["azdistill.promote"] == "true"
    assert parent.data.metrics["student_agreement"] == 0.8
    assert parent.data.metrics["teacher_latency_p50_s"] == 0.2
    assert parent.data.params["data.version"] == "1"
    # The training history stays with the finetune run; only the evaluation's final figures are copied.
    assert "train_loss" not in parent.data.metrics
    assert "synthetic_train_kept" not in parent.data.metrics


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
    assert version.tags["run_name"] == "sentiment@data-v1"
    assert version.tags["metric.agreement"] == "0.8000"
    assert version.description == f"Student distilled from builtin on data version 1 by run sentiment@data-v1 ({parent.info.run_id})."


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


def test_log_student_registers_a_real_transformers_model_with_its_lineage(tmp_path):
    from mlflow import MlflowClient

    from azdistill.tracking.tracker import Tracker

    config = retrain_config(tmp_path, "7")
    tracker = Tracker(config)
    model = tiny_chat_model(tmp_path / "student")
    with tracker.pipeline(run_name=pipeline_run_name(config), tags=pipeline_tags(config)):
        version = tracker.log_student(model, {"teacher": "builtin", "data_version": "7", "promote": "true", "metric.agreement": "0.9000"})
        run_id = tracker.run_id
    tracker.mlflow.set_tracking_uri(None)
    assert version == "1"
    registered = MlflowClient(tracking_uri=config.tracking_uri).get_model_version("sentiment-student", "1")
    assert registered.run_id == run_id
    assert {key: registered.tags[key] for key in ("data_version", "pipeline", "task", "run_name", "promote")} == {
        "data_version": "7", "pipeline": "sentiment", "task": "nli", "run_name": "sentiment@data-v7", "promote": "true",
    }
    assert "data version 7" in registered.description
