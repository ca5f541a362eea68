"""Finetune: assistant-only labels, the distillation loss against a hand computation, and real tiny training runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from azdistill.config import TrainingConfig
from azdistill.errors import UserError
from azdistill.models import builtin_teacher_path, kept_layer_indices, load_tokenizer, prune_layers
from azdistill.stages.finetune import (
    IGNORE_INDEX,
    build_example,
    check_same_vocabulary,
    distillation_kl,
    pad_batch,
    train_student,
)

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Is the sky blue?"},
    {"role": "assistant", "content": "Yes, it is."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def tokenizer():
    # The real teacher's tokenizer and chat template (converted once into the cache).
    return load_tokenizer(builtin_teacher_path())


def tiny_model(tokenizer, folder: Path, layers: int = 2, seed: int = 0) -> Path:
    """A llama-architecture model small enough to train in seconds, sharing the teacher's tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_labels_cover_exactly_the_assistant_answers(tokenizer):
    example = build_example(tokenizer, CONVERSATION, max_length=256)
    learned = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Yes, it is.<|im_end|>\nGreen.<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example["input_ids"], example["labels"]))


def test_truncation_that_leaves_no_answer_drops_the_example(tokenizer):
    assert build_example(tokenizer, CONVERSATION, max_length=8) is None


def test_pad_batch_masks_padding():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_distillation_kl_matches_a_hand_computation():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1]])  # positions 1 and 2 predict answer tokens
    temperature = 2.0
    expected = 0.0
    for position in (1, 2):
        p = torch.softmax(teacher[0, position] / temperature, -1)
        q = torch.softmax(student[0, position] / temperature, -1)
        expected += float((p * (p.log() - q.log())).sum())
    expected = expected / 2 * temperature**2
    assert float(distillation_kl(student, teacher, labels, temperature)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_kl(teacher, teacher, labels, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_different_vocabularies_are_refused_for_token_level_distillation(tokenizer):
    class Other:
        def get_vocab(self):
            return {"a": 0}

        def __len__(self):
            return 1

    with pytest.raises(UserError, match="share a vocabulary"):
        check_same_vocabulary(tokenizer, Other())


def test_pruning_keeps_evenly_spaced_layers_and_renumbers_them(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    assert kept_layer_indices(30, 0.34) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert kept_layer_indices(4, 0.01) == [0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model(tokenizer, tmp_path / "m", layers=6))
    assert prune_layers(model, 0.5) == [0, 2, 5]
    assert model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)  # the KV cache still lines up


def conversations(count: int) -> list[list[dict]]:
    return [
        [
            {"role": "system", "content": "Classify."},
            {"role": "user", "content": f"Review {index}: {'great' if index % 2 else 'awful'}"},
            {"role": "assistant", "content": "positive" if index % 2 else "negative"},
        ]
        for index in range(count)
    ]


@pytest.mark.parametrize("kd_weight", [0.0, 0.5])
def test_training_changes_every_parameter_and_lowers_the_loss(tokenizer, tmp_path, kd_weight):
    student = tiny_model(tokenizer, tmp_path / "student", seed=1)
    teacher = tiny_model(tokenizer, tmp_path / "teacher", seed=2)
    settings = TrainingConfig(learning_rate=5e-3, batch_size=4, epochs=4, logging_steps=1, kd_weight=kd_weight, save_steps=100)
    summary = train_student(conversations(16), conversations(4), student, tmp_path / "out", settings, teacher_path=teacher)

    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(student)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    unchanged = [
        name for (name, old), (_, new) in zip(before.named_parameters(), after.named_parameters()) if torch.equal(old, new)
    ]
    assert unchanged == []
    assert summary["steps"] == 16
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["final_eval_loss"] is not None
    assert json.loads((tmp_path / "out" / "training.json").read_text())["kd_weight"] == kd_weight
    assert not (tmp_path / "out" / "checkpoints").exists()


class InterruptAtStep:
    """A tracker that interrupts training when a given step is logged, as Ctrl-C or a kill would."""

    def __init__(self, step: int):
        self.step = step

    def log_metrics(self, metrics, step=None):
        if step == self.step:
            raise KeyboardInterrupt


def test_interrupted_training_resumes_from_its_last_checkpoint(tokenizer, tmp_path, caplog):
    student = tiny_model(tokenizer, tmp_path / "student")
    settings = TrainingConfig(learning_rate=5e-3, batch_size=4, epochs=2, logging_steps=1, save_steps=3)
    with pytest.raises(KeyboardInterrupt):
        train_student(conversations(16), [], student, tmp_path / "out", settings, tracker=InterruptAtStep(5))
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-3").is_dir()

    with caplog.at_level(logging.INFO, logger="azdistill"):
        summary = train_student(conversations(16), [], student, tmp_path / "out", settings, resume=True)
    assert "resuming from" in caplog.text and "checkpoint-3" in caplog.text
    assert summary["steps"] == 8
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_pruned_student_is_rebuilt_when_the_share_of_layers_changes(tokenizer, tmp_path):
    import json as json_module

    from azdistill.models import make_pruned_student

    teacher = tiny_model(tokenizer, tmp_path / "teacher", layers=6)
    target = tmp_path / "student-init"
    make_pruned_student(teacher, 0.5, target)
    assert json_module.loads((target / "config.json").read_text())["num_hidden_layers"] == 3
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    make_pruned_student(teacher, 0.5, target)
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime  # same settings: reused
    make_pruned_student(teacher, 0.34, target)
    assert json_module.loads((target / "config.json").read_text())["num_hidden_layers"] == 2


def test_a_retrained_model_never_passes_for_the_old_one(tokenizer, tmp_path):
    from azdistill.stages.state import folder_digest

    folder = tiny_model(tokenizer, tmp_path / "m", seed=1)
    first = folder_digest(folder)
    assert folder_digest(folder) == first
    tiny_model(tokenizer, folder, seed=2)  # same architecture and file sizes, new weights
    assert folder_digest(folder) != first
