"""The served student against the teacher's endpoint, as a client sees both (issue 14).

Starts two real OpenAI-compatible servers on 127.0.0.1, one after the other:

- ours: `azdistill serve` with the distilled student (default: the demo's finetune output, so run `make demo` first);
- the baseline: the teacher's endpoint, here `transformers serve` with the built-in SmolLM2 teacher (the same server
  software, so the comparison is the models, not the servers).

Each answers the same held-out prompts of the demo's test split, one request at a time, through the official `openai`
client: latency per response (non-streaming), time to first token (streaming), and output tokens per second. The two
endpoints take turns prompt by prompt, so a burst of load on this shared machine hits both alike. Medians and the
ratio are printed; docs/benchmarks.md records them with the machine.

    .venv/bin/python bench/serve_latency.py [--student FOLDER] [--prompts 20] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_START_LIMIT_S = 600  # a safety limit for a loaded machine, not a measurement


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(base: str, server: subprocess.Popen, log: Path) -> None:
    import requests

    deadline = time.monotonic() + SERVER_START_LIMIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server did not answer /health: {log.read_text()[-2000:]}")


def start(command: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    with log.open("w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=cwd)


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def ask(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One non-streaming and one streaming request: latency, time to first token, output tokens per second."""
    started = time.perf_counter()
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    latency = time.perf_counter() - started
    tokens = answer.usage.completion_tokens if answer.usage else None
    started = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return {"latency": latency, "ttft": first, "tokens": tokens, "tokens_per_s": tokens / latency if tokens else None}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summary(rows: list[dict]) -> dict:
    latencies = [row["latency"] for row in rows]
    ttfts = [row["ttft"] for row in rows if row["ttft"] is not None]
    rates = [row["tokens_per_s"] for row in rows if row["tokens_per_s"]]
    tokens = [row["tokens"] for row in rows if row["tokens"]]
    return {
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": percentile(latencies, 0.95),
        "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"),
        "tokens_per_s_p50": statistics.median(rates) if rates else float("nan"),
        "output_tokens_p50": statistics.median(tokens) if tokens else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, default=ROOT / ".azdistill" / "runs" / "sentiment-demo" / "finetune",
                        help="a finished finetune stage or model folder (default: the demo's)")
    parser.add_argument("--prompts", type=int, default=20, help="held-out prompts sent to each endpoint")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (the demo's evaluation setting)")
    arguments = parser.parse_args()

    from openai import OpenAI

    from azdistill.config.loading import load_config
    from azdistill.data.records import read_records
    from azdistill.models.builtin import builtin_teacher_path

    config = load_config(None)
    prompts = [record.messages[:2] for record in read_records(config.data.test, config.task.type)][: arguments.prompts]
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "azdistill-serve-latency"
    logs.mkdir(parents=True, exist_ok=True)

    student_port, teacher_port = free_port(), free_port()
    student = start([sys.executable, "-m", "azdistill", "serve", str(arguments.student), "--port", str(student_port),
                     "--device", "cpu", "--name", "student"], logs / "student.log")  # fmt: skip
    transformers_cli = str(Path(sys.executable).parent / "transformers")
    teacher_path = builtin_teacher_path()
    teacher = start([transformers_cli, "serve", teacher_path.name, "--host", "127.0.0.1", "--port", str(teacher_port),
                     "--device", "cpu"], logs / "teacher.log", cwd=teacher_path.parent)  # fmt: skip
    try:
        endpoints = {
            "student (azdistill serve)": (OpenAI(base_url=f"http://127.0.0.1:{student_port}/v1", api_key="unused"), "student"),
            "teacher (transformers serve)": (OpenAI(base_url=f"http://127.0.0.1:{teacher_port}/v1", api_key="unused"), teacher_path.name),
        }
        wait_for_health(f"http://127.0.0.1:{student_port}", student, logs / "student.log")
        wait_for_health(f"http://127.0.0.1:{teacher_port}", teacher, logs / "teacher.log")
        for label, (client, model) in endpoints.items():  # one warm-up request each, not measured
            ask(client, model, prompts[0], arguments.max_tokens)
        rows: dict[str, list[dict]] = {label: [] for label in endpoints}
        for messages in prompts:  # the endpoints take turns prompt by prompt
            for label, (client, model) in endpoints.items():
                rows[label].append(ask(client, model, messages, arguments.max_tokens))
    finally:
        stop(student)
        stop(teacher)

    figures = {label: summary(values) for label, values in rows.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"{len(prompts)} held-out prompts, max_tokens {arguments.max_tokens}, CPU, one request at a time")  # fmt: skip
    header = f"{'endpoint':32} {'p50 s':>8} {'p95 s':>8} {'TTFT p50 s':>11} {'tok/s p50':>10} {'out tok p50':>12}"
    print(header)
    for label, figure in figures.items():
        print(f"{label:32} {figure['latency_p50_s']:8.3f} {figure['latency_p95_s']:8.3f} {figure['ttft_p50_s']:11.3f} "
              f"{figure['tokens_per_s_p50']:10.1f} {figure['output_tokens_p50']:12.0f}")  # fmt: skip
    ours, theirs = figures["student (azdistill serve)"], figures["teacher (transformers serve)"]
    print(f"student/teacher: latency p50 x{ours['latency_p50_s'] / theirs['latency_p50_s']:.2f}, "
          f"TTFT p50 x{ours['ttft_p50_s'] / theirs['ttft_p50_s']:.2f}, "
          f"tokens/s x{ours['tokens_per_s_p50'] / theirs['tokens_per_s_p50']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
