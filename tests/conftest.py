"""Shared fixtures: small valid datasets and configs written into a temporary folder.

One fixture is autouse: `no_network` fails any test that opens a non-loopback connection. The others only affect
the tests that ask for them.

- `write_dataset(task=..., folder=...)` writes valid train/validation/test JSONL splits for a task type.
- `write_lines(name, lines)` writes a JSONL file line by line (dicts are JSON-encoded, strings written as is),
  for building deliberately broken data.
- `make_config(task=..., extra=...)` writes a minimal valid config (plus its data, paths relative to the
  config's folder, `workdir` inside tmp_path, tracking off) and returns the config's path.
- `minimal_config` is `make_config()` for the task type in `request.param` (use
  `@pytest.mark.parametrize("minimal_config", TASK_TYPES, indirect=True)`), nli by default.
- `line_of(path, text)` is the 1-based line of the first line of a file containing `text`.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import pytest

SPLITS = ("train", "validation", "test")
DEFAULT_COUNTS = {"train": 4, "validation": 2, "test": 3}
NLI_LABELS = ("positive", "negative")

# One (system, user, answer) per task type; multi-turn tasks get a two-turn record too.
_SINGLE_TURN = {
    "nli": (
        "Classify the sentiment of the review as positive or negative. Answer with the label only.",
        ["A delightful film, I loved it.", "Dull and far too long.", "Great acting.", "A waste of time."],
        ["positive", "negative", "positive", "negative"],
    ),
    "qa": (
        "Answer the question briefly.",
        ["What is the capital of France?", "Who wrote Hamlet?", "What colour is the sky?", "How many legs has a cat?"],
        ["Paris", "William Shakespeare", "Blue", "Four"],
    ),
    "math": (
        "Solve the problem. End with the final number.",
        ["What is 2 + 2?", "What is 3 * 5?", "What is 10 - 7?", "What is 12 / 4?"],
        ["4", "15", "3", "3"],
    ),
    "summarization": (
        "Summarise the text in one sentence.",
        [
            "The council met on Monday and agreed to repair the bridge before winter.",
            "Rain is expected all week, with storms on Thursday.",
            "The library will open on Sundays from next month.",
            "A new bus line links the station with the hospital.",
        ],
        ["The bridge will be repaired.", "A rainy week.", "Sunday opening.", "New bus line."],
    ),
    "conversation": (
        "You are a helpful assistant.",
        ["Hello!", "Can you recommend a book?", "What is a good name for a cat?", "Tell me a fact."],
        ["Hi! How can I help?", "Try 'Dune'.", "Whiskers.", "Octopuses have three hearts."],
    ),
}
_SINGLE_TURN["chat"] = _SINGLE_TURN["conversation"]
MULTI_TURN_TASKS = ("conversation", "chat")


def record(task: str, index: int, reference: bool = True) -> dict:
    """A valid `{"messages": [...]}` row for `task`; multi-turn tasks get two turns on odd indexes."""
    system, prompts, answers = _SINGLE_TURN[task]
    i = index % len(prompts)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompts[i]}]
    if task in MULTI_TURN_TASKS and index % 2 == 1:
        messages += [{"role": "assistant", "content": answers[i]}, {"role": "user", "content": "Thanks, and another?"}]
        if reference:
            messages.append({"role": "assistant", "content": "Of course: " + answers[(i + 1) % len(answers)]})
    elif reference:
        messages.append({"role": "assistant", "content": answers[i]})
    return {"messages": messages}


def records(task: str, count: int, reference: bool = True) -> list[dict]:
    return [record(task, index, reference) for index in range(count)]


def _dump_lines(path: Path, lines: Iterable[Union[dict, list, str]], newline_at_end: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + ("\n" if newline_at_end and text else ""), encoding="utf-8")
    return path


@pytest.fixture
def write_lines(tmp_path: Path) -> Callable[..., Path]:
    """`write_lines("bad.jsonl", [row_dict, "{not json", ...])` -> path (relative names go under tmp_path)."""

    def write(name: Union[str, Path], lines: Iterable[Union[dict, list, str]], newline_at_end: bool = True) -> Path:
        path = Path(name)
        if not path.is_absolute():
            path = tmp_path / path
        return _dump_lines(path, lines, newline_at_end)

    return write


@pytest.fixture
def write_dataset(tmp_path: Path) -> Callable[..., dict[str, Path]]:
    """Write valid JSONL splits for a task; returns {split: path}.

    `counts` maps split -> number of records (default train 4, validation 2, test 3); `references` maps
    split -> whether records end with a reference assistant answer (default: all do).
    """

    def write(
        task: str = "nli",
        folder: Optional[Path] = None,
        counts: Optional[dict[str, int]] = None,
        references: Optional[dict[str, bool]] = None,
    ) -> dict[str, Path]:
        folder = Path(folder) if folder is not None else tmp_path / "data"
        counts = {**DEFAULT_COUNTS, **(counts or {})}
        references = {split: True for split in SPLITS} | (references or {})
        return {
            split: _dump_lines(folder / f"{split}.jsonl", records(task, counts[split], references[split]))
            for split in SPLITS
        }

    return write


def config_text(task: str = "nli", name: str = "unit-test", workdir: Optional[Path] = None, extra: str = "") -> str:
    """A minimal valid config; data paths are relative (data/<split>.jsonl beside the config)."""
    labels = f"  labels: [{', '.join(NLI_LABELS)}]\n" if task == "nli" else ""
    text = (
        f"name: {name}\n"
        + (f"workdir: {json.dumps(str(workdir))}\n" if workdir is not None else "")
        + "task:\n"
        + f"  type: {task}\n"
        + labels
        + "data:\n"
        + "  train: data/train.jsonl\n"
        + "  validation: data/validation.jsonl\n"
        + "  test: data/test.jsonl\n"
        + "tracking:\n"
        + "  enabled: false\n"
    )
    if extra:
        text += textwrap.dedent(extra).strip("\n") + "\n"
    return text


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The `workdir` every config from `make_config` uses (not created in advance)."""
    return tmp_path / "work"


@pytest.fixture
def make_config(tmp_path: Path, write_dataset, workdir: Path) -> Callable[..., Path]:
    """Write `<tmp>/project/distill.yaml` and its data under `<tmp>/project/data/`; returns the config path.

    `extra` is YAML appended at the end (new top-level sections only: a repeated section would replace the
    one above). `data=False` writes no data files.
    """

    def make(
        task: str = "nli",
        extra: str = "",
        name: str = "unit-test",
        data: bool = True,
        counts: Optional[dict[str, int]] = None,
        references: Optional[dict[str, bool]] = None,
        folder: str = "project",
    ) -> Path:
        project = tmp_path / folder
        project.mkdir(parents=True, exist_ok=True)
        if data:
            write_dataset(task, project / "data", counts, references)
        path = project / "distill.yaml"
        path.write_text(config_text(task, name, workdir, extra), encoding="utf-8")
        return path

    return make


@pytest.fixture
def minimal_config(request, make_config) -> Path:
    """A valid config + data for `request.param` (a task type; nli when not parametrized)."""
    return make_config(getattr(request, "param", "nli"))


@pytest.fixture
def no_tracking_left_behind():
    """For tests that track through MLflow's fluent API in this process: no run left open, no tracking URI left set."""
    yield
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def separate_tiny_student(folder: Path) -> Path:
    """A small student that is its own model folder (not pruned from the teacher): a 2-layer Llama built from a
    config, with the built-in teacher's tokenizer and chat template, saved into `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from azdistill.models.builtin import builtin_teacher_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_teacher_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama(tokenizer, seed: int = 0):
    """A tiny random 2-layer Llama with the given tokenizer's vocabulary (not saved): its outputs differ from prompt
    to prompt, unlike a model whose weights are set by hand."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def no_cache_model(inner):
    """`inner` wrapped as a causal LM that ignores the attention cache it is given, as some remote-code models do;
    `.cached_calls` counts the calls that were given one."""
    import torch

    class NoCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.device, self.cached_calls = inner, inner.config, inner.device, 0

        def forward(self, input_ids, attention_mask=None, past_key_values=None, position_ids=None, use_cache=None, logits_to_keep=0):
            self.cached_calls += past_key_values is not None
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=logits_to_keep)

    return NoCache()


def stand_in_model_folders(tmp_path: Path, roles: Iterable[str] = ("student", "baseline")) -> dict[str, Path]:
    """A folder per role, each only a `config.json` naming it: the models of an evaluate stage whose
    `measure_in_child` is faked (the folders are never loaded)."""
    models = {}
    for role in roles:
        folder = tmp_path / role
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"role": role}))
        models[role] = folder
    return models


def line_of(path: Path, text: str) -> int:
    """1-based number of the first line of `path` containing `text`."""
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not found in {path}")


@pytest.fixture(name="line_of")
def line_of_fixture() -> Callable[[Path, str], int]:
    return line_of


# ---------------------------------------------------------------------------------------------------
# No test reaches the network: a socket connection to anything but loopback (or a local Unix socket) fails the
# test at once, instead of hanging on DNS or reaching a real service. Azure ML tests fake HTTP with `responses`,
# which never opens a socket.

import ipaddress
import socket

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


class NetworkBlocked(AssertionError):
    pass


def _check_address(sock: socket.socket, address) -> None:
    if sock.family == getattr(socket, "AF_UNIX", None):
        return
    host = address[0] if isinstance(address, tuple) else address
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost":
            return
    raise NetworkBlocked(f"a test tried to reach the network ({host}); fake it (responses) or use loopback")


def _guarded_connect(self, address):
    _check_address(self, address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check_address(self, address)
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a non-loopback connection."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
