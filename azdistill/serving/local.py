"""Serving a model on this machine: `transformers serve`, transformers' own OpenAI-compatible server, run on one
model folder under the model name clients send, watched until it answers, and stopped cleanly.

transformers serve loads the model it is given with `from_pretrained` and answers only requests whose `model` is
that same string (it answers with `NAME@main`, its name for the revision). So that an application moving from the
teacher's endpoint changes only its base URL, the folder is reached through a link named like the served model,
`<workdir>/serving/names/<NAME>` (nested folders for a NAME with '/'), and the server runs in `names/` with NAME as
its model: a relative folder that exists is what `from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from azdistill.errors import StageFailed, UserError

# Segments of letters, digits, '.', '_' and '-' joined by '/', as Hugging Face and OpenAI model names are. No '@'
# (transformers serve would read a revision) and no '..' (the link must stay inside names/).
SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?|\d+")  # what transformers serve's --device takes
START_LIMIT_S = 1800  # a safety limit, far above loading a large student from a slow disk; not a measurement
STOP_GRACE_S = 30  # how long the server gets to finish its requests after Ctrl-C before it is killed
POLL_S = 0.5
LOG_TAIL_LINES = 20
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True)
class Server:
    """One `transformers serve` on this machine: the folder it serves, the model name requests send, where it
    listens, and the folder of its name links and its log."""

    folder: Path
    name: str
    host: str
    port: int
    device: str
    serving_dir: Path

    @property
    def base_url(self) -> str:
        """The URL an OpenAI client takes as its base URL; a server on every interface is reached on loopback."""
        host = WILDCARD_HOSTS.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    @property
    def names_dir(self) -> Path:
        return self.serving_dir / "names"

    @property
    def log_path(self) -> Path:
        return self.serving_dir / "logs" / f"serve-{self.port}.log"

    def curl_line(self) -> str:
        """A ready command line for one chat completion with one user message."""
        body = json.dumps({"model": self.name, "messages": [{"role": "user", "content": "Hello!"}]})
        return f"curl {self.base_url}/chat/completions -H 'Content-Type: application/json' -d '{body}'"


def transformers_command() -> Path:
    """The `transformers` command of this environment, found next to the running Python."""
    command = Path(sys.executable).parent / "transformers"
    if not (command.is_file() and os.access(command, os.X_OK)):
        raise UserError(
            f"the transformers command is not installed next to {sys.executable}; install the lock "
            "(`make test` builds .venv) or `pip install 'transformers[serving]'` into this environment"
        )
    return command


def check_server_options(name: str, host: str, port: int, device: str) -> None:
    """Refuse a name, device, host or port that cannot work, before any model is resolved or loaded."""
    if not SERVED_NAME.fullmatch(name):
        raise UserError(
            f"--name: {name!r} cannot be a served model name; use letters, digits, '.', '_' and '-', in parts "
            "joined by '/' (e.g. sentiment-student or org/model), each part starting with a letter or digit"
        )
    if not DEVICE.fullmatch(device):
        raise UserError(f"--device: {device!r} is not a device; give auto, cpu, cuda, cuda:N or mps")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # The server sets SO_REUSEADDR too, so a port left in TIME_WAIT by the last server is not refused here.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror as error:
            raise UserError(
                f"--host: {host!r} is not an address of this machine ({error.strerror}); e.g. 127.0.0.1 or 0.0.0.0"
            ) from None
        except OSError as error:
            raise UserError(f"--port: {port} on {host} cannot be used ({error.strerror}); choose another port") from None


def link_name(names_dir: Path, name: str, folder: Path) -> Path:
    """`names_dir/name` made a link to `folder` (nested folders for a name with '/'), replacing what an earlier
    serve left there: everything under `names_dir` is links this module made, or folders holding them."""
    link = names_dir.joinpath(*name.split("/"))
    names_dir.mkdir(parents=True, exist_ok=True)
    parent = names_dir
    for part in link.relative_to(names_dir).parts[:-1]:
        parent = parent / part
        if parent.is_symlink() or parent.is_file():
            parent.unlink()
        parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)  # an earlier name nested under this one: its links only
    staging = link.with_name(f".{link.name}.{os.getpid()}.link")
    staging.unlink(missing_ok=True)
    staging.symlink_to(folder.resolve(), target_is_directory=True)
    os.replace(staging, link)
    return link


def run_server(server: Server, on_ready: Callable[[], None]) -> None:
    """Serve until Ctrl-C (or SIGTERM), then stop the server and return; `on_ready` is called once it answers.

    Raises StageFailed when the server exits by itself or does not answer within START_LIMIT_S, with its last log
    lines. The server is stopped on every way out: terminated, given STOP_GRACE_S, then killed.
    """
    link_name(server.names_dir, server.name, server.folder)
    restore_signals = _signals_interrupt()  # before the start, so that no signal can leave the server behind
    try:
        process = _start(server)
        try:
            _wait_until_ready(process, server)
            on_ready()
            code = process.wait()
            raise StageFailed(f"the server exited by itself (status {code}); {_log_tail(server.log_path)}")
        except KeyboardInterrupt:
            return
        finally:
            _stop(process)
    finally:
        restore_signals()


def _start(server: Server) -> subprocess.Popen:
    """`transformers serve NAME` in the names folder, its output into the log file (truncated at each start)."""
    command = [
        str(transformers_command()), "serve", server.name,
        "--host", server.host, "--port", str(server.port), "--device", server.device,
    ]  # fmt: skip
    # Offline: the model is always a local folder, and a name that failed to resolve there must be an error, not a
    # download of whatever the Hub has under the same name (a teacher's name, say).
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    with server.log_path.open("wb") as log_file:
        return subprocess.Popen(command, cwd=server.names_dir, stdout=log_file, stderr=subprocess.STDOUT, env=environment)


def _signals_interrupt() -> Callable[[], None]:
    """Make Ctrl-C (SIGINT) and SIGTERM (a service manager, `kill`) stop the server, rather than leave it running
    without us; returns what puts the previous handlers back. Handlers can only be set from the main thread.

    SIGINT too: a process started in the background of a non-interactive shell (`make test &`, some CI runners)
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it, so Ctrl-C would do nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    return restore


def _wait_until_ready(process: subprocess.Popen, server: Server) -> None:
    """Wait until /health answers: transformers serve loads the model before it listens, so it is ready then."""
    deadline = time.monotonic() + START_LIMIT_S
    health = server.base_url.removesuffix("/v1") + "/health"
    while True:
        if process.poll() is not None:
            raise StageFailed(
                f"the server exited with status {process.returncode} before it was ready; {_log_tail(server.log_path)}"
            )
        if _answers(health):
            return
        if time.monotonic() > deadline:
            raise StageFailed(f"the server did not answer {health} within {START_LIMIT_S} s; {_log_tail(server.log_path)}")
        time.sleep(POLL_S)


# No proxy: the server is on this machine, and an http_proxy in the environment must not carry the health check.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path) -> str:
    """The server's last log lines, for an error that has to say why."""
    try:
        lines = deque(path.read_text(errors="replace").splitlines(), maxlen=LOG_TAIL_LINES)
    except OSError:
        return f"no log at {path}"
    if not lines:
        return f"its log {path} is empty"
    shown = "\n".join(f"  {line}" for line in lines)
    return f"the last lines of its log {path}:\n{shown}"


def _stop(process: subprocess.Popen) -> None:
    """Terminate the server and let it finish its requests; kill it when it takes too long or on a second Ctrl-C."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_GRACE_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        process.kill()
        process.wait()
