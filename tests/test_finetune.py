"""Finetune: assistant-only labels, top-k alignment, packing, and real tiny training runs with every loss."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from azdistill.config.sections import TrainingConfig
from azdistill.errors import UserError
from azdistill.models.builtin import builtin_teacher_path
from azdistill.models.loading import load_tokenizer
from azdistill.models.students import kept_layer_indices, make_pruned_student, prune_layers
from azdistill.training.examples import IGNORE_INDEX, align_topk, build_example, load_teacher_topk, pack_batch, pad_batch
from azdistill.training.loop import train_student
from azdistill.training.trainer import answer_forward, check_same_vocabulary, predicting_positions, teacher_layer_map

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Is the sky blue?"},
    {"role": "assistant", "content": "Yes, it is."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models spend more time synchronising torch's threads than computing, worst on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    # The real teacher's tokenizer and chat template (converted once into the cache).
    return load_tokenizer(builtin_teacher_path())


def tiny_model(tokenizer, folder: Path, layers: int = 2, seed: int = 0, init_range: float = 0.02) -> Path:
    """A llama-architecture model small enough to train in seconds, sharing the teacher's tokenizer.

    A larger `init_range` gives peaked next-token distributions, as a trained teacher has (the default gives
    nearly uniform ones, which leave a distillation loss next to nothing to teach).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=init_range,
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


def test_kl_on_the_positions_that_predict_answer_tokens_matches_a_hand_computation():
    from azdistill.training.losses import logit_divergence

    torch.manual_seed(0)
    student, teacher = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1]])  # positions 1 and 2 predict answer tokens
    predict = predicting_positions(labels)
    assert predict.tolist() == [[False, True, True, False]]
    temperature = 2.0
    expected = 0.0
    for position in (1, 2):
        p = torch.softmax(teacher[0, position] / temperature, -1)
        q = torch.softmax(student[0, position] / temperature, -1)
        expected += float((p * (p.log() - q.log())).sum())
    expected = expected / 2 * temperature**2
    assert float(logit_divergence(student[predict], teacher[predict], "forward_kl", temperature)) == pytest.approx(expected, rel=1e-5)


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


def topk_sidecar(tokenizer, teacher_path: Path, conversations_: list[list[dict]], k: int = 5) -> list[dict]:
    """What synthesize writes for a hosted teacher (`<split>.logprobs.jsonl`), made here from a local teacher's
    logits: per answer token its text, log-probability and the top-k candidates as text."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    rows = []
    for row, messages in enumerate(conversations_):
        example = build_example(tokenizer, messages, 256)
        answer = messages[-1]["content"]
        with torch.no_grad():
            logprobs = torch.log_softmax(teacher(torch.tensor([example["input_ids"]])).logits[0], -1)
        first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        content, text = [], ""
        for position in range(first, len(example["input_ids"])):
            if len(text) >= len(answer):
                break
            token = example["input_ids"][position]
            values, ids = logprobs[position - 1].topk(k)
            content.append({
                "token": tokenizer.decode([token]),
                "logprob": float(logprobs[position - 1, token]),
                "top_logprobs": [{"token": tokenizer.decode([i]), "logprob": float(v)} for v, i in zip(values.tolist(), ids.tolist())],
            })
            text += content[-1]["token"]
        rows.append({"row": row, "index": row, "line": row + 1, "turns": [{"turn": 1, "text": answer, "content": content}]})
    return rows


LOSS_SETUPS = {
    "sft": ({"batching": "padded"}, "sft"),
    "kd_forward_kl": ({"kd_weight": 0.5}, "kd"),
    "kd_reverse_kl": ({"kd_weight": 0.5, "kd_loss": "reverse_kl"}, "kd"),
    "kd_jsd": ({"kd_weight": 1.0, "kd_loss": "jsd", "kd_beta": 0.3}, "kd"),
    "topk": ({"topk_weight": 0.5}, "topk"),
    # Alone: at this learning rate the SFT pull moves the layers away from the teacher's faster than matching pulls back.
    "hidden": ({"hidden_weight": 1.0, "sft_weight": 0.0}, "hidden"),
    "on_policy": ({"kd_weight": 0.5, "on_policy_ratio": 0.5, "on_policy_max_new_tokens": 3}, None),
    "lora": ({"method": "lora", "kd_weight": 0.5, "lora": {"r": 4, "alpha": 8}}, "kd"),
    "packed": ({"batching": "packed", "kd_weight": 0.5, "hidden_weight": 1.0, "sft_weight": 0.0}, "kd"),
    "frozen_embeddings": ({"freeze_embeddings": True, "topk_weight": 0.5}, "topk"),
}


@pytest.mark.parametrize("setup", list(LOSS_SETUPS))
def test_training_with_each_loss_changes_the_parameters_and_lowers_the_loss(tokenizer, tmp_path, setup):
    from transformers import AutoModelForCausalLM

    options, component = LOSS_SETUPS[setup]
    teacher = tiny_model(tokenizer, tmp_path / "teacher", layers=4, seed=2, init_range=0.3)
    # Hidden-state matching needs a student pruned from the teacher; the others start from an unrelated model.
    student = make_pruned_student(teacher, 0.5, tmp_path / "student") if "hidden_weight" in options else tiny_model(tokenizer, tmp_path / "student", seed=1)
    train, validation = conversations(8), conversations(2)
    topk = {}
    if "topk_weight" in options:
        topk = {"train_topk": [row["turns"] for row in topk_sidecar(tokenizer, teacher, train)]}
    settings = TrainingConfig(learning_rate=5e-3, batch_size=4, epochs=4, logging_steps=1, save_steps=100, **options)
    summary = train_student(train, validation, student, tmp_path / "out", settings, teacher_path=teacher, **topk)

    assert summary["steps"] == 8
    # Every trained tensor moved, but for the final norm when only hidden states are matched: it comes after them.
    untouched = {"model.norm.weight"} if setup == "hidden" else set()
    frozen = {"model.embed_tokens.weight"} if setup == "frozen_embeddings" else set()  # (the tied head is that tensor)
    assert summary["parameters_changed"] == summary["trainable_tensors"] - len(untouched) > 0
    if frozen:
        embedding = AutoModelForCausalLM.from_pretrained(student).get_input_embeddings().weight.numel()
        assert summary["trainable_parameters"] == summary["parameters"] - embedding
    assert summary["final_loss"] < summary["first_loss"]
    if component:
        assert summary[f"final_loss_{component}"] < summary[f"first_loss_{component}"]
    assert summary["final_eval_loss"] is not None
    before = AutoModelForCausalLM.from_pretrained(student)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")  # what evaluate loads: merged weights
    changed = {name for (name, old), (_, new) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(old, new)}
    if setup == "lora":
        assert summary["trainable_parameters"] < summary["parameters"] / 10
        assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" not in changed
        from peft import PeftModel

        # The saved adapter on the original weights answers exactly as the merged model does.
        adapted = PeftModel.from_pretrained(before, tmp_path / "out" / "adapter").eval()
        ids = torch.tensor([build_example(tokenizer, CONVERSATION, 256)["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(adapted(ids).logits, after.eval()(ids).logits, atol=1e-4, rtol=1e-4)
    else:
        assert changed == {name for name, _ in before.named_parameters()} - untouched - frozen
    if setup == "on_policy":
        assert 0 < summary["on_policy_batches"] < 8
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_two_runs_with_the_same_seed_train_the_same_weights_and_another_seed_does_not(tokenizer, tmp_path):
    """Reproducible quality: data order, initialisation and kernels are fixed by the seed and runtime settings."""
    from safetensors.torch import load_file

    from azdistill.config.sections import RuntimeConfig

    student = tiny_model(tokenizer, tmp_path / "student")
    runtime = RuntimeConfig(threads=1, deterministic=True)
    weights = {}
    for run, seed in (("first", 3), ("again", 3), ("other_seed", 4)):
        settings = TrainingConfig(learning_rate=5e-3, batch_size=2, epochs=1, save_steps=100, seed=seed, batching="length_grouped")
        train_student(conversations(8), [], student, tmp_path / run, settings, runtime=runtime)
        weights[run] = load_file(tmp_path / run / "model" / "model.safetensors")
    assert torch.are_deterministic_algorithms_enabled()
    assert all(torch.equal(weights["first"][name], weights["again"][name]) for name in weights["first"])
    assert not all(torch.equal(weights["first"][name], weights["other_seed"][name]) for name in weights["first"])


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


def test_a_run_resumed_from_the_checkpoint_at_an_epochs_end_trains_the_same_weights(tokenizer, tmp_path):
    # The Trainer saves a checkpoint's random state at its step, before the evaluation at the epoch's end; the
    # validation loader drew a seed from torch's generator there, so the uninterrupted run shuffled the next epoch
    # from another state than a run resumed from that checkpoint (found by tests/test_kill_resume.py).
    from safetensors.torch import load_file

    student = tiny_model(tokenizer, tmp_path / "student")
    settings = TrainingConfig(learning_rate=5e-3, batch_size=4, epochs=2, logging_steps=1, save_steps=4)
    train_student(conversations(16), conversations(4), student, tmp_path / "whole", settings)
    with pytest.raises(KeyboardInterrupt):  # 4 steps an epoch: checkpoint-4 is the first epoch's end
        train_student(conversations(16), conversations(4), student, tmp_path / "out", settings, tracker=InterruptAtStep(6))
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-4").is_dir()
    train_student(conversations(16), conversations(4), student, tmp_path / "out", settings, resume=True)
    whole, resumed = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("whole", "out"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_pruned_student_is_rebuilt_when_the_share_of_layers_changes(tokenizer, tmp_path):
    import json as json_module

    from azdistill.models.students import make_pruned_student

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
    from azdistill.data.digests import folder_digest

    folder = tiny_model(tokenizer, tmp_path / "m", seed=1)
    first = folder_digest(folder)
    assert folder_digest(folder) == first
    tiny_model(tokenizer, folder, seed=2)  # same architecture and file sizes, new weights
    assert folder_digest(folder) != first


def test_topk_lines_up_where_teacher_and_student_tokens_cover_the_same_characters():
    vocabulary = {"pos": 1, "itive": 2, " review": 3, "positive": 4, " text": 5}
    turn = {
        "text": "positive review",
        "content": [
            # The teacher's tokens differ from the student's for the first word, agree for the second.
            {"token": "positive", "logprob": -0.1, "top_logprobs": [{"token": "positive", "logprob": -0.1}, {"token": "negative", "logprob": -2.4}]},
            {"token": " review", "logprob": -0.5, "top_logprobs": [{"token": " text", "logprob": -1.5}]},
        ],
    }
    pieces = ["pos", "itive", " review", "<|im_end|>", "\n"]
    aligned = align_topk(pieces, 10, "positive review", turn, vocabulary.get)
    # Only " review" (student index 12) lines up; it is predicted from position 11. The sampled token joins its
    # candidates, and "negative" (not one student token) would be dropped had it lined up.
    assert aligned == [(11, [3, 5], [-0.5, -1.5])]
    assert align_topk(["positive", " review"], 10, "positive review", turn, vocabulary.get) == [
        (9, [4], [-0.1]),
        (10, [3, 5], [-0.5, -1.5]),
    ]
    # Logprobs of another text than the trained answer (e.g. a rationale cut away) are not used.
    assert align_topk(pieces, 10, "positive", turn, vocabulary.get) == []


def test_a_same_tokenizer_sidecar_covers_every_answer_token(tokenizer, tmp_path):
    teacher = tiny_model(tokenizer, tmp_path / "teacher", seed=2)
    train = conversations(3) + [CONVERSATION[:3]]
    sidecar = tmp_path / "train.logprobs.jsonl"
    rows = topk_sidecar(tokenizer, teacher, train, k=3)
    sidecar.write_text("".join(json.dumps(row) + "\n" for row in rows[1:]))  # the first row has no line
    turns = load_teacher_topk(sidecar, len(train))
    assert turns[0] is None and turns[1] == rows[1]["turns"]
    example = build_example(tokenizer, train[3], 256, turns[3])
    answer_tokens = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX][:-2]  # less <|im_end|> \n
    assert [position + 1 for position, _, _ in example["topk"]] == answer_tokens
    for position, ids, logprobs in example["topk"]:
        assert example["input_ids"][position + 1] in ids and logprobs == sorted(logprobs, reverse=True)
    with pytest.raises(UserError, match="synthesis.top_logprobs"):
        load_teacher_topk(tmp_path / "validation.logprobs.jsonl", 1)


def test_packed_batches_give_the_same_logits_as_padded_ones(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model(tokenizer, tmp_path / "m", init_range=0.3)).eval()
    examples = [build_example(tokenizer, messages, 256) for messages in (CONVERSATION, conversations(1)[0])]
    padded, packed = pad_batch(examples, tokenizer.pad_token_id), pack_batch(examples)
    assert packed["input_ids"].shape == (1, sum(len(example["input_ids"]) for example in examples))
    assert "attention_mask" not in packed and packed["position_ids"][0, len(examples[0]["input_ids"])] == 0
    with torch.no_grad():
        from_padded = answer_forward(model, padded, predicting_positions(padded["labels"]))
        from_packed = answer_forward(model, packed, predicting_positions(packed["labels"]))
        full = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    assert from_padded.shape[0] == sum(sum(label != IGNORE_INDEX for label in example["labels"]) for example in examples)
    torch.testing.assert_close(from_packed, from_padded, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_padded, full[predicting_positions(padded["labels"])], atol=1e-5, rtol=1e-5)


def test_each_student_layer_is_matched_to_the_teacher_layer_it_was_copied_from(tokenizer, tmp_path):
    teacher = tiny_model(tokenizer, tmp_path / "teacher", layers=6)
    assert teacher_layer_map(make_pruned_student(teacher, 0.5, tmp_path / "pruned"), 6, 3) == [0, 2, 5]
    with pytest.raises(UserError, match="pruned-from.json"):
        teacher_layer_map(teacher, 6, 6)
    with pytest.raises(UserError, match="rebuild the pruned student"):
        teacher_layer_map(tmp_path / "pruned", 8, 3)


def test_loss_settings_that_cannot_work_together_are_refused():
    from pydantic import ValidationError

    assert TrainingConfig(kd_weight=0.5).effective_sft_weight == 0.5
    assert TrainingConfig(kd_weight=0.3, topk_weight=0.2, hidden_weight=2.0).effective_sft_weight == pytest.approx(0.5)
    for bad, message in [
        ({"kd_weight": 0.7, "topk_weight": 0.5}, "set training.sft_weight"),
        ({"sft_weight": 0.0}, "every loss has weight 0"),
        ({"on_policy_ratio": 0.5}, "needs kd_weight > 0"),
        ({"kd_weight": 0.5, "on_policy_ratio": 0.5, "batching": "packed"}, "padded or length_grouped"),
        ({"method": "lora", "freeze_embeddings": True}, "freeze_embeddings applies to method full"),
    ]:
        with pytest.raises(ValidationError, match=message):
            TrainingConfig(**bad)


DISTRIBUTED_SCRIPT = """
import json, sys, torch
from pathlib import Path
from azdistill.config.loading import load_config
from azdistill.stages.finetune import finetune
torch.set_num_threads(1)
config, student, teacher, synthetic, out = sys.argv[1:6]
finetune(load_config(Path(config)), Path(student), Path(teacher), Path(synthetic), out_dir=Path(out))
"""


def test_one_process_per_device_under_torchrun_trains_one_model(tokenizer, tmp_path, make_config):
    """Two CPU processes (gloo) stand in for two GPUs: each trains on half of every batch, the main one keeps
    the stage's books and writes the model."""
    import subprocess
    import sys

    student = tiny_model(tokenizer, tmp_path / "student", seed=1)
    teacher = tiny_model(tokenizer, tmp_path / "teacher", seed=2, init_range=0.3)
    synthetic = tmp_path / "synthesize"
    synthetic.mkdir()
    for split, count in (("train", 8), ("validation", 2)):
        (synthetic / f"{split}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations(count)))
    config = make_config(extra="training:\n  learning_rate: 0.005\n  batch_size: 2\n  epochs: 2\n  kd_weight: 0.5\n  logging_steps: 1\n")
    script = tmp_path / "run.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), str(config), str(student), str(teacher), str(synthetic), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["processes"] == 2
    assert summary["steps"] == 4  # 8 examples / (2 per process x 2 processes) x 2 epochs
    assert summary["parameters_changed"] == summary["trainable_tensors"]
    assert json.loads((out / "stage.json").read_text())["summary"]["steps"] == 4
    assert (out / "model" / "model.safetensors").is_file() and not (out / "checkpoints").exists()


def test_a_setting_added_later_leaves_the_stage_key_of_earlier_students_as_it_was():
    """Upgrading azdistill does not retrain a student: freeze_embeddings at its default (what trained before it
    existed) is not part of the finetune stage's key; set, it is."""
    from azdistill.stages.finetune import training_key

    before = {"logging_steps", "save_steps", "gradient_checkpointing", "shared_prefix", "freeze_embeddings"}
    assert set(training_key(TrainingConfig())) == set(TrainingConfig.model_fields) - before
    assert training_key(TrainingConfig(freeze_embeddings=True))["freeze_embeddings"] is True
    assert training_key(TrainingConfig(freeze_embeddings=True)) != training_key(TrainingConfig())
