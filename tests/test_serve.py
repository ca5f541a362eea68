"""`azdistill serve`: which model MODEL names, and a trained student answering the official `openai` client.

The fast tests resolve MODEL through the command line with the server replaced by a recorder (`no_server`), so
they load no model and start nothing: folders hold only the files resolution looks at. The slow test trains a tiny
student for real and serves it with `transformers serve` on 127.0.0.1, as a user would, then stops it with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import separate_tiny_student

from azdistill.cli import cli
from azdistill.serving.local import Server, link_name

SERVER_START_LIMIT_S = 300  # a safety limit for a loaded machine, not a measurement
CONVERSATIONS = [
    [
        {"role": "system", "content": "Classify the review as positive or negative."},
        {"role": "user", "content": review},
        {"role": "assistant", "content": label},
    ]
    for review, label in (
        ("Loved every minute.", "positive"), ("Dull and far too long.", "negative"),
        ("Great acting.", "positive"), ("A waste of time.", "negative"),
    )
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_model_folder(folder: Path) -> Path:
    """What resolution looks at in a model folder: its config and its tokenizer's (no weights, nothing loads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def finished_stage(stage: Path) -> Path:
    fake_model_folder(stage / "model")
    (stage / "stage.json").write_text(json.dumps({"stage": "finetune"}))
    return stage


@pytest.fixture
def no_server(monkeypatch) -> list[Server]:
    """Replace the server with a recorder that is ready at once and stops as Ctrl-C would; returns what it was given."""
    import azdistill.serving.local

    served: list[Server] = []

    def record(server: Server, on_ready) -> None:
        served.append(server)
        on_ready()

    monkeypatch.setattr(azdistill.serving.local, "run_server", record)
    return served


def serve(*args) -> object:
    return CliRunner().invoke(cli, ["serve", *[str(arg) for arg in args], "--port", str(_free_port())])


def assert_user_error(result, *fragments: str) -> None:
    """Exit 2 with exactly one line on stderr, `error: ...` holding every fragment, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_a_model_folder_is_served_under_the_registered_model_name(make_config, tmp_path, no_server):
    config = make_config()
    folder = fake_model_folder(tmp_path / "my-student")
    result = serve(folder, "-c", config)
    assert result.exit_code == 0, result.output
    (server,) = no_server
    assert server.folder == folder.resolve() and server.name == "unit-test-student" and server.host == "127.0.0.1"
    assert f"model folder  {folder.resolve()}" in result.stdout
    assert f"base URL      http://127.0.0.1:{server.port}/v1" in result.stdout
    body = json.dumps({"model": "unit-test-student", "messages": [{"role": "user", "content": "Hello!"}]})
    curl = f"curl http://127.0.0.1:{server.port}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"
    assert f"  try it        {curl}" in result.stdout
    assert result.stdout.splitlines()[-2:] == [f"ready: {server.base_url} (Ctrl-C stops the server)", "stopped"]


def test_a_finished_finetune_stage_is_served_by_default_and_by_its_folder(make_config, workdir, no_server):
    config = make_config()
    stage = finished_stage(workdir / "runs" / "unit-test" / "finetune")
    assert serve("-c", config, "--name", "org/teacher-model").exit_code == 0
    assert serve(stage, "-c", config).exit_code == 0
    assert [server.folder for server in no_server] == [(stage / "model").resolve()] * 2
    assert no_server[0].name == "org/teacher-model"


def test_without_a_finetuned_student_the_default_is_refused_in_one_line(make_config, no_server):
    config = make_config()
    assert_user_error(serve("-c", config), "MODEL: no finetuned student", f"`azdistill run {config}`")
    assert no_server == []


def test_a_stage_that_has_not_finished_is_refused(make_config, workdir, no_server):
    config = make_config()
    stage = workdir / "runs" / "unit-test" / "finetune"
    fake_model_folder(stage / "model")
    assert_user_error(serve("-c", config), "has not finished (no stage.json)")
    assert_user_error(serve(stage, "-c", config), "has not finished (no stage.json)")


def test_an_mlflow_model_gets_its_weights_and_tokenizer_joined_in_the_workdir(make_config, workdir, tmp_path, no_server):
    mlflow_model = tmp_path / "mlflow-student"
    (fake_model_folder(mlflow_model / "model") / "tokenizer_config.json").unlink()
    fake_model_folder(mlflow_model / "components" / "tokenizer")
    (mlflow_model / "MLmodel").write_text("flavors: {}\n")
    assert serve(mlflow_model, "-c", make_config()).exit_code == 0
    served = no_server[0].folder
    assert served.parent == (workdir / "serving" / "joined").resolve()
    assert {link.name for link in served.iterdir()} == {"config.json", "tokenizer_config.json"}


def _register(config_path: Path, workdir: Path, tmp_path: Path, versions: int, champion: str | None = None) -> None:
    """Register `versions` versions of the config's student in its local MLflow store, as a run with tracking on does."""
    from mlflow import MlflowClient

    from azdistill.config.loading import load_config

    settings = load_config(config_path, ())
    workdir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    client.create_registered_model(settings.registered_model_name)
    for number in range(1, versions + 1):
        source = fake_model_folder(tmp_path / "registered" / f"v{number}")
        client.create_model_version(settings.registered_model_name, source=str(source))
    if champion is not None:
        client.set_registered_model_alias(settings.registered_model_name, "champion", champion)


def test_a_registered_version_is_downloaded_once_and_reused(make_config, workdir, tmp_path, no_server, monkeypatch):
    config = make_config()
    _register(config, workdir, tmp_path, versions=2)
    result = serve("v2", "-c", config)
    assert result.exit_code == 0, result.output
    assert "Serving version 2 of 'unit-test-student' as 'unit-test-student'" in result.stdout
    download = workdir / "serving" / "registry" / "unit-test-student" / "v2"
    assert no_server[0].folder == download.resolve() and (download / "config.json").is_file()

    import mlflow.artifacts

    def no_download(*args, **kwargs):
        raise AssertionError("a version downloaded before was downloaded again")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    assert serve("2", "-c", config).exit_code == 0
    assert no_server[1].folder == download.resolve()


def test_the_champion_is_served_by_its_alias(make_config, workdir, tmp_path, no_server):
    config = make_config()
    _register(config, workdir, tmp_path, versions=2, champion="1")
    result = serve("@champion", "-c", config)
    assert result.exit_code == 0, result.output
    assert "Serving version 1 of 'unit-test-student' (@champion)" in result.stdout
    assert no_server[0].folder == (workdir / "serving" / "registry" / "unit-test-student" / "v1").resolve()


def test_versions_that_are_not_registered_are_refused_in_one_line(make_config, workdir, tmp_path, no_server):
    config = make_config()
    assert_user_error(serve("3", "-c", config), "MODEL: 3 is a registered version", "no tracking store yet")
    _register(config, workdir, tmp_path, versions=2)
    assert_user_error(serve("v7", "-c", config), "'unit-test-student' has no version 7", "registered versions: 1, 2")
    assert_user_error(serve("@champion", "-c", config), "has no champion yet", "give a version instead: 1, 2")
    assert_user_error(serve("@staging", "-c", config), "@staging is not an alias azdistill sets")
    assert no_server == []


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--name", "../outside"], "--name: '../outside' cannot be a served model name"),
        (["--name", "model@v2"], "--name: 'model@v2' cannot be a served model name"),
        (["--device", "gpu"], "--device: 'gpu' is not a device"),
        (["--host", "no-such-host.invalid"], "--host: 'no-such-host.invalid' is not an address of this machine"),
    ],
)
def test_server_options_that_cannot_work_are_refused_before_anything_loads(make_config, tmp_path, no_server, options, fragment):
    folder = fake_model_folder(tmp_path / "student")
    assert_user_error(serve(folder, "-c", make_config(), *options), fragment)
    assert no_server == []


def test_a_port_in_use_is_refused(make_config, tmp_path, no_server):
    folder = fake_model_folder(tmp_path / "student")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", str(folder), "-c", str(make_config()), "--port", str(port)])
    assert_user_error(result, f"--port: {port} on 127.0.0.1 cannot be used")


def test_served_names_are_links_that_a_later_serve_replaces(tmp_path):
    names, first, second = tmp_path / "names", fake_model_folder(tmp_path / "a"), fake_model_folder(tmp_path / "b")
    link_name(names, "student", first)  # the first link, in a folder that does not exist yet
    assert (names / "student").is_symlink() and (names / "student").resolve() == first.resolve()
    link_name(names, "org/model", first)
    assert (names / "org" / "model").resolve() == first.resolve()
    link_name(names, "org/model", second)
    assert (names / "org" / "model").resolve() == second.resolve()
    link_name(names, "org", first)  # a name that was a folder of names before
    assert (names / "org").is_symlink() and (names / "org").resolve() == first.resolve()
    link_name(names, "org/model", second)  # and back
    assert not (names / "org").is_symlink() and (names / "org" / "model").resolve() == second.resolve()
    assert first.is_dir() and (first / "config.json").is_file()  # a link's target is never touched


# ---------------------------------------------------------------------------------------------------
# A real server


@pytest.fixture(scope="module")
def trained_student(tmp_path_factory) -> Path:
    """A 2-layer Llama with the built-in teacher's tokenizer and chat template, trained for one epoch."""
    from azdistill.config.sections import TrainingConfig
    from azdistill.training.loop import train_student

    root = tmp_path_factory.mktemp("student")
    separate_tiny_student(root / "initial")
    settings = TrainingConfig(learning_rate=5e-3, batch_size=2, epochs=1, logging_steps=1, save_steps=100)
    summary = train_student(CONVERSATIONS, [], root / "initial", root / "finetuned", settings)
    assert summary["steps"] == 2 and summary["parameters_changed"] > 0
    return root / "finetuned" / "model"


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def _wait_for(lines: queue.Queue, process: subprocess.Popen, prefix: str, seen: list[str]) -> None:
    deadline = time.monotonic() + SERVER_START_LIMIT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            pytest.fail(f"azdistill serve exited ({process.wait()}) before printing {prefix!r}: {''.join(seen)}")
        seen.append(line)
        if line.startswith(prefix):
            return
    pytest.fail(f"azdistill serve did not print {prefix!r}: {''.join(seen)}")


@pytest.mark.slow
def test_a_trained_student_answers_the_openai_client_and_stops_on_ctrl_c(trained_student, tmp_path):
    import openai

    port = _free_port()
    command = [
        sys.executable, "-m", "azdistill", "serve", str(trained_student), "--port", str(port), "--name", "tiny-student",
        "--set", f"workdir={tmp_path / 'work'}",
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # Started with SIGINT ignored, as a process in the background of a non-interactive shell (or some CI runners)
    # inherits it: Ctrl-C must stop the server all the same.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        _wait_for(lines, process, "ready", seen)
        assert f"  base URL      http://127.0.0.1:{port}/v1\n" in seen
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [CONVERSATIONS[2][0], {"role": "user", "content": "Great acting, and a story that holds."}]

        answer = client.chat.completions.create(model="tiny-student", messages=messages, max_tokens=8, temperature=0)
        assert answer.model.startswith("tiny-student")  # transformers serve adds its revision: tiny-student@main
        assert isinstance(answer.choices[0].message.content, str) and answer.choices[0].finish_reason in ("stop", "length")
        assert 0 < answer.usage.completion_tokens <= 8

        stream = client.chat.completions.create(model="tiny-student", messages=messages, max_tokens=8, temperature=0, stream=True)
        chunks = list(stream)
        assert len(chunks) >= 2 and all(chunk.model.startswith("tiny-student") for chunk in chunks)
        streamed = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
        assert streamed == answer.choices[0].message.content  # greedy: the same answer, in pieces
        assert any(choice.finish_reason in ("stop", "length") for chunk in chunks for choice in chunk.choices)

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, "".join(seen)
        _wait_for(lines, process, "stopped", seen)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with pytest.raises(openai.APIConnectionError):  # the server went with it
        client.chat.completions.create(model="tiny-student", messages=messages, max_tokens=8)


@pytest.mark.slow
def test_a_server_that_exits_before_it_is_ready_fails_with_its_last_log_lines(tmp_path):
    broken = fake_model_folder(tmp_path / "broken")  # a config with no architecture and no weights: it cannot load
    result = CliRunner().invoke(
        cli, ["serve", str(broken), "--port", str(_free_port()), "--name", "broken", "--set", f"workdir={tmp_path / 'work'}"]
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("failed: the server exited with status ") and "before it was ready" in result.stderr
    log = next((tmp_path / "work" / "serving" / "logs").glob("serve-*.log"))
    assert f"the last lines of its log {log}:" in result.stderr
    assert result.stderr.splitlines()[-1] == "  " + log.read_text().splitlines()[-1]  # the server's own error, last
    assert "stopped" not in result.stdout
