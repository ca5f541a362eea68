"""A hosted teacher through every stage: combinations refused at validate time, students from model folders and
MLflow model folders, and the evaluation's teacher row measured through the endpoint (loopback fake server)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from azdistill.cli import cli
from azdistill.config.loading import load_config
from azdistill.errors import StageFailed, UserError

HOSTED = """
teacher:
  kind: openai-compatible
  endpoint: http://127.0.0.1:9/v1
  model: deepseek-v3
  auth: {method: none}
"""


def _student_folder(folder: Path, vocab_size: int = 100) -> Path:
    """A model folder as far as the checks read it (config.json); loading it is not needed to refuse a config."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size}))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def _validate(config: Path, *overrides: str):
    args = ["validate", str(config)] + [item for override in overrides for item in ("--set", override)]
    return CliRunner().invoke(cli, args)


@pytest.mark.parametrize(
    "overrides, key, fix",
    [
        ((), "student.model", "set student.model to a local model folder"),
        (("training.kd_weight=0.5",), "training.kd_weight", "set training.kd_weight to 0"),
        (("training.hidden_weight=1.0", "training.kd_weight=0"), "training.hidden_weight", "teacher.local_copy"),
        (("training.kd_weight=0.5", "training.on_policy_ratio=0.5"), "training.kd_weight", "training.kd_weight and training.on_policy_ratio to 0"),
        # Free answers (the label constraint off): no top-k log-probabilities and no label distribution to learn from.
        (("training.topk_weight=0.5", "synthesis.label_constraint=off"), "training.topk_weight", "set synthesis.top_logprobs"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "submit --dry-run"])
def test_what_cannot_work_with_a_hosted_teacher_is_refused_at_validate(make_config, tmp_path, workdir, overrides, key, fix, command):
    config = make_config(extra=HOSTED)
    student = _student_folder(tmp_path / "student")
    if key != "student.model":
        overrides = (f"student.model={student}",) + overrides
    if command == "validate":
        result = _validate(config, *overrides)
    else:
        args = ["submit", str(config), "--dry-run", "--output-dir", str(tmp_path / "dry-run")]
        result = CliRunner().invoke(cli, args + [item for override in overrides for item in ("--set", override)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{key}:" in lines[0] and fix in lines[0], lines
    assert not workdir.exists() and not (tmp_path / "dry-run").exists()  # nothing written


def test_a_local_copy_of_the_teacher_makes_the_logit_losses_and_the_pruned_student_possible(make_config, tmp_path):
    teacher_copy = _student_folder(tmp_path / "teacher-copy", vocab_size=100)
    config = make_config(extra=HOSTED + f"  local_copy: {teacher_copy}\n")
    assert _validate(config).exit_code == 0
    assert _validate(config, "training.kd_weight=0.5", f"student.model={_student_folder(tmp_path / 'same-vocabulary')}").exit_code == 0


def test_hidden_state_matching_needs_a_student_pruned_from_the_teacher(make_config, tmp_path):
    config = make_config(extra=f"student:\n  model: {_student_folder(tmp_path / 'student')}\ntraining:\n  hidden_weight: 1.0\n")
    result = _validate(config)
    assert result.exit_code == 2 and "training.hidden_weight" in result.output and "pruned-teacher" in result.output


def test_topk_distillation_with_a_local_teacher_is_refused_unless_labels_are_constrained(make_config):
    """A local teacher's free answers carry no top-k; its constrained labels (nli, label_constraint auto) carry their
    distribution, which the top-k loss learns."""
    result = _validate(make_config(extra="training:\n  topk_weight: 0.5\nsynthesis:\n  label_constraint: off\n"))
    assert result.exit_code == 2 and "use a hosted teacher with synthesis.top_logprobs" in result.output
    assert _validate(make_config(extra="training:\n  topk_weight: 0.5\n")).exit_code == 0
    result = _validate(make_config("qa", extra="training:\n  topk_weight: 0.5\n"))
    assert result.exit_code == 2 and "training.topk_weight" in result.output


def test_a_vocabulary_mismatch_for_logit_losses_names_both_sizes(make_config, tmp_path, workdir):
    teacher = _student_folder(tmp_path / "teacher", vocab_size=49152)
    student = _student_folder(tmp_path / "student", vocab_size=32064)
    config = make_config(extra=f"teacher:\n  model: {teacher}\nstudent:\n  model: {student}\ntraining:\n  kd_weight: 0.5\n")
    result = _validate(config)
    assert result.exit_code == 2
    line = result.output.strip()
    assert "training.kd_weight" in line and "teacher 49152 tokens" in line and "student 32064 tokens" in line and "\n" not in line
    assert not workdir.exists()
    # The same check guards finetune, before any model is loaded.
    from azdistill.stages.run import prepare_models

    with pytest.raises(UserError, match="teacher 49152 tokens"):
        prepare_models(load_config(config))


def test_the_config_line_of_the_refused_key_is_named(make_config):
    config = make_config(extra=HOSTED + "training:\n  kd_weight: 0.5\n")
    result = _validate(config, f"student.model={config.parent}")
    line = next(number for number, text in enumerate(config.read_text().splitlines(), 1) if "kd_weight" in text)
    assert f"distill.yaml:{line}: training.kd_weight:" in result.output


def test_a_hosted_teacher_model_is_a_name_not_a_path(make_config, tmp_path):
    (tmp_path / "project" / "deepseek-v3").mkdir(parents=True)  # a folder of that name beside the config changes nothing
    student = _student_folder(tmp_path / "student")
    config = load_config(make_config(extra=HOSTED), [f"student.model={student}"])
    assert config.teacher.model == "deepseek-v3" and config.teacher.label == "openai-compatible:deepseek-v3"


# ---------------------------------------------------------------------------------------------------
# Students from MLflow model folders


def _mlflow_folder(root: Path, weights: str, tokenizer: str) -> Path:
    (root / "MLmodel").parent.mkdir(parents=True, exist_ok=True)
    (root / "MLmodel").write_text("flavors:\n  transformers: {}\n")
    _student_folder(root / weights)
    (root / weights / "tokenizer_config.json").unlink()
    (root / weights / "model.safetensors").write_bytes(b"weights")
    (root / tokenizer).mkdir(parents=True)
    (root / tokenizer / "tokenizer_config.json").write_text("{}")
    (root / tokenizer / "tokenizer.json").write_text("{}")
    return root


@pytest.mark.parametrize(
    "weights, tokenizer",
    [("model", "components/tokenizer"), ("data/model", "data/tokenizer")],
    ids=["azdistill-and-mlflow-3", "azure-ml-registry"],
)
def test_an_mlflow_model_folder_becomes_a_loadable_student_without_copying(tmp_path, weights, tokenizer):
    from azdistill.models.students import resolve_student

    registered = _mlflow_folder(tmp_path / "registered", weights, tokenizer)
    student = resolve_student(str(registered), None, 0.34, tmp_path / "run" / "student-init")
    assert {path.name for path in student.iterdir()} == {"config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json"}
    assert all(path.is_symlink() for path in student.iterdir())
    assert (student / "model.safetensors").resolve() == (registered / weights / "model.safetensors").resolve()
    assert resolve_student(str(registered), None, 0.34, tmp_path / "run" / "student-init") == student  # unchanged: reused


def test_an_mlflow_model_folder_whose_tokenizer_sits_with_the_weights_is_used_in_place(tmp_path):
    from azdistill.models.students import resolve_student

    registered = tmp_path / "registered"
    _student_folder(registered / "model")
    (registered / "MLmodel").write_text("flavors: {}\n")
    assert resolve_student(str(registered), None, 0.34, tmp_path / "init") == registered / "model"


def test_a_folder_that_holds_no_model_says_what_it_expected(tmp_path):
    from azdistill.models.students import resolve_student

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json .* and no MLmodel"):
        resolve_student(str(tmp_path / "empty"), None, 0.34, tmp_path / "init")
    with pytest.raises(UserError, match="only a job can mount"):
        resolve_student("azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1", None, 0.34, tmp_path / "init")


def test_a_real_mlflow_layout_student_loads_and_answers(tmp_path):
    """The linked folder is a model transformers loads: tiny weights saved in the MLflow 3 layout by hand."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from azdistill.models.builtin import builtin_teacher_path
    from azdistill.models.loading import load_model, load_tokenizer
    from azdistill.models.students import resolve_student

    tokenizer = load_tokenizer(builtin_teacher_path())
    registered = tmp_path / "registered"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(registered / "model")
    tokenizer.save_pretrained(registered / "components" / "tokenizer")
    (registered / "MLmodel").write_text("flavors:\n  transformers: {}\n")
    student = resolve_student(str(registered), None, 0.34, tmp_path / "init")
    assert load_tokenizer(student).chat_template and load_model(student).config.num_hidden_layers == 1


# ---------------------------------------------------------------------------------------------------
# The teacher row, measured through the endpoint


@pytest.fixture
def hosted_config(make_config):
    def make(url: str, *overrides: str):
        extra = HOSTED.replace("http://127.0.0.1:9/v1", url) + (
            "  price_per_million_prompt_tokens: 2.0\n  price_per_million_completion_tokens: 8.0\n  parameters: 671000000000\n"
            "evaluation:\n  latency_samples: 2\n  max_new_tokens: 16\n"
        )
        return load_config(make_config(extra=extra, counts={"test": 5}), ["student.model=/unused", *overrides])

    return make


def test_the_hosted_teacher_is_timed_one_by_one_scored_in_parallel_and_costed_from_its_tokens(hosted_config):
    from fake_teacher_server import FakeTeacherServer

    from azdistill.data.records import read_records
    from azdistill.evaluation.measure import measure_hosted

    with FakeTeacherServer() as server:
        config = hosted_config(server.url + "/v1")
        conversations = [record.prompt for record in read_records(config.data.test, "nli")]
        measured = measure_hosted(config, conversations)
        bodies = list(server.bodies)
    assert len(bodies) == 2 + 5  # two timed one at a time, then every prompt for quality
    assert all(body["max_tokens"] == 16 and body["temperature"] == 0.0 and "logprobs" not in body for body in bodies)
    assert len(measured["latencies_s"]) == 2 and all(latency > 0 for latency in measured["latencies_s"])
    assert len(measured["answers"]) == 5 and measured["hosted"] is True and measured["parameters"] == 671_000_000_000
    expected = (measured["prompt_tokens"] * 2.0 + measured["generated_tokens"] * 8.0) / 1e6
    assert measured["cost"] == pytest.approx(expected) and measured["cost_per_1k_answers"] == pytest.approx(expected / 5 * 1000)
    assert measured["peak_memory_bytes"] is None and measured["size_on_disk_bytes"] is None


def test_an_endpoint_that_refuses_every_held_out_prompt_fails_the_stage_with_the_reason(hosted_config):
    from fake_teacher_server import FakeTeacherServer

    from azdistill.evaluation.measure import measure_hosted

    with FakeTeacherServer() as server:
        config = hosted_config(server.url + "/v1", "teacher.max_retries=0")
        with pytest.raises(StageFailed, match="answered none of the 3 held-out prompts; first: refused: .*content filter"):
            measure_hosted(config, [[{"role": "user", "content": "[[content_filter]] hello"}]] * 3)


def test_the_report_shows_a_hosted_teacher_as_hosted_and_compares_cost(tmp_path):
    from azdistill.evaluation.markdown import headline_lines, render_markdown
    from azdistill.evaluation.report import ModelResult, PromotionCheck, Report, report_from_dict, report_to_dict

    nan = float("nan")
    teacher = ModelResult("teacher", "deepseek-v3 (teacher, openai-compatible endpoint)", "openai-compatible:deepseek-v3", 671_000_000_000,
                          nan, nan, nan, 1.2, 2.0, 40.0, 10, {"accuracy": 0.9}, cost_per_1k_answers=0.5, hosted=True)
    student = ModelResult("student", "phi (distilled student)", "/s", 3_800_000_000, 7000.0, 7000.0, 8000.0, 0.3, 0.4, 90.0, 10,
                          {"accuracy": 0.85, "agreement": 0.9}, cost_per_1k_answers=0.05)
    report = Report("p", "nli", "1", "2026-11-30", "accuracy", [teacher, student], True,
                    [PromotionCheck("agreement", 0.9, 0.8, ">=", True)], "cpu")
    markdown = render_markdown(report)
    row = next(line for line in markdown.splitlines() if line.startswith("| deepseek-v3"))
    assert "| 671,000.0 (declared) | hosted | hosted |" in row and "| 0.5 |" in row
    assert "Cost per 1,000 answers: 0.05 vs 0.5, 10.0x cheaper" in markdown
    assert any(line.startswith("cost per 1,000 answers: 0.05 vs 0.5, 10.0x cheaper") for line in headline_lines(report))
    again = report_from_dict(json.loads(json.dumps(report_to_dict(report))))
    assert again.models[0].hosted and again.models[0].cost_per_1k_answers == 0.5 and math.isnan(again.models[0].peak_memory_mb)


def test_a_local_model_is_costed_from_the_serving_machine_price():
    from azdistill.config.evaluation import EvaluationConfig
    from azdistill.evaluation.measure import local_cost_per_1k_answers

    assert local_cost_per_1k_answers(EvaluationConfig(), 36.0, 100) is None  # no price: no cost
    # 1.80 an hour; 100 answers in 36 s: 0.018 for 100 answers, 0.18 per 1,000.
    assert local_cost_per_1k_answers(EvaluationConfig(serving_price_per_hour=1.8), 36.0, 100) == pytest.approx(0.18)


def test_a_logged_teacher_row_is_the_logged_answers(make_config):
    from azdistill.data.records import read_records
    from azdistill.evaluation.measure import measure_logged

    config = load_config(make_config(extra="teacher:\n  kind: logged\nstudent:\n  model: /unused\n"))
    records = read_records(config.data.test, "nli")
    measured = measure_logged(records)
    assert measured["answers"] == [record.reference for record in records] and measured["latencies_s"] == []


# ---------------------------------------------------------------------------------------------------
# The sample configs, one per hosted kind


SAMPLES = sorted((Path(__file__).resolve().parent.parent / "data" / "sentiment").glob("teacher-*.yaml"))


def test_there_is_a_sample_config_per_hosted_kind():
    from azdistill.config.teacher import HOSTED_TEACHERS

    assert {load_config(path).teacher.kind for path in SAMPLES} == set(HOSTED_TEACHERS)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda path: path.stem)
def test_each_sample_config_validates_and_the_azure_ones_dry_run(sample, tmp_path):
    result = CliRunner().invoke(cli, ["validate", str(sample)])
    assert result.exit_code == 0, result.output
    if load_config(sample).azure is None:
        return
    result = CliRunner().invoke(cli, ["submit", str(sample), "--dry-run", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "distill.pipeline.yaml").is_file()


# ---------------------------------------------------------------------------------------------------
# An endpoint that ignores top_logprobs (transformers serve does)


def test_preflight_refuses_topk_distillation_when_the_endpoint_returns_no_log_probabilities(make_config, tmp_path, workdir):
    from fake_teacher_server import FakeTeacherServer

    with FakeTeacherServer(logprobs=False) as server:
        config = make_config(extra=HOSTED.replace("http://127.0.0.1:9/v1", server.url + "/v1"))
        args = ["preflight", str(config), "--set", f"student.model={_student_folder(tmp_path / 'student')}",
                "--set", "synthesis.top_logprobs=3", "--set", "training.topk_weight=0.5",
                "--set", "synthesis.label_constraint='off'"]  # constrained labels carry their own distribution
        result = CliRunner().invoke(cli, args)
        requests = len(server.bodies)
    assert result.exit_code == 2 and requests == 1  # one sample call, not the whole synthesis
    assert "answered without them although synthesis.top_logprobs asked" in result.output
    assert not workdir.exists()


def test_finetune_refuses_a_sidecar_without_log_probabilities(tmp_path):
    from azdistill.training.examples import load_teacher_topk

    sidecar = tmp_path / "train.logprobs.jsonl"
    sidecar.write_text('{"row": 0, "turns": [{"turn": 0, "text": "positive", "content": null}]}\n')
    with pytest.raises(UserError, match="holds no log-probabilities"):
        load_teacher_topk(sidecar, 1)
