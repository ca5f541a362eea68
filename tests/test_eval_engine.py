"""What answers the held-out prompts for the quality figures (`evaluation.engine`, evaluation/engines.py): the
resolution of auto / transformers / vllm, the vLLM glue inside `measure_model`, the evaluate stage's early check and
its report, and the config key.

There is no GPU and no vLLM here: a stand-in for vLLM's `LLM` class records what our adapter hands it and answers
from a table. It tests our adapter (the arguments, the order of the answers, the token counts), not vLLM."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import itertools
import json
import sys
import types
from pathlib import Path

import pytest

from azdistill.config.loading import load_config
from azdistill.errors import UserError
from azdistill.evaluation.engines import VLLM_GPU_MEMORY_SHARE, answer_with_vllm, engine_on_this_machine, resolve_engine

CONVERSATIONS = [
    [{"role": "user", "content": "Review: I loved it. Sentiment?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Review: a dull film. Sentiment?"}],
    [{"role": "user", "content": "Review: Great cast. Sentiment?"}],
]
# The stand-in's answers by the last message of a conversation, with the token ids it says it generated.
ANSWER_TABLE = {
    "Review: I loved it. Sentiment?": (" positive\n", [11, 12, 2]),
    "Review: a dull film. Sentiment?": ("negative", [13, 2]),
    "Review: Great cast. Sentiment?": ("positive, clearly", [11, 14, 15, 2]),
}


# ---------------------------------------------------------------------------------------------------
# Resolution: a pure function of what is asked and what the machine has


@pytest.mark.parametrize(
    "requested, vllm_installed, cuda, expected",
    [
        ("auto", False, False, "transformers"),
        ("auto", True, False, "transformers"),  # vllm installed on a CPU machine
        ("auto", False, True, "transformers"),  # a GPU without vllm
        ("auto", True, True, "vllm"),
        ("transformers", True, True, "transformers"),
        ("vllm", True, True, "vllm"),
    ],
)
def test_the_engine_resolves_from_the_request_and_the_machine(requested, vllm_installed, cuda, expected):
    assert resolve_engine(requested, vllm_installed, cuda) == expected


@pytest.mark.parametrize(
    "vllm_installed, cuda, says",
    [
        (False, True, ["the vllm package", "pip install vllm"]),
        (True, False, ["a CUDA GPU", "machine with a CUDA GPU"]),
        (False, False, ["the vllm package (not installed here) and a CUDA GPU (torch sees none here)"]),
    ],
)
def test_vllm_required_where_it_cannot_run_is_a_one_line_user_error(vllm_installed, cuda, says):
    with pytest.raises(UserError) as caught:
        resolve_engine("vllm", vllm_installed, cuda)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("evaluation.engine vllm needs ")
    assert "set evaluation.engine to auto" in message and "or transformers" in message
    for words in says:
        assert words in message


def test_this_machine_has_no_vllm_so_auto_means_transformers_and_vllm_stops():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: this test is about a machine without it")
    assert engine_on_this_machine("auto") == "transformers"
    assert engine_on_this_machine("transformers") == "transformers"
    with pytest.raises(UserError, match=r"the vllm package \(not installed here\)"):
        engine_on_this_machine("vllm")


# ---------------------------------------------------------------------------------------------------
# The vLLM glue, with a stand-in for vLLM


class StandInLLM:
    """Stands in for vLLM's LLM class: no GPU here. Records how it was built and what `chat` was given, and answers
    each conversation from ANSWER_TABLE, as vLLM does: one output per conversation, in input order."""

    built: list[dict] = []
    chats: list[dict] = []

    def __init__(self, **kwargs):
        StandInLLM.built.append(kwargs)

    def chat(self, messages, sampling_params=None, use_tqdm=True):
        StandInLLM.chats.append({"messages": messages, "sampling_params": sampling_params, "use_tqdm": use_tqdm})
        outputs = []
        for conversation in messages:
            text, token_ids = ANSWER_TABLE[conversation[-1]["content"]]
            completion = types.SimpleNamespace(text=text, token_ids=token_ids)
            outputs.append(types.SimpleNamespace(outputs=[completion]))  # a RequestOutput's `outputs`
        return outputs


class StandInSamplingParams:
    """Stands in for vLLM's SamplingParams: keeps the keyword arguments it was given."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def stand_in_vllm(monkeypatch):
    """A `vllm` module in sys.modules made of the stand-ins above (with a module spec, as an installed one has)."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = StandInLLM, StandInSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    StandInLLM.built, StandInLLM.chats = [], []
    return StandInLLM


def _ticks():
    """A clock that moves one second each time it is read."""
    counter = itertools.count()
    return lambda: float(next(counter))


def test_the_adapter_hands_vllm_the_conversations_greedy_and_reads_its_outputs_in_order(stand_in_vllm):
    answers, tokens, seconds = answer_with_vllm("/models/student", CONVERSATIONS, 24, clock=_ticks())
    (built,) = stand_in_vllm.built
    assert built == {"model": "/models/student", "seed": 0, "dtype": "auto",
                     "gpu_memory_utilization": VLLM_GPU_MEMORY_SHARE, "enforce_eager": False}  # fmt: skip
    assert 0 < VLLM_GPU_MEMORY_SHARE <= 0.6  # modest: the GPU is not vLLM's alone
    (chat,) = stand_in_vllm.chats
    assert chat["messages"] == CONVERSATIONS and chat["use_tqdm"] is False  # the system message travels too
    assert chat["sampling_params"].kwargs == {"temperature": 0.0, "max_tokens": 24}
    # In input order, stripped as the transformers path strips its answers; every generated token counted.
    assert answers == ["positive", "negative", "positive, clearly"]
    assert tokens == 3 + 2 + 4
    assert seconds == 1.0  # the clock is read just before and after the answering: loading is not timed


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory) -> Path:
    from conftest import separate_tiny_student

    return separate_tiny_student(tmp_path_factory.mktemp("tiny"))


def _settings(engine: str, labels=None) -> dict:
    return {"max_new_tokens": 4, "batch_size": 2, "latency_samples": 2, "threads": 1, "deterministic": True,
            "labels": labels, "engine": engine}  # fmt: skip


def test_measure_model_times_latency_with_transformers_and_answers_the_set_with_vllm(stand_in_vllm, tiny_student):
    from azdistill.evaluation.measure import measure_model

    measured = measure_model(str(tiny_student), CONVERSATIONS, _settings("vllm"), "student")
    assert measured["engine"] == "vllm"
    (built,) = stand_in_vllm.built
    assert built["model"] == str(tiny_student)
    (chat,) = stand_in_vllm.chats
    assert chat["messages"] == CONVERSATIONS and chat["sampling_params"].kwargs["max_tokens"] == 4
    assert measured["answers"] == ["positive", "negative", "positive, clearly"]
    assert measured["generated_tokens"] == 9
    # Latency: the first latency_samples prompts, one at a time, by the transformers model (it generated tokens).
    assert len(measured["latencies_s"]) == 2 and all(1 <= count <= 4 for count in measured["output_tokens"])
    # Parameters and weights from the transformers model, before it was freed for vLLM.
    assert measured["parameters"] > 0 and measured["weights_bytes"] == measured["parameters"] * 4  # float32 on a CPU
    assert measured["peak_memory_bytes"] >= 0


def test_a_teacher_that_scores_the_labels_never_calls_vllm(stand_in_vllm, tiny_student):
    from azdistill.evaluation.measure import measure_model

    measured = measure_model(str(tiny_student), CONVERSATIONS, _settings("vllm", ["positive", "negative"]), "teacher")
    assert stand_in_vllm.built == [] and stand_in_vllm.chats == []
    assert measured["engine"] == "transformers"
    assert set(measured["answers"]) <= {"positive", "negative"} and len(measured["answers"]) == 3


# ---------------------------------------------------------------------------------------------------
# The evaluate stage: the early check, the engine per row, the report, and answers keyed by engine


def _recording_measure(calls: list):
    def measure(path, conversations, settings, runtime, description, labels=None):
        calls.append((description, settings.engine))
        return {"answers": ["positive"] * len(conversations), "latencies_s": [0.1], "throughput_tokens_per_s": 10.0,
                "generated_tokens": 10, "seconds": 1.0, "parameters": 10, "weights_bytes": 40, "peak_memory_bytes": 100,
                "size_on_disk_bytes": 40, "device": "cpu", "engine": "transformers" if labels else settings.engine}

    return measure


def _folders(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    models = {}
    for role in ("teacher", "student", "baseline"):
        (tmp_path / role).mkdir()
        (tmp_path / role / "config.json").write_text(json.dumps({"role": role}))
        models[role] = tmp_path / role
    return models.pop("teacher"), models


def test_the_stage_stops_before_any_model_loads_where_vllm_is_required_and_missing(make_config, tmp_path, monkeypatch):
    from azdistill.stages import evaluate as stage

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: this test is about a machine without it")
    calls: list = []
    monkeypatch.setattr(stage, "measure_in_child", _recording_measure(calls))
    teacher, models = _folders(tmp_path)
    config = load_config(make_config(), ["evaluation.engine=vllm"])
    with pytest.raises(UserError, match="evaluation.engine vllm needs the vllm package"):
        stage.evaluate(config, teacher, models)
    assert calls == []
    assert not (Path(config.stage_dir("evaluate")) / "predictions").exists()  # nothing was begun


def test_the_stage_answers_with_vllm_where_it_resolves_and_keys_those_answers_apart(make_config, tmp_path, monkeypatch):
    """Resolution forced to vllm (no GPU here): the students answer with it, the teacher that scores the labels with
    transformers; the report says so; answers by vLLM are not reused once the engine resolves to transformers."""
    from azdistill.stages import evaluate as stage

    calls: list = []
    monkeypatch.setattr(stage, "measure_in_child", _recording_measure(calls))
    monkeypatch.setattr(stage, "engine_on_this_machine", lambda requested: "vllm")
    teacher, models = _folders(tmp_path)
    config = load_config(make_config(extra="synthesis:\n  min_success_ratio: 0.0\n"))  # nli, a local teacher
    report = stage.evaluate(config, teacher, models)
    assert sorted(calls) == [("baseline", "vllm"), ("student", "vllm"), ("teacher", "transformers")]
    assert {row.role: row.engine for row in report.models} == {"teacher": "transformers", "student": "vllm", "baseline": "vllm"}
    engines_line = "; answers by vLLM (student, baseline) and transformers (teacher), latency timed with transformers"
    assert report.device.endswith(engines_line)
    out_dir = Path(config.stage_dir("evaluate"))
    rows = {row["role"]: row for row in json.loads((out_dir / "report.json").read_text())["models"]}
    assert rows["student"]["engine"] == "vllm"
    assert "answers by vLLM" in (out_dir / "report.md").read_text()

    calls.clear()
    monkeypatch.setattr(stage, "engine_on_this_machine", lambda requested: "transformers")
    report = stage.evaluate(config, teacher, models)
    # The students answer again with transformers; the teacher's saved answers (transformers either way) are reused.
    assert sorted(calls) == [("baseline", "transformers"), ("student", "transformers")]
    assert report.device.endswith("; answers by transformers")


def test_reports_written_before_the_engine_was_recorded_still_load():
    from azdistill.evaluation.report import report_from_dict

    row = {"role": "student", "name": "s", "path": "p", "parameters": 1, "size_on_disk_mb": 1.0, "weights_memory_mb": 1.0,
           "peak_memory_mb": 1.0, "latency_p50_s": 0.1, "latency_p95_s": 0.2, "throughput_tokens_per_s": 5.0, "n": 3}  # fmt: skip
    report = report_from_dict({"pipeline": "p", "task": "nli", "data_version": "v1", "created": "2025-05-01", "primary_metric":
                               "agreement", "models": [row], "promote": False, "device": "cpu"})  # fmt: skip
    assert report.models[0].engine is None
    again = report_from_dict({"pipeline": "p", "task": "nli", "data_version": "v1", "created": "2025-05-01", "primary_metric":
                              "agreement", "models": [{**row, "engine": "vllm"}], "promote": False, "device": "cpu"})  # fmt: skip
    assert again.models[0].engine == "vllm"


# ---------------------------------------------------------------------------------------------------
# The config key


def test_the_engine_key_defaults_to_auto_and_refuses_other_values(make_config):
    path = make_config()
    assert load_config(path).evaluation.engine == "auto"
    assert load_config(path, ["evaluation.engine=vllm"]).evaluation.engine == "vllm"
    with pytest.raises(UserError) as caught:
        load_config(path, ["evaluation.engine=tensorrt"])
    message = str(caught.value)
    assert "\n" not in message and "evaluation.engine" in message
    assert all(value in message for value in ("auto", "transformers", "vllm"))


def test_a_local_run_refuses_vllm_it_cannot_use_before_its_first_stage(make_config, tmp_path, monkeypatch):
    """`azdistill run` with evaluation.engine vllm on a machine without it stops before synthesis and training, not
    at evaluate after them."""
    from azdistill.stages import run as pipeline

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: this test is about a machine without it")
    config = load_config(make_config(), ["evaluation.engine=vllm"])
    monkeypatch.setattr(pipeline, "prepare_models", lambda config: pytest.fail("a model was prepared"))
    with pytest.raises(UserError, match="evaluation.engine vllm needs"):
        pipeline.run_local(config)
    assert not Path(config.stage_dir("synthesize")).exists()
