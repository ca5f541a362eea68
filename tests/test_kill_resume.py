"""Kill at random, then resume: `azdistill run` killed with SIGKILL at random moments (as often as it takes to cross
every stage) and rerun ends with the same outputs as a run never interrupted: the same synthetic set, the same
student weights, the same evaluation answers and quality figures.

The teacher is the loopback fake (deterministic answers, a little latency); the student a 2-layer model built
from a config, so one uninterrupted run takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from azdistill.config.sections import PROJECT_ROOT

pytestmark = pytest.mark.slow

RUNS = 3  # interrupted runs, each killed until it has been killed in every stage it reached
SEED = 20261130
STUCK_S = 300  # a run takes about 20 s here: one that has not moved on in this long is stuck, and the test says where


def _answer(messages: list[dict]) -> str:
    text = messages[-1]["content"].lower()
    return "positive" if any(word in text for word in ("great", "love", "good", "excellent", "delight")) else "negative"


@pytest.fixture(scope="module")
def teacher():
    from fake_teacher_server import FakeTeacherServer

    with FakeTeacherServer(latency_s=0.05, answer=_answer) as server:
        yield server


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from azdistill.models.builtin import builtin_teacher_path
    from azdistill.models.loading import load_tokenizer

    folder = tmp_path_factory.mktemp("models") / "student"
    tokenizer = load_tokenizer(builtin_teacher_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _command(teacher, student: Path, workdir: Path) -> list[str]:
    settings = [
        f"workdir={workdir}", f"teacher.endpoint={teacher.url}/v1", "teacher.model=fake", "teacher.local_copy=null",
        "teacher.max_concurrency=2", f"student.model={student}", "data.max_records=12", "synthesis.min_success_ratio=0.2",
        "training.epochs=2", "training.batch_size=2", "training.save_steps=2", "training.learning_rate=0.001",
        "evaluation.latency_samples=2", "evaluation.max_new_tokens=8", "runtime.threads=1", "tracking.enabled=false",
    ]
    config = PROJECT_ROOT / "data" / "sentiment" / "teacher-openai-compatible.yaml"
    # -X faulthandler: a run that stops moving is sent SIGABRT and prints every thread's stack (_stuck).
    return [sys.executable, "-X", "faulthandler", "-m", "azdistill", "run", str(config)] + \
        [item for setting in settings for item in ("--set", setting)]


def _environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _stage_running(run_dir: Path) -> str:
    running = [path.parent.name for path in run_dir.glob("*/inprogress.json")]
    return running[0] if running else "between stages"


def _outputs(run_dir: Path) -> dict:
    """What must come out the same: the synthetic set, the student's weights, the answers and quality figures."""
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "finetune" / "model" / "model.safetensors"))
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    return {
        "synthetic": {name: (run_dir / "synthesize" / name).read_text() for name in ("train.jsonl", "validation.jsonl", "rejected.jsonl")},
        "weights": {name: tensor.tolist() for name, tensor in sorted(weights.items())},
        "answers": {role: json.loads((run_dir / "evaluate" / "predictions" / f"{role}.json").read_text())["answers"]
                    for role in ("teacher", "student", "baseline", "reference_sft")},
        "metrics": {model["role"]: model["metrics"] for model in report["models"]},
    }


@contextmanager
def _started(command: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """The run, its stderr appended to `log`, a file (a pipe nobody reads while it runs could fill and stop it);
    killed if it is still running when the block ends (a failed assertion, or the suite's time limit)."""
    with log.open("a") as stderr:
        process = subprocess.Popen(command, env=_environment(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _kill_during(stage: str, command: list[str], run_dir: Path, seconds: float, chooser: random.Random, log: Path) -> str:
    """Start the run, wait until `stage` is under way, SIGKILL it at a random moment within the stage's usual
    duration; returns where the kill landed ("finished" if the run ended first)."""
    with _started(command, log) as process:
        marker = run_dir / stage / "inprogress.json"
        deadline = time.monotonic() + STUCK_S
        while not marker.is_file() and process.poll() is None:
            if time.monotonic() > deadline:
                _stuck(process, log, f"reaching the {stage} stage")
            time.sleep(0.02)
        if process.poll() is None:
            try:
                process.wait(timeout=chooser.uniform(0.0, 1.0) * seconds)
            except subprocess.TimeoutExpired:
                landed = _stage_running(run_dir)
                process.send_signal(signal.SIGKILL)
                process.wait()
                return landed
        assert process.returncode == 0, _tail(log)
        return "finished"


def _run_to_the_end(command: list[str], log: Path) -> None:
    with _started(command, log) as process:
        try:
            process.wait(timeout=STUCK_S)
        except subprocess.TimeoutExpired:
            _stuck(process, log, "finishing")
        assert process.returncode == 0, _tail(log)


def _stuck(process: subprocess.Popen, log: Path, doing: str) -> None:
    """Fail with the stuck run's stack: SIGABRT makes its faulthandler print every thread's, then it is killed."""
    process.send_signal(signal.SIGABRT)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    pytest.fail(f"the run made no progress {doing} in {STUCK_S} s; its stderr ends:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-6000:]


def test_runs_killed_at_random_moments_end_with_the_outputs_of_an_uninterrupted_run(teacher, student, tmp_path):
    began = time.time()
    reference_dir = tmp_path / "uninterrupted"
    _run_to_the_end(_command(teacher, student, reference_dir), tmp_path / "uninterrupted.log")
    reference_run = reference_dir / "runs" / "sentiment-hosted"
    expected = _outputs(reference_run)
    # How long each stage took uninterrupted: the range of kill moments within it (nothing is asserted on time).
    seconds = json.loads((reference_run / "run.json").read_text())["stage_seconds"]

    chooser = random.Random(SEED)
    landed: list[list[str]] = []
    for attempt in range(RUNS):
        workdir = tmp_path / f"killed-{attempt}"
        run_dir = workdir / "runs" / "sentiment-hosted"
        command, log = _command(teacher, student, workdir), tmp_path / f"killed-{attempt}.log"
        kills = [_kill_during(stage, command, run_dir, max(seconds.get(stage, 1.0), 0.5), chooser, log)
                 for stage in ("synthesize", "finetune", "finetune-reference", "evaluate")]
        _run_to_the_end(command, log)
        landed.append(kills)
        assert _outputs(run_dir) == expected, f"run {attempt}, killed in {kills}"
    print(f"kills landed in: {landed}")
    # A killed run leaves no orphan behind: the evaluation's model-answering child dies with it.
    import psutil

    orphans = [process for process in psutil.process_iter(["cmdline", "ppid", "create_time"])
               if process.info["ppid"] == 1 and process.info["create_time"] >= began
               and "multiprocessing.spawn" in " ".join(process.info["cmdline"] or [])]
    assert not orphans, [process.info for process in orphans]
    inside = [stage for kills in landed for stage in kills if stage not in ("finished", "between stages")]
    assert {"synthesize", "finetune", "evaluate"} <= set(inside), landed
