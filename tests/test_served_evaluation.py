"""A served model measured like the hosted teacher (`evaluation.served`): its report row with latency, agreement and
cost, the requests its endpoint saw, its answers reused on a rerun, its key kept out of every output, and the entries
`validate` refuses, each as one line naming the key.

Both endpoints are the loopback fake OpenAI-compatible server; the local rows (student, baseline) are faked at
`measure_in_child`, so no model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import stand_in_model_folders

from azdistill.cli import cli
from azdistill.config.loading import load_config
from azdistill.errors import UserError

SERVED_KEY = "served-key-0123456789"
TEST_RECORDS = 5
LATENCY_SAMPLES = 2

CONFIG = """
teacher:
  kind: openai-compatible
  endpoint: {teacher_url}/v1
  model: big-teacher
  auth: {{method: none}}
  price_per_million_prompt_tokens: 2.0
  price_per_million_completion_tokens: 8.0
student:
  model: unused-student
evaluation:
  latency_samples: {latency_samples}
  max_new_tokens: 16
  promotion: {{min_agreement: {min_agreement}}}
  served:
    - name: student (served)
      endpoint: {served_url}/v1
      model: {served_model}
      max_retries: 0
      parameters: 135000000
      price_per_million_prompt_tokens: 0.1
      price_per_million_completion_tokens: {completion_price}
"""


def _right_label(messages: list[dict]) -> str:
    """The teacher: the right sentiment of each conftest review."""
    return "positive" if any(word in messages[-1]["content"] for word in ("loved", "Great")) else "negative"


def _always_positive(messages: list[dict]) -> str:
    """The served student: right on the positive reviews only, so it agrees with the teacher on 3 of the 5."""
    return "positive"


@pytest.fixture
def endpoints():
    from fake_teacher_server import FakeTeacherServer

    with FakeTeacherServer(answer=_right_label) as teacher:
        with FakeTeacherServer(answer=_always_positive, api_key=SERVED_KEY) as served:
            yield teacher, served


@pytest.fixture
def write_config(make_config, endpoints):
    teacher, served = endpoints

    def write(served_model: str = "unit-test-student", min_agreement: float = 0.8, completion_price: float = 0.4) -> Path:
        extra = CONFIG.format(
            teacher_url=teacher.url, served_url=served.url, served_model=served_model, min_agreement=min_agreement,
            latency_samples=LATENCY_SAMPLES, completion_price=completion_price,
        )
        return make_config(extra=extra, counts={"test": TEST_RECORDS})

    return write


@pytest.fixture
def local_models(tmp_path, monkeypatch):
    """The student and baseline folders, answered by a fake `measure_in_child` (the served rows are what is tested)."""
    from azdistill.stages import evaluate as stage

    def fake_measure(path, conversations, settings, runtime, description, labels=None):
        return {"answers": [_right_label(messages) for messages in conversations], "latencies_s": [0.2, 0.3],
                "throughput_tokens_per_s": 10.0, "generated_tokens": 10, "seconds": 1.0, "parameters": 10, "weights_bytes": 40,
                "peak_memory_bytes": 100, "size_on_disk_bytes": 40, "device": "cpu"}

    monkeypatch.setattr(stage, "measure_in_child", fake_measure)
    return stand_in_model_folders(tmp_path)


def _evaluate(config_path: Path, models: dict, *overrides: str):
    from azdistill.stages.evaluate import evaluate

    return evaluate(load_config(config_path, list(overrides)), None, models)


def test_a_served_model_gets_a_report_row_with_latency_agreement_and_cost(write_config, endpoints, local_models, monkeypatch):
    from mlflow.utils.validation import _validate_metric_name

    from azdistill.tracking.tracker import evaluation_metrics

    teacher_server, served_server = endpoints
    monkeypatch.setenv("AZDISTILL_SERVED_KEY", SERVED_KEY)
    config_path = write_config()
    report = _evaluate(config_path, local_models)

    # Timed one at a time, then every held-out prompt, with the served entry's own key; the teacher's asked no key.
    assert served_server.counts["requests"] == LATENCY_SAMPLES + TEST_RECORDS == teacher_server.counts["requests"]
    assert {body["model"] for body in served_server.bodies} == {"unit-test-student"}
    sent = [headers.get("api-key", "") + headers.get("authorization", "") for headers in served_server.headers_seen]
    assert all(SERVED_KEY in credential for credential in sent)
    assert [model.role for model in report.models] == ["teacher", "student", "served_student_served", "baseline"]

    out_dir = load_config(config_path).stage_dir("evaluate")
    saved = json.loads((out_dir / "report.json").read_text())
    served = next(row for row in saved["models"] if row["role"] == "served_student_served")
    assert served["name"] == "student (served)" and served["hosted"] is True and served["n"] == TEST_RECORDS
    assert served["path"] == f"openai-compatible:unit-test-student at {served_server.url}/v1"
    assert served["latency_p50_s"] > 0 and served["latency_p95_s"] >= served["latency_p50_s"]
    assert served["metrics"]["agreement"] == pytest.approx(3 / 5) and served["parameters"] == 135_000_000
    answers = json.loads((out_dir / "predictions" / "served_student_served.json").read_text())
    cost = (answers["prompt_tokens"] * 0.1 + answers["generated_tokens"] * 0.4) / 1e6
    assert served["cost_per_1k_answers"] == pytest.approx(cost / TEST_RECORDS * 1000)
    # The promotion checks are the student's: the served row, which agrees less, takes no part in them.
    checks = [check["name"] for check in saved["checks"]]
    assert checks == ["agreement", "quality_retained", "latency_ratio", "beats_baseline_accuracy"]
    assert saved["checks"][0]["value"] == 1.0

    markdown = (out_dir / "report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| student (served) |"))
    assert "| 135.0 (declared) | hosted | hosted |" in row
    assert "## Served models vs teacher" in markdown and "- student (served): p50 " in markdown
    assert "agreement with the teacher 60.0%" in markdown and "| Student (served) |" not in markdown
    metrics = evaluation_metrics(report)
    assert metrics["served_student_served_agreement"] == pytest.approx(0.6)
    for name in metrics:
        _validate_metric_name(name)  # raises on a name MLflow would refuse
    for path in load_config(config_path).workdir.rglob("*"):
        assert not path.is_file() or SERVED_KEY.encode() not in path.read_bytes(), path


def test_a_rerun_reuses_the_served_answers_until_its_endpoint_changes(write_config, endpoints, local_models, monkeypatch):
    teacher_server, served_server = endpoints
    monkeypatch.setenv("AZDISTILL_SERVED_KEY", SERVED_KEY)
    _evaluate(write_config(), local_models)
    asked = served_server.counts["requests"], teacher_server.counts["requests"]
    assert asked == (LATENCY_SAMPLES + TEST_RECORDS,) * 2

    # Nothing changed, then a threshold and a price: the report is rebuilt from the saved answers, no request is sent.
    first = _evaluate(write_config(), local_models)
    report = _evaluate(write_config(min_agreement=0.5, completion_price=0.8), local_models)
    assert (served_server.counts["requests"], teacher_server.counts["requests"]) == asked
    assert report.checks[0].threshold == 0.5
    cost, repriced = (next(row.cost_per_1k_answers for row in run.models if row.role == "served_student_served")
                      for run in (first, report))
    assert repriced > cost > 0  # the completion tokens now cost twice as much

    # Another model behind the same endpoint is another identity: only it answers again.
    report = _evaluate(write_config(served_model="unit-test-student-v2"), local_models)
    assert served_server.counts["requests"] == 2 * (LATENCY_SAMPLES + TEST_RECORDS)
    assert teacher_server.counts["requests"] == asked[1]
    assert {body["model"] for body in served_server.bodies[asked[0]:]} == {"unit-test-student-v2"}
    assert [model.role for model in report.models].count("served_student_served") == 1


def test_a_missing_served_key_is_named_by_the_served_entrys_setting(write_config, endpoints, local_models, monkeypatch):
    monkeypatch.delenv("AZDISTILL_SERVED_KEY", raising=False)
    with pytest.raises(UserError) as error:
        _evaluate(write_config(), local_models)
    message = str(error.value)
    assert message.startswith("evaluation.served.0.auth.api_key_env: the environment variable AZDISTILL_SERVED_KEY is not set")
    assert "teacher" not in message and endpoints[1].counts["requests"] == 0


def test_a_refused_served_key_names_the_served_endpoint_and_hides_the_key(write_config, endpoints, local_models, monkeypatch):
    monkeypatch.setenv("AZDISTILL_SERVED_KEY", "wrong-key-9876543210")
    with pytest.raises(UserError) as error:
        _evaluate(write_config(), local_models)
    message = str(error.value)
    assert message.startswith(f"student (served) endpoint {endpoints[1].url}/v1/chat/completions refused the credential")
    assert "check evaluation.served.0.auth" in message and "wrong-key-9876543210" not in message


SERVED_ENTRY = """
teacher:
  kind: openai-compatible
  endpoint: http://127.0.0.1:9/v1
  model: big-teacher
  auth: {method: none}
student:
  model: unused-student
evaluation:
  served:
"""


@pytest.mark.parametrize(
    "entries, fragments",
    [
        (["{name: s, model: m}"], ["evaluation.served.0.endpoint", "missing required key"]),
        (["{name: s, endpoint: 'http://127.0.0.1:8000/v1'}"], ["evaluation.served.0.model", "missing required key"]),
        (["{endpoint: 'http://127.0.0.1:8000/v1', model: m}"], ["evaluation.served.0.name", "missing required key"]),
        (
            ["{name: student (served), endpoint: 'http://127.0.0.1:8000/v1', model: m}",
             "{name: student (served), endpoint: 'http://127.0.0.1:8001/v1', model: m}"],
            ["evaluation.served.1 is named 'student (served)' like evaluation.served.0", "a name of its own"],
        ),
        (
            ["{name: Student served, endpoint: 'http://127.0.0.1:8000/v1', model: m}",
             "{name: student-served, endpoint: 'http://127.0.0.1:8001/v1', model: m}"],
            ["evaluation.served.1 ('student-served') gives the same metric names (served_student_served_...)"],
        ),
        (["{name: s, endpoint: 'http://127.0.0.1:8000/v1', model: m, kind: local}"],
         ["evaluation.served.0.kind", "openai-compatible"]),
        (["{name: s, endpoint: 'ftp://host', model: m}"], ["evaluation.served.0.endpoint: must be an http:// or https:// URL"]),
        (["{name: s, endpoint: 'http://127.0.0.1:8000/v1', model: m, api_key: sk-abcdef0123456789abcdef0123}"],
         ["evaluation.served.api_key: a key is never written in a config", "auth.api_key_env"]),
        (["{name: s, endpoint: 'http://127.0.0.1:8000/v1', model: m, auth: {method: key_vault}}"],
         ["evaluation.served.0.auth: auth.method key_vault needs auth.key_vault_url"]),
    ],
    ids=[
        "no-endpoint", "no-model", "no-name", "same-name", "same-metric-names", "local-kind", "not-a-url", "literal-key",
        "auth-settings",
    ],
)
def test_validate_refuses_a_bad_served_entry_in_one_line_naming_the_key(make_config, entries, fragments):
    extra = SERVED_ENTRY + "".join(f"    - {entry}\n" for entry in entries)
    config = make_config(extra=extra)
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}:") and "Traceback" not in result.output, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "sk-abcdef" not in lines[0] and "teacher.auth" not in lines[0]


def test_a_valid_served_entry_passes_validate_with_the_teachers_endpoint_keys(make_config, tmp_path):
    student = tmp_path / "student"  # a model folder as far as validate reads it
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    (student / "tokenizer_config.json").write_text("{}")
    entry = ("{name: student (served), kind: online_endpoint, endpoint: 'https://s.westeurope.inference.ml.azure.com', "
             "model: student, deployment: green, auth: {method: api_key_env, api_key_env: STUDENT_ENDPOINT_KEY}, "
             "requests_per_minute: 60, price_per_million_completion_tokens: 0.5}")
    config = make_config(extra=SERVED_ENTRY + f"    - {entry}\n")
    result = CliRunner().invoke(cli, ["validate", str(config), "--set", f"student.model={student}"])
    assert result.exit_code == 0, result.output
    served = load_config(config, [f"student.model={student}"]).evaluation.served[0]
    assert (served.role, served.deployment, served.auth.api_key_env) == ("served_student_served", "green", "STUDENT_ENDPOINT_KEY")
