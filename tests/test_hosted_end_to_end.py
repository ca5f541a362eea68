"""The documents' scenario end to end: a teacher behind an OpenAI-compatible endpoint distilled into a separate
local student, every stage through `azdistill run`.

The endpoint is a real inference server from the package index that this project did not write: `transformers
serve` (transformers' own OpenAI-compatible server, the `serving` extra) serving the built-in SmolLM2 teacher on
127.0.0.1. It refuses `logprobs`, so top-k distillation runs against the loopback fake teacher, which returns them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import separate_tiny_student

from azdistill.cli import cli
from azdistill.config.sections import PROJECT_ROOT

pytestmark = pytest.mark.slow

SAMPLE_CONFIG = PROJECT_ROOT / "data" / "sentiment" / "teacher-openai-compatible.yaml"
SERVER_START_LIMIT_S = 300  # a safety limit for a loaded machine, not a measurement


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _posts(log: Path) -> int:
    """Chat-completion requests the server answered, from its own access log."""
    return sum('"POST /v1/chat/completions HTTP/1.1" 200' in line for line in log.read_text(errors="replace").splitlines())


@pytest.fixture(scope="module")
def served_teacher(tmp_path_factory):
    """`transformers serve` on 127.0.0.1 with the built-in teacher; yields (base URL, served model name, access log)."""
    import requests

    from azdistill.models.builtin import builtin_teacher_path

    transformers_cli = Path(sys.executable).parent / "transformers"
    if not transformers_cli.is_file() or shutil.which("transformers", path=str(transformers_cli.parent)) is None:
        pytest.fail("the transformers command is missing from this environment (make test installs the lock)")
    model = str(builtin_teacher_path())
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(transformers_cli), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "info"],
            stdout=output, stderr=subprocess.STDOUT, env=environment,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + SERVER_START_LIMIT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited with {server.returncode}: {log.read_text()[-2000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer /health: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", model, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def separate_student(tmp_path_factory) -> Path:
    """A small student that is its own model folder (not pruned from the teacher)."""
    return separate_tiny_student(tmp_path_factory.mktemp("models") / "tiny-student")


def _overrides(workdir: Path, student: Path, *extra: str) -> list[str]:
    settings = [
        f"workdir={workdir}",
        f"student.model={student}",
        "teacher.local_copy=null",
        "data.max_records=8",
        "training.epochs=1",
        "evaluation.latency_samples=2",
        "synthesis.min_success_ratio=0.2",
        # An untrained 2-layer student fails the promotion checks; the run itself must still complete.
        "evaluation.promotion.beat_baseline=false",
        *extra,
    ]
    return [item for setting in settings for item in ("--set", setting)]


@pytest.fixture(scope="module")
def hosted_run(served_teacher, separate_student, tmp_path_factory):
    url, model, log = served_teacher
    workdir = tmp_path_factory.mktemp("hosted")
    args = ["run", str(SAMPLE_CONFIG)] + _overrides(workdir, separate_student, f"teacher.endpoint={url}", f"teacher.model={model}")
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return workdir / "runs" / "sentiment-hosted", result, log


def test_run_with_a_served_teacher_completes_every_stage(hosted_run):
    run_dir, result, _ = hosted_run
    assert result.exit_code == 0, result.output
    for stage in ("synthesize", "finetune", "finetune-reference", "evaluate"):
        assert (run_dir / stage / "stage.json").is_file(), stage
    stats = json.loads((run_dir / "synthesize" / "stats.json").read_text())
    assert stats["teacher"].startswith("openai-compatible:") and stats["splits"]["train"]["records"] == 8
    assert stats["endpoint"]["answered"] >= 16  # train and validation, every answer from the server
    assert "cost per 1,000 answers:" in result.output and "cheaper" in result.output


def test_the_teacher_row_was_measured_through_the_server(hosted_run):
    run_dir, result, log = hosted_run
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    teacher = report["models"][0]
    assert teacher["role"] == "teacher" and teacher["hosted"] is True
    assert teacher["name"] == "smollm2-135m-instruct (teacher, openai-compatible endpoint)"  # the served folder's name
    assert teacher["latency_p50_s"] > 0 and teacher["latency_p95_s"] >= teacher["latency_p50_s"]
    assert teacher["throughput_tokens_per_s"] > 0 and teacher["n"] == 8
    assert teacher["cost_per_1k_answers"] > 0  # token prices x the tokens the server counted
    assert teacher["size_on_disk_mb"] is None and teacher["peak_memory_mb"] is None  # hosted: not measurable
    student = report["models"][1]
    assert student["hosted"] is False and student["cost_per_1k_answers"] > 0  # serving_price_per_hour
    # The server's own access log holds every request: synthesis (stats.json) plus the evaluation's (2 timed, 8 scored).
    synthesis_requests = json.loads((run_dir / "synthesize" / "stats.json").read_text())["endpoint"]["requests"]
    evaluation = json.loads((run_dir / "evaluate" / "predictions" / "teacher.json").read_text())["endpoint"]
    assert evaluation["answered"] == 10
    assert _posts(log) >= synthesis_requests + evaluation["requests"]
    markdown = (run_dir / "evaluate" / "report.md").read_text()
    assert "| hosted |" in markdown and "Cost / 1k answers" in markdown


def test_topk_distillation_trains_on_the_hosted_log_probabilities(separate_student, tmp_path):
    from fake_teacher_server import FakeTeacherServer

    with FakeTeacherServer() as server:
        args = ["run", str(SAMPLE_CONFIG)] + _overrides(
            tmp_path, separate_student, f"teacher.endpoint={server.url}/v1", "teacher.model=teacher-with-logprobs",
            "synthesis.top_logprobs=3", "training.topk_weight=0.5", "evaluation.reference_baseline=false",
        )
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        asked = [body for body in server.bodies if body.get("logprobs")]
    assert result.exit_code == 0, result.output
    assert asked and all(body["top_logprobs"] == 3 for body in asked)
    run_dir = tmp_path / "runs" / "sentiment-hosted"
    assert (run_dir / "synthesize" / "train.logprobs.jsonl").stat().st_size > 0
    training = json.loads((run_dir / "finetune" / "training.json").read_text())
    assert training["loss_weights"]["topk"] == 0.5
    assert training["first_loss_topk"] > 0 and training["parameters_changed"] == training["trainable_tensors"]


def test_run_with_a_logged_teacher_uses_the_logged_answers_everywhere(separate_student, tmp_path):
    """`teacher.kind: logged`: the answers already in the data train the student, and the test split's logged
    answers are the teacher row; nothing is called."""
    args = ["run", str(SAMPLE_CONFIG)] + _overrides(
        tmp_path, separate_student, "teacher.kind=logged", "teacher.endpoint=null", "teacher.model=builtin",
        "teacher.auth.method=api_key_env", "teacher.max_concurrency=32", "teacher.price_per_million_prompt_tokens=null",
        "teacher.price_per_million_completion_tokens=null", "synthesis.max_cost=null", "evaluation.reference_baseline=false",
    )
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "sentiment-hosted"
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    teacher = report["models"][0]
    assert teacher["name"] == "logged answers (teacher)" and teacher["metrics"]["accuracy"] == 1.0  # the references
    assert teacher["latency_p50_s"] is None  # nothing was timed
