"""Latency as users feel it (evaluation/measure.py): the time to first token, noted by a transformers streamer inside
the one generation that also times the whole response, and the latency per output token; a hosted model's first
token, which a client that does not stream cannot see, left unmeasured. Clocks are fake or the figures are worked out
from recorded timestamps: no test asserts on how long anything took."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import stand_in_model_folders

from azdistill.config.loading import load_config
from azdistill.evaluation.measure import FirstTokenClock, latency_figures, measure_hosted, timed_single_answers

CONVERSATIONS = [
    [{"role": "user", "content": "Review: I loved it. Sentiment?"}],
    [{"role": "user", "content": "Review: a dull, long film that never ends. Sentiment?"}],
    [{"role": "user", "content": "Review: Great cast. Sentiment?"}],
]


def _ticks():
    """A clock that moves one second each time it is read."""
    counter = itertools.count()
    return lambda: float(next(counter))


def test_the_first_token_clock_ignores_the_prompt_and_keeps_the_first_token():
    clock = FirstTokenClock(_ticks())
    clock.put("the prompt's token ids")  # generate hands the prompt over first
    assert clock.first_token_at is None
    clock.put("token 1")
    clock.put("token 2")
    clock.end()
    assert clock.first_token_at == 0.0  # read once, at the first answer token


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from conftest import separate_tiny_student

    from azdistill.models.loading import load_model, load_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model spends its time synchronising threads on a busy machine
    folder = separate_tiny_student(tmp_path_factory.mktemp("tiny"))
    yield load_model(folder, "cpu").eval(), load_tokenizer(folder)
    torch.set_num_threads(threads)


def test_local_answers_are_timed_to_their_first_token_in_the_same_generation(tiny_model):
    from azdistill.models.generation import GenerationSettings, generate_batch

    model, tokenizer = tiny_model
    settings = GenerationSettings(max_new_tokens=6, batch_size=1)
    timings = timed_single_answers(model, tokenizer, CONVERSATIONS, settings, clock=_ticks())
    assert len(timings) == len(CONVERSATIONS)
    for timing, messages in zip(timings, CONVERSATIONS):
        # The clock is read when the prompt is sent, when the first token is chosen and when the answer is complete:
        # the first token comes inside the generation, between the two ends of the response.
        assert (timing.first_token_s, timing.seconds) == (1.0, 2.0)
        # The streamer only watches: the answer is the one generated without it, tokens and all.
        (unwatched,) = generate_batch(model, tokenizer, [messages], settings)
        assert timing.output_tokens == unwatched.completion_tokens and 1 <= timing.output_tokens <= 6


def test_latency_figures_from_recorded_timings():
    measured = {
        "latencies_s": [1.0, 2.0, 4.0, 0.5],
        "first_token_s": [0.1, 0.2, 0.3, 0.4],
        # The third response rambled for 40 tokens: slow per response, fast per token.
        "output_tokens": [10, 10, 40, 0],  # 0: the endpoint reported no usage; that response has no per-token figure
    }
    figures = latency_figures(measured)
    assert figures["latency_p50_s"] == pytest.approx(1.5)
    assert figures["ttft_p50_s"] == pytest.approx(0.25)
    assert figures["latency_per_token_p50_s"] == pytest.approx(0.1)  # median of 0.1, 0.2 and 0.1

    # Saved answers from before these figures, a hosted model (no first token), a logged teacher (nothing timed).
    assert latency_figures({"latencies_s": [1.0]}) == {
        "latency_p50_s": 1.0, "latency_p95_s": 1.0, "ttft_p50_s": None, "latency_per_token_p50_s": None}
    hosted = latency_figures({"latencies_s": [1.0, 3.0], "first_token_s": None, "output_tokens": [2, 2]})
    assert hosted["ttft_p50_s"] is None and hosted["latency_per_token_p50_s"] == pytest.approx(1.0)
    logged = latency_figures({"latencies_s": [], "first_token_s": None, "output_tokens": None})
    assert logged["ttft_p50_s"] is None and logged["latency_per_token_p50_s"] is None
    assert all(value != value for value in (logged["latency_p50_s"], logged["latency_p95_s"]))  # NaN: not timed


def _right_label(messages: list[dict]) -> str:
    return "positive" if any(word in messages[-1]["content"] for word in ("loved", "Great")) else "negative"


HOSTED = """
teacher:
  kind: openai-compatible
  endpoint: {url}/v1
  model: big-teacher
  auth: {{method: none}}
student:
  model: unused-student
evaluation:
  latency_samples: 2
  max_new_tokens: 16
"""


@pytest.fixture
def hosted_teacher(make_config):
    """A hosted teacher (the loopback fake endpoint) and a config for it; `task` "qa" makes it answer freely."""
    from fake_teacher_server import FakeTeacherServer

    with FakeTeacherServer(answer=lambda messages: f"{_right_label(messages)} for sure") as server:
        yield server, lambda task="nli": make_config(task, extra=HOSTED.format(url=server.url), counts={"test": 5})


def test_a_hosted_model_has_per_token_latency_but_no_faked_first_token(hosted_teacher):
    server, write_config = hosted_teacher
    measured = measure_hosted(load_config(write_config("qa")), CONVERSATIONS)
    assert measured["first_token_s"] is None  # the client asks without streaming: not seen, so not reported
    # Each timed request's output tokens as the endpoint counted them (the fake counts words: "positive for sure").
    assert measured["output_tokens"] == [3, 3]
    figures = latency_figures(measured)
    assert figures["ttft_p50_s"] is None
    per_token = sorted(seconds / 3 for seconds in measured["latencies_s"])
    assert figures["latency_per_token_p50_s"] == pytest.approx((per_token[0] + per_token[1]) / 2)


def test_the_evaluate_stage_reports_first_token_and_per_token_latency(hosted_teacher, tmp_path, monkeypatch):
    """The stage end to end with the local rows' measurements recorded (no model loads): report.json carries the
    figures, the hosted teacher's first token stays null, and report.html is written beside report.md."""
    from azdistill.stages import evaluate as stage
    from azdistill.stages import state

    def recorded(path, conversations, settings, runtime, description, labels=None):
        rambles = description == "baseline"
        return {
            "answers": [_right_label(messages) for messages in conversations],
            "latencies_s": [0.2, 0.4] if rambles else [0.1, 0.2],
            "first_token_s": [0.02, 0.04], "output_tokens": [40, 40] if rambles else [2, 4],
            "throughput_tokens_per_s": 10.0, "generated_tokens": 10, "seconds": 1.0, "parameters": 10, "weights_bytes": 40,
            "peak_memory_bytes": 100, "size_on_disk_bytes": 40, "device": "cpu",
        }

    monkeypatch.setattr(stage, "measure_in_child", recorded)
    models = stand_in_model_folders(tmp_path)
    _, write_config = hosted_teacher
    config = load_config(write_config())
    report = stage.evaluate(config, None, models)

    out_dir = Path(config.stage_dir("evaluate"))
    rows = {row["role"]: row for row in json.loads((out_dir / "report.json").read_text())["models"]}
    assert rows["student"]["ttft_p50_s"] == pytest.approx(0.03)
    assert rows["student"]["latency_per_token_p50_s"] == pytest.approx((0.1 / 2 + 0.2 / 4) / 2)
    # The baseline rambles: twice the student's latency per response, a tenth of its latency per token.
    assert rows["baseline"]["latency_p50_s"] == pytest.approx(0.3)
    assert rows["baseline"]["latency_per_token_p50_s"] == pytest.approx(0.3 / 40)
    assert rows["teacher"]["ttft_p50_s"] is None and rows["teacher"]["latency_per_token_p50_s"] > 0
    assert report.champion_metric == "agreement"
    assert "A hosted model's time to first token is not measured" in (out_dir / "report.md").read_text()
    html = (out_dir / "report.html").read_text()
    assert "Time to first token p50 (s)" in html and "data:image/png;base64," in html
    assert "report.html" in json.loads((out_dir / state.DONE_FILE).read_text())["outputs"]  # verified on reuse

