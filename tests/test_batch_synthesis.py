"""synthesis.mode batch against a loopback Batch API (tests/fake_batch_api.py) whose batches the online fake teacher
answers: the requests are those online mode sends, the outputs and reject ledger are those of an online run, faults are
asked again in follow-up batches, a stopped run waits for its batch again instead of submitting twice, and what cannot
work is refused at validate."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_batch_api import FakeBatchAPI
from fake_teacher_server import FakeTeacherServer

from azdistill.cli import cli
from azdistill.config.schema import DistillConfig
from azdistill.config.sections import PROJECT_ROOT
from azdistill.errors import StageFailed, UserError
from azdistill.stages.synthesize import synthesize
from azdistill.teachers.factory import hosted_teacher_factory

KEY = "sk-batchtest-7f3a9c2e5d1b4f6a8c0e2d4f"
KEY_ENV = "AZDISTILL_BATCH_TEST_KEY"
SYSTEM = "Classify the sentiment. Answer positive or negative."
NLI = {"type": "nli", "labels": ["positive", "negative"]}
CUSTOM_ID = re.compile(r"^(train|validation)-\d+-[0-9a-f]{12}$")


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def single(review: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Review: {review}"}]


def batch_config(folder: Path, endpoint: str, train: list, validation: list, task: dict = NLI, teacher: dict | None = None,
                **synthesis) -> DistillConfig:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("validation", validation), ("test", validation)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in rows))
    return DistillConfig.model_validate({
        "name": "t",
        "workdir": str(folder / "work"),
        "task": task,
        "data": {split: str(folder / f"{split}.jsonl") for split in ("train", "validation", "test")},
        "teacher": {"kind": "openai-compatible", "endpoint": endpoint, "model": "teacher-100b",
                    "auth": {"method": "api_key_env", "api_key_env": KEY_ENV}, "backoff_s": 0.01, "max_backoff_s": 0.05,
                    "timeout_s": 10.0, "max_concurrency": 2, "price_per_million_prompt_tokens": 2.0,
                    "price_per_million_completion_tokens": 8.0, **(teacher or {})},
        "synthesis": {"min_success_ratio": 0.0, "mode": "batch", "batch_poll_s": 0.01, **synthesis},
        "tracking": {"enabled": False},
    })


def run(config: DistillConfig, **kwargs) -> Path:
    return synthesize(config, hosted_teacher_factory(config), **kwargs)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def canonical(bodies) -> list[str]:
    return sorted(json.dumps(body, sort_keys=True) for body in bodies)


def exactly_once(out: Path, split: str, records: int) -> None:
    """Every record of the split has one final row in its journal, and none twice."""
    finals = [row["index"] for row in read(out / f"{split}.journal.jsonl") if not row.get("partial")]
    assert sorted(finals) == list(range(records))


TRAIN = [single(text) for text in ["good 1", "bad 2", "good [[content_filter]] 3", "bad [[length]] 4"]]
VALIDATION = [single("good v")]


@pytest.mark.parametrize(
    "task, synthesis",
    [
        (NLI, {}),  # the label constrained by a structured output (json_schema)
        (NLI, {"self_consistency": 3}),  # three sampled answers per request (n), the majority kept
        ({"type": "qa"}, {"top_logprobs": 2, "label_constraint": "off"}),  # free answers with their log-probabilities
    ],
)
def test_the_batch_holds_the_requests_online_mode_sends_and_ends_with_its_outputs(tmp_path, task, synthesis):
    with FakeTeacherServer() as teacher:
        online = run(batch_config(tmp_path / "online", f"{teacher.url}/v1", TRAIN, VALIDATION, task, **synthesis, mode="online"))
        online_bodies = list(teacher.bodies)
        with FakeBatchAPI(teacher, api_key=KEY) as api:
            out = run(batch_config(tmp_path / "batch", f"{api.url}/v1", TRAIN, VALIDATION, task, **synthesis))

    (upload,) = api.uploads
    assert upload["purpose"] == "batch" and upload["filename"] == "batch.1.input.jsonl"
    (create,) = api.creates
    assert create == {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h",
                      "metadata": {"created_by": "azdistill synthesize"}}
    lines = upload["lines"]
    assert all(CUSTOM_ID.match(line["custom_id"]) and line["method"] == "POST" and line["url"] == "/v1/chat/completions"
               for line in lines)
    assert [line["custom_id"].rsplit("-", 1)[0] for line in lines] == ["train-0", "train-1", "train-2", "train-3", "validation-0"]
    # The same bodies, to the key: the structured output, n, logprobs and sampling settings all as online.
    assert canonical(line["body"] for line in lines) == canonical(online_bodies)

    for name in ("train.jsonl", "validation.jsonl", "rejected.jsonl"):
        assert (out / name).read_text() == (online / name).read_text(), name
    reasons = [row["reason"] for row in read(out / "rejected.jsonl")]
    assert reasons[0] == "content filter rejected the prompt (violence)" and "answer cut off" in reasons[1]
    stats, online_stats = (json.loads((folder / "stats.json").read_text()) for folder in (out, online))
    assert stats["mode"] == "batch" and online_stats["mode"] == "online" and "endpoint" not in stats
    assert stats["batch"]["batches"][0]["batch_id"] == "batch_1" and stats["batch"]["requests"] == 5
    assert stats["batch"]["completed"] == 4 and stats["batch"]["failed"] == 1  # the content filter's 400
    assert stats["splits"] == online_stats["splits"]
    assert stats["cost"] == pytest.approx(online_stats["cost"] / 2)  # teacher.batch_price_ratio 0.5
    exactly_once(out, "train", 4)


def test_an_endpoint_without_structured_outputs_gets_a_second_batch_asking_for_log_probabilities(tmp_path):
    """The label constraint falls back as online: the structured-output requests are refused, the records are asked
    again for their top log-probabilities in a follow-up batch, and the outputs are those of an online run."""
    with FakeTeacherServer(structured_outputs=False) as teacher:
        online = run(batch_config(tmp_path / "online", f"{teacher.url}/v1", TRAIN, VALIDATION, mode="online"))
        with FakeBatchAPI(teacher) as api:
            out = run(batch_config(tmp_path / "batch", f"{api.url}/v1", TRAIN, VALIDATION))
    assert len(api.creates) == 2
    assert all("response_format" in line["body"] for line in api.batch_lines(0))
    # Once the endpoint refused structured outputs every record is asked the other way, as online from then on.
    assert [line["body"]["logprobs"] for line in api.batch_lines(1)] == [True] * 5
    assert not any("response_format" in line["body"] for line in api.batch_lines(1))
    for name in ("train.jsonl", "validation.jsonl", "rejected.jsonl", "train.logprobs.jsonl"):
        assert (out / name).read_text() == (online / name).read_text(), name


def test_a_batch_is_waited_for_with_a_growing_pause_that_honours_retry_after(tmp_path):
    """The status is checked after 10, 20, 40 ... s up to 5 min (a fake clock: no test waits), and a 429 on a check
    waits the Retry-After it names."""
    from azdistill.synthesis.batch import client_for
    from azdistill.teachers.hosted import build_endpoint_teacher

    class Clock:
        def __init__(self):
            self.now, self.sleeps = 1_700_000_000.0, []

        def sleep(self, seconds: float) -> None:
            self.sleeps.append(seconds)
            self.now += seconds

    states = ("validating",) + ("in_progress",) * 8 + ("finalizing", "completed")
    clock, seen = Clock(), []
    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher, states=states, throttle_checks=1) as api:
        config = batch_config(tmp_path, f"{api.url}/v1", TRAIN, VALIDATION)
        client = client_for(config, build_endpoint_teacher(config), clock=lambda: clock.now, sleep=clock.sleep)
        requests = tmp_path / "requests.jsonl"
        requests.write_text(json.dumps({"custom_id": "train-0-000000000000", "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"model": "teacher-100b", "messages": single("good 1")}}) + "\n")
        batch = client.create(client.upload(requests))
        done = client.wait(batch["id"], 10.0, seen.append)
    assert done["status"] == "completed" and done["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    assert clock.sleeps == [7.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0, 300.0]
    assert [batch["status"] for batch in seen] == ["in_progress"] * 8 + ["finalizing", "completed"]


def test_the_stage_reports_each_check_with_the_batchs_status_and_counts(tmp_path, caplog):
    caplog.set_level("INFO", logger="azdistill")
    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher) as api:
        run(batch_config(tmp_path, f"{api.url}/v1", TRAIN, VALIDATION))
    lines = [record.getMessage() for record in caplog.records if "batch batch_1" in record.getMessage()]
    assert any(line.startswith("synthesize: batch batch_1 submitted with 5 requests") for line in lines)
    assert "synthesize: batch batch_1 in_progress: 2 of 5 requests answered, 0 failed, 0 min since submitted" in lines
    assert "synthesize: batch batch_1 completed: 4 of 5 requests answered, 1 failed, 0 min since submitted" in lines


def test_transient_faults_are_asked_again_in_follow_up_batches_and_the_rest_rejected_with_their_reason(tmp_path):
    train = [single(text) for text in ["good 1", "bad [[flaky:1]] 2", "good [[content_filter]] 3", "good always-500 4",
                                        "good throttled 5"]]

    def line_status(line: dict, attempt: int):
        text = line["body"]["messages"][-1]["content"]
        if "always-500" in text:
            return 500
        return 429 if "throttled" in text and attempt == 1 else None

    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher, line_status=line_status) as api:
        out = run(batch_config(tmp_path, f"{api.url}/v1", train, VALIDATION))

    asked = [[line["custom_id"].rsplit("-", 1)[0] for line in api.batch_lines(number)] for number in range(len(api.creates))]
    # 503, 429 and 500 asked again; the content filter's 400 is an answer; after synthesis.batch_retries (2), no more.
    assert asked == [["train-0", "train-1", "train-2", "train-3", "train-4", "validation-0"],
                     ["train-1", "train-3", "train-4"], ["train-3"]]
    assert [row["messages"][1]["content"] for row in read(out / "train.jsonl")] == [
        "Review: good 1", "Review: bad [[flaky:1]] 2", "Review: good throttled 5"]
    rejected = {row["line"]: row["reason"] for row in read(out / "rejected.jsonl")}
    assert rejected == {
        3: "content filter rejected the prompt (violence)",
        4: "no answer after 3 batches (last: HTTP 500: 500: scripted fault); asked again on the next run",
    }
    journal = {row["index"]: row for row in read(out / "train.journal.jsonl")}
    assert journal[3].get("retryable") is True and not journal[2].get("retryable")
    stats = json.loads((out / "stats.json").read_text())
    assert [batch["requests"] for batch in stats["batch"]["batches"]] == [6, 3, 1]
    exactly_once(out, "train", 5)
    exactly_once(out, "validation", 1)


def test_an_expired_batch_keeps_its_answers_and_the_rest_go_into_a_new_batch(tmp_path):
    train = [single(f"good {n}") for n in range(5)]
    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher, expire_after=2) as api:
        out = run(batch_config(tmp_path, f"{api.url}/v1", train, VALIDATION))
    assert [len(api.batch_lines(number)) for number in range(len(api.creates))] == [6, 4, 2]
    assert not read(out / "rejected.jsonl") and len(read(out / "train.jsonl")) == 5
    stats = json.loads((out / "stats.json").read_text())
    assert [batch["status"] for batch in stats["batch"]["batches"]] == ["expired"] * 3
    exactly_once(out, "train", 5)


def test_a_batch_that_fails_validation_is_one_line_with_the_providers_reasons(tmp_path):
    invalid = [{"code": "invalid_request", "message": "The model 'teacher-100b' does not exist.", "line": 1},
               {"code": "invalid_request", "message": "The model 'teacher-100b' does not exist.", "line": 2}]
    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher, invalid=invalid) as api:
        config = batch_config(tmp_path, f"{api.url}/v1", TRAIN, VALIDATION)
        with pytest.raises(UserError) as raised:
            run(config)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("synthesize: the provider refused batch batch_1 (batch.1.input.jsonl): ")
    assert "line 1: invalid_request: The model 'teacher-100b' does not exist.; line 2: invalid_request" in message
    assert not (config.stage_dir("synthesize") / "train.jsonl").exists()


def test_a_run_stopped_while_waiting_waits_for_the_same_batch_again(tmp_path):
    """The first run stops at its second status check (the key was rotated: 401); the next run submits nothing and
    ends with every record once."""
    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher, fail_checks_after=1) as api:
        config = batch_config(tmp_path, f"{api.url}/v1", TRAIN, VALIDATION)
        with pytest.raises(UserError, match="refused the credential"):
            run(config)
        state = json.loads((config.stage_dir("synthesize") / "batch.json").read_text())
        ids = [(entry["input_file_id"], entry["batch_id"], entry["requests"]) for entry in state["batches"]]
        assert ids == [("file-1", "batch_1", 5)]
        api.fail_checks_after = None
        out = run(config)
    assert len(api.uploads) == 1 and len(api.creates) == 1
    assert len(read(out / "train.jsonl")) == 2 and len(read(out / "rejected.jsonl")) == 2
    exactly_once(out, "train", 4)
    exactly_once(out, "validation", 1)


def test_a_create_whose_answer_was_lost_finds_its_batch_instead_of_creating_another(tmp_path):
    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher, lose_create_answers=1) as api:
        out = run(batch_config(tmp_path, f"{api.url}/v1", TRAIN, VALIDATION))
    assert len(api.creates) == 1 and len(api.batches) == 1
    assert ("GET", "/v1/batches", {"limit": "100"}) in api.calls  # looked up by its input file
    assert len(read(out / "train.jsonl")) == 2


def test_a_run_killed_while_waiting_submits_nothing_twice(make_config, tmp_path):
    """SIGKILL of `azdistill synthesize` while the batch runs; the next run waits for that batch and ends with every
    record once."""
    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher, hold=True, api_key=KEY) as api:
        extra = f"""
        teacher:
          kind: openai-compatible
          endpoint: {api.url}/v1
          model: teacher-100b
          auth: {{api_key_env: {KEY_ENV}}}
        synthesis:
          mode: batch
          batch_poll_s: 0.05
          min_success_ratio: 0
        student:
          model: {_student_folder(tmp_path / 'student')}
        """
        path = make_config(extra=extra)
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        process = subprocess.Popen([sys.executable, "-m", "azdistill", "synthesize", str(path)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not (api.creates and api.checks >= 2):
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "the run never started waiting for its batch"
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        api.hold = False
        from azdistill.config.loading import load_config

        config = load_config(path)
        out = run(config)
    assert len(api.uploads) == 1 and len(api.creates) == 1
    counts = {split: len(read(Path(getattr(config.data, split)))) for split in ("train", "validation")}
    for split, records in counts.items():
        exactly_once(out, split, records)
        assert len(read(out / f"{split}.jsonl")) == records  # every record answered, in input order


def test_a_forced_rerun_cancels_the_batch_it_will_not_use(tmp_path):
    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher, fail_checks_after=1) as api:
        config = batch_config(tmp_path, f"{api.url}/v1", TRAIN, VALIDATION)
        with pytest.raises(UserError):
            run(config)
        api.fail_checks_after = None
        out = run(config, force=True)
    assert api.cancels == ["batch_1"] and len(api.creates) == 2
    assert [batch["batch_id"] for batch in json.loads((out / "stats.json").read_text())["batch"]["batches"]] == ["batch_2"]


def test_a_batch_that_could_pass_the_budget_is_not_submitted(tmp_path):
    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher) as api:
        config = batch_config(tmp_path, f"{api.url}/v1", TRAIN, VALIDATION, max_cost=0.005, preflight=False)
        with pytest.raises(StageFailed, match=r"the next batch of 5 requests could cost up to 0\.00[0-9]+ at batch prices"):
            run(config)
    assert not api.uploads


@pytest.mark.parametrize("api_version", ["2024-10-21", "v1"])
def test_azure_openai_batches_go_to_the_resource_with_the_api_version_and_the_deployment_as_model(tmp_path, api_version):
    teacher_settings = {"kind": "azure_openai", "deployment": "gpt-4o-batch", "api_version": api_version, "model": "builtin"}
    with FakeTeacherServer() as teacher, FakeBatchAPI(teacher, api_key=KEY, file_checks=1) as api:
        out = run(batch_config(tmp_path, api.url, TRAIN, VALIDATION, teacher=teacher_settings))
    prefix, query = ("/openai", {"api-version": api_version}) if api_version != "v1" else ("/openai/v1", {})
    calls = [(method, path, {k: v for k, v in params.items() if k == "api-version"}) for method, path, params in api.calls]
    assert calls[:5] == [("GET", f"{prefix}/batches", query), ("POST", f"{prefix}/files", query),
                         ("GET", f"{prefix}/files/file-1", query), ("POST", f"{prefix}/batches", query),
                         ("GET", f"{prefix}/batches/batch_1", query)]
    output_file = json.loads((out / "batch.json").read_text())["batches"][0]["output_file_id"]
    assert ("GET", f"{prefix}/files/{output_file}/content", query) in calls
    assert set(api.auth_headers) == {"api-key"} and set(api.credentials) == {KEY}
    (upload,) = api.uploads
    assert {line["url"] for line in upload["lines"]} == {"/chat/completions"}
    assert {line["body"]["model"] for line in upload["lines"]} == {"gpt-4o-batch"}
    assert api.creates[0]["endpoint"] == "/chat/completions"
    # The key travels in headers only: in no file the stage wrote.
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), path


def _student_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    "task, overrides, key, fix",
    [
        ("nli", ("teacher.kind=local",), "synthesis.mode", "teacher.kind local has not"),
        ("nli", ("teacher.kind=serverless",), "synthesis.mode", "teacher.kind serverless has not"),
        ("conversation", (), "synthesis.mode", "each turn needs the teacher's answer to the one before"),
        ("nli", ("synthesis.augment=1",), "synthesis.augment", "set synthesis.augment_method perturb"),
    ],
)
def test_what_a_batch_cannot_answer_is_refused_at_validate(make_config, tmp_path, task, overrides, key, fix):
    extra = f"""
    teacher:
      kind: openai-compatible
      endpoint: http://127.0.0.1:9/v1
      model: teacher-100b
      auth: {{method: none}}
    synthesis:
      mode: batch
    student:
      model: {_student_folder(tmp_path / 'student')}
    """
    config = make_config(task, extra=extra)
    if "teacher.kind=local" in overrides:  # a local teacher has no endpoint
        overrides = ("teacher.endpoint=null", "teacher.model=builtin", *overrides)
    result = CliRunner().invoke(cli, ["validate", str(config)] + [part for item in overrides for part in ("--set", item)])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and f"{key}:" in line and fix in line, line


def test_a_batch_config_with_perturbed_prompts_and_votes_validates(make_config, tmp_path):
    extra = f"""
    teacher:
      kind: azure_openai
      endpoint: https://example.openai.azure.com
      deployment: gpt-4o-batch
      api_version: 2024-10-21
      auth: {{method: none}}
    synthesis:
      mode: batch
      augment: 1
      augment_method: perturb
      self_consistency: 3
    student:
      model: {_student_folder(tmp_path / 'student')}
    """
    result = CliRunner().invoke(cli, ["validate", str(make_config("nli", extra=extra))])
    assert result.exit_code == 0, result.output
