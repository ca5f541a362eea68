"""Nothing lost, nothing trusted blindly: stage folders that never destroy a user's files, outputs verified before
they are reused, checkpoints a kill cut short skipped, one run per workdir, the preflight answer kept, and
evaluation answers reused while what they depend on is unchanged."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from azdistill.cli import cli
from azdistill.config.loading import load_config

HOSTED = """
teacher:
  kind: openai-compatible
  endpoint: {url}/v1
  model: big-teacher
  auth: {{method: {auth}}}
  max_retries: 0
student:
  model: unused-student
synthesis:
  min_success_ratio: 0.0
"""


def _invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def _one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def server():
    from fake_teacher_server import FakeTeacherServer

    def label(messages: list[dict]) -> str:  # a different valid answer per prompt (duplicates would be rejected)
        return "positive" if len(messages[-1]["content"]) % 2 else "negative"

    with FakeTeacherServer(api_key="right-key", answer=label) as running:
        yield running


@pytest.fixture
def hosted(make_config, server, monkeypatch):
    monkeypatch.setenv("AZDISTILL_TEACHER_KEY", "right-key")
    return make_config(extra=HOSTED.format(url=server.url, auth="api_key_env"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ---------------------------------------------------------------------------------------------------
# Output folders are never destroyed


@pytest.mark.parametrize("command", ["synthesize", "finetune"])
def test_a_folder_of_the_users_files_is_refused_and_kept(hosted, tmp_path, command):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("three years of work")
    (precious / "notes").mkdir()
    (precious / "notes" / "a.txt").write_text("a")
    before = _snapshot(precious)
    args = [command, hosted, "--output-dir", precious]
    if command == "finetune":
        assert _invoke("synthesize", hosted).exit_code == 0
    _one_line_error(_invoke(*args), str(precious), "azdistill did not write", "thesis.tex")
    assert _snapshot(precious) == before


def test_the_current_folder_as_output_dir_deletes_nothing(hosted, monkeypatch):
    project = hosted.parent
    before = _snapshot(project)
    monkeypatch.chdir(project)
    _one_line_error(_invoke("synthesize", hosted, "--output-dir", "."), "distill.yaml")
    assert _snapshot(project) == before


def test_another_stages_folder_is_refused(hosted, tmp_path):
    out = tmp_path / "synthetic"
    assert _invoke("synthesize", hosted, "--output-dir", out).exit_code == 0
    _one_line_error(_invoke("finetune", hosted, "--synthetic-dir", out, "--output-dir", out), "outputs of the synthesize stage")


def test_a_rerun_removes_only_the_stages_own_files(hosted, tmp_path):
    out = tmp_path / "synthetic"
    assert _invoke("synthesize", hosted, "--output-dir", out).exit_code == 0
    (out / "my-notes.md").write_text("kept")
    assert _invoke("synthesize", hosted, "--output-dir", out, "--force").exit_code == 0
    assert (out / "my-notes.md").read_text() == "kept" and (out / "stage.json").is_file()


def test_force_with_a_wrong_key_keeps_the_previous_good_outputs(hosted, monkeypatch):
    assert _invoke("synthesize", hosted).exit_code == 0
    out = load_config(hosted).stage_dir("synthesize")
    before = _snapshot(out)
    monkeypatch.setenv("AZDISTILL_TEACHER_KEY", "wrong-key")
    result = _invoke("synthesize", hosted, "--force")
    assert result.exit_code == 2 and "refused the credential" in result.output
    assert _snapshot(out) == before


# ---------------------------------------------------------------------------------------------------
# Outputs verified before reuse


def test_a_truncated_synthetic_set_is_named_not_trained_on(hosted):
    assert _invoke("synthesize", hosted).exit_code == 0
    train = load_config(hosted).stage_dir("synthesize") / "train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines[:-1]))
    _one_line_error(_invoke("finetune", hosted), str(train), "not the", "synthesize --force")
    # Reused by the stage itself too: the rerun names the file instead of skipping over it.
    _one_line_error(_invoke("synthesize", hosted), str(train))


def test_a_corrupt_stage_record_is_one_line(hosted):
    assert _invoke("synthesize", hosted).exit_code == 0
    record = load_config(hosted).stage_dir("synthesize") / "stage.json"
    record.write_text('{"fingerprint": "abc", "outp')
    _one_line_error(_invoke("synthesize", hosted), str(record), "unreadable", "--force")
    assert _invoke("synthesize", hosted, "--force").exit_code == 0  # --force redoes it


def test_a_deleted_model_file_is_named_before_any_model_is_loaded(tmp_path):
    from azdistill.stages import state

    stage = tmp_path / "finetune"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "model.safetensors").write_bytes(b"x" * 100)
    (stage / "model" / "config.json").write_text("{}")
    (stage / "training.json").write_text("{}")
    state.finish(stage, "fp", ["model", "training.json"], {}, stage="finetune")
    assert state.is_done(stage, "fp", "finetune")
    (stage / "model" / "model.safetensors").unlink()
    with pytest.raises(Exception, match=r"model.safetensors is missing, though the finetune stage wrote it; run `azdistill finetune --force`"):
        state.is_done(stage, "fp", "finetune")


def test_evaluate_names_a_student_whose_weights_were_deleted(make_config, tmp_path):
    from azdistill.stages import state

    config = make_config()
    stage = load_config(config).stage_dir("finetune")
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "model.safetensors").write_bytes(b"x" * 100)
    (stage / "training.json").write_text("{}")
    state.finish(stage, "fp", ["model", "training.json"], {}, stage="finetune")
    (stage / "model" / "model.safetensors").write_bytes(b"x" * 10)
    _one_line_error(_invoke("evaluate", config), "model.safetensors has 10 bytes, not the 100")


# ---------------------------------------------------------------------------------------------------
# Resume after a kill during a checkpoint save


def test_a_checkpoint_cut_short_by_a_kill_is_skipped_and_training_resumes_from_the_one_before(tmp_path, caplog):
    import torch
    from test_finetune import InterruptAtStep, conversations, tiny_model

    from azdistill.config.sections import TrainingConfig
    from azdistill.models.builtin import builtin_teacher_path
    from azdistill.models.loading import load_tokenizer
    from azdistill.training.loop import train_student

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(builtin_teacher_path())
    student = tiny_model(tokenizer, tmp_path / "student")
    settings = TrainingConfig(learning_rate=5e-3, batch_size=4, epochs=2, logging_steps=1, save_steps=3)
    with pytest.raises(KeyboardInterrupt):
        train_student(conversations(16), [], student, tmp_path / "out", settings, tracker=InterruptAtStep(5))
    checkpoints = tmp_path / "out" / "checkpoints"
    # A SIGKILL while checkpoint-6 was being written: its weights are there, its optimizer and state are not.
    torn = checkpoints / "checkpoint-6"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes((checkpoints / "checkpoint-3" / "model.safetensors").read_bytes()[:1000])
    with caplog.at_level(logging.INFO, logger="azdistill"):
        summary = train_student(conversations(16), [], student, tmp_path / "out", settings, resume=True)
    assert "checkpoint-6 was cut short" in caplog.text and "resuming from" in caplog.text and "checkpoint-3" in caplog.text
    assert summary["steps"] == 8


# ---------------------------------------------------------------------------------------------------
# One run per workdir


def test_a_second_command_on_a_busy_workdir_is_refused_naming_the_first(hosted):
    from azdistill.stages.state import workdir_lock

    config = load_config(hosted)
    with workdir_lock(config.workdir):
        line = _one_line_error(_invoke("synthesize", hosted), "another azdistill is using the workdir", f"pid {os.getpid()}")
    assert "--set workdir=" in line
    assert not config.stage_dir("synthesize").exists()  # refused before anything was written
    assert _invoke("synthesize", hosted).exit_code == 0  # free again once the first is done


def test_two_processes_cannot_hold_one_workdir(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from azdistill.stages.state import workdir_lock\n"
         f"with workdir_lock({str(tmp_path / 'work')!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        from azdistill.errors import UserError
        from azdistill.stages.state import workdir_lock

        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            with workdir_lock(tmp_path / "work"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock(tmp_path / "work"):  # a killed holder frees it: the system drops its lock
        pass


# ---------------------------------------------------------------------------------------------------
# The preflight's paid-for answer is kept; a continuing run asks no sample


def test_the_preflight_sample_is_not_asked_twice(hosted, server):
    assert _invoke("synthesize", hosted).exit_code == 0
    assert sum(server.per_prompt.values()) == 4 + 2  # one request per record: the preflight's answer was used
    stats = json.loads((load_config(hosted).stage_dir("synthesize") / "stats.json").read_text())
    assert stats["splits"]["train"]["accepted"] == 4


def test_a_continuing_run_makes_no_sample_call(hosted, server, caplog):
    assert _invoke("synthesize", hosted).exit_code == 0
    out = load_config(hosted).stage_dir("synthesize")
    # As if killed during the validation split: its journal is gone, the train split's is complete.
    fingerprint = json.loads((out / "stage.json").read_text())["fingerprint"]
    (out / "stage.json").unlink()
    (out / "inprogress.json").write_text(json.dumps({"stage": "synthesize", "fingerprint": fingerprint}))
    (out / "validation.journal.jsonl").unlink()
    asked = sum(server.per_prompt.values())
    with caplog.at_level(logging.INFO, logger="azdistill"):
        result = _invoke("synthesize", hosted)
    assert result.exit_code == 0, result.output
    assert "sample call: none (the run continues from 4 answered records)" in caplog.text
    assert sum(server.per_prompt.values()) - asked == 2  # the two validation records, and no sample


# ---------------------------------------------------------------------------------------------------
# Evaluation answers are reused while the model, the data and the answer settings are the same


def test_evaluation_reuses_answers_after_a_threshold_or_price_change(make_config, tmp_path, monkeypatch):
    from azdistill.stages import evaluate as stage

    calls: list[str] = []

    def fake_measure(path, conversations, settings, runtime, description, labels=None):
        calls.append(description)
        return {"answers": ["positive"] * len(conversations), "latencies_s": [0.1], "throughput_tokens_per_s": 10.0,
                "generated_tokens": 10, "seconds": 1.0, "parameters": 10, "weights_bytes": 40, "peak_memory_bytes": 100,
                "size_on_disk_bytes": 40, "device": "cpu"}

    monkeypatch.setattr(stage, "measure_in_child", fake_measure)
    models = {}
    for role in ("teacher", "student", "baseline", "reference_sft"):
        folder = tmp_path / role
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"role": role}))
        models[role] = folder
    config_path = make_config()
    teacher, reference = models.pop("teacher"), models.pop("reference_sft")
    stage.evaluate(load_config(config_path), teacher, models)
    assert sorted(calls) == ["baseline", "student", "teacher"]
    # A model added, a threshold and a price changed: only the new model answers.
    changed = ["evaluation.promotion.min_agreement=0.5", "evaluation.serving_price_per_hour=1.0"]
    stage.evaluate(load_config(config_path, changed), teacher, {**models, "reference_sft": reference})
    assert sorted(calls) == ["baseline", "reference_sft", "student", "teacher"]
    report = json.loads((load_config(config_path).stage_dir("evaluate") / "report.json").read_text())
    assert report["models"][1]["cost_per_1k_answers"] is not None and report["checks"][0]["threshold"] == 0.5
    stage.evaluate(load_config(config_path, [*changed, "evaluation.max_new_tokens=8"]), teacher, models)
    assert len(calls) == 4 + 3  # the answers depend on max_new_tokens: every model again


def test_an_over_long_prompt_is_rejected_with_its_reason_and_never_sent(make_config, server, monkeypatch):
    monkeypatch.setenv("AZDISTILL_TEACHER_KEY", "right-key")
    config = make_config(extra=HOSTED.format(url=server.url, auth="api_key_env") + "  preflight: false\n")
    train = config.parent / "data" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[1]["messages"][1]["content"] = "Review: " + "long " * 40_000  # 200,008 characters, and the system message
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert _invoke("synthesize", config).exit_code == 0
    assert all(len(prompt) < 1000 for prompt in server.per_prompt)  # never sent
    rejected = [json.loads(line) for line in (load_config(config).stage_dir("synthesize") / "rejected.jsonl").read_text().splitlines()]
    assert [row["reason"] for row in rejected if "max_prompt_chars" in row["reason"]] == [
        "the prompt has 200,097 characters, more than data.max_prompt_chars (100,000); shorten the record or raise data.max_prompt_chars"
    ]


def test_a_folder_left_by_a_kill_while_its_first_marker_was_written_is_the_stages_own(tmp_path):
    """Killed inside the atomic write of a stage's first marker, a folder holds only that marker's temporary file (seen
    in tests/test_kill_resume.py): the rerun takes the folder as its own and clears the leftover; a user's file next
    to it is still refused."""
    from azdistill.errors import UserError
    from azdistill.stages import state

    folder = tmp_path / "finetune"
    folder.mkdir()
    (folder / ".inprogress.json.4ixp4qph.tmp").write_text('{"stage": "fine')
    assert state.begin(folder, "fingerprint", stage="finetune") is False
    assert sorted(path.name for path in folder.iterdir()) == ["inprogress.json"]

    other = tmp_path / "other"
    other.mkdir()
    (other / ".inprogress.json.x.tmp").write_text("")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        state.begin(other, "fingerprint", stage="finetune")
    assert (other / "notes.txt").read_text() == "mine"
